"""Time to apply all four user-data templates into a temporary image tree.

Prints, for each form (#cloud-config through our handlers, #!/bin/sh scripts, both as one
MIME user-data), the median and max wall time of a first-boot apply over N fresh trees,
and of the second apply on the same instance (semaphores: nothing to do). No package
manager runs. Needs root, useradd/groupadd/usermod and visudo (Debian passwd, sudo).

    python bench/userdata.py [-n 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from guestagent.userdata.apply import Applier
from guestagent.userdata.cli import combine, render_template
from guestagent.userdata.settings import UserdataSettings


def make_root(base: Path) -> Path:
    root = base / "image"
    etc = root / "etc"
    (etc / "default").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs", "sudoers"):
        shutil.copy2(f"/etc/{name}", etc / name)
    shutil.copy2("/etc/default/useradd", etc / "default/useradd")
    shutil.copytree("/etc/skel", etc / "skel", symlinks=True)
    (etc / "chrony").mkdir()
    (etc / "chrony/chrony.conf").write_text("pool 2.debian.pool.ntp.org iburst\n")
    (etc / "ssh").mkdir()
    (etc / "ssh/sshd_config").write_text("PasswordAuthentication yes\n")
    (etc / "os-release").write_text("ID=debian\nVERSION_CODENAME=bookworm\n")
    return root


def user_data(fmt: str) -> bytes:
    key = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    cases = [
        ("dns", {"nameservers": ["100.100.2.136", "100.100.2.138"], "options": ["rotate"]}),
        ("ntp", {"servers": ["ntp1.aliyun.com", "ntp2.aliyun.com"]}),
        (
            "repo",
            {"kind": "yum", "id": "myrepo", "baseurl": "http://mirrors.cloud.aliyuncs.com/centos/"},
        ),
        (
            "sudo-account",
            {"user": "ops", "groups": ["wheel"], "ssh_keys": [key], "disable_root": True},
        ),
    ]
    return combine([(f"{n}.{fmt}", render_template(n, p, fmt).encode()) for n, p in cases])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="fresh trees per form")
    args = ap.parse_args()
    settings = UserdataSettings()
    print(f"apply all four templates into a temp root, n={args.n} per form")
    for fmt in ("cloud-config", "shell"):
        data = user_data(fmt)
        first, again = [], []
        for _ in range(args.n):
            with tempfile.TemporaryDirectory() as tmp:
                root = make_root(Path(tmp))
                applier = Applier(settings, root=root)
                t0 = time.perf_counter()
                report = applier.apply(data, "i-bench")
                first.append(time.perf_counter() - t0)
                assert not report.failed, report.outcomes
                t0 = time.perf_counter()
                applier.apply(data, "i-bench")
                again.append(time.perf_counter() - t0)
        print(
            f"  {fmt:13s} first boot: median {statistics.median(first) * 1000:7.1f} ms, "
            f"max {max(first) * 1000:7.1f} ms | same instance again: "
            f"median {statistics.median(again) * 1000:6.1f} ms   (target <= 1000 ms)"
        )


if __name__ == "__main__":
    main()
