"""Time to apply all four user-data templates into a temporary image tree, beside the
peer: real cloud-init (the Debian package installed by scripts/bootstrap) applying the
same #cloud-config into the same kind of tree.

Prints, for each form (#cloud-config through our handlers, #!/bin/sh scripts — which now
run chrooted into the tree), the median and max wall time of a first-boot apply over N
fresh trees, the second apply on the same instance (semaphores: nothing to do), and the
peer: ``cloud-init init`` + ``cloud-init modules --mode config`` chrooted into a fresh tree
(host /usr bound read-only into it, in a private mount namespace), the user-data given by
its None datasource, restricted to the modules that own the same keys (resolv_conf,
users-groups, ssh, ntp, yum-add-repo; no host keys generated, no network config). No
package manager runs. Needs root, useradd/groupadd/usermod, visudo, unshare and chroot.

    python bench/userdata.py [-n 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from guestagent.userdata.apply import Applier
from guestagent.userdata.cli import combine, render_template
from guestagent.userdata.settings import UserdataSettings

# The image tree the user-data tests apply into (this machine's tools, account files).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "userdata"))
from imagetree import account_files, tool_tree

TOOLS = ("sh", "awk", "mktemp", "mkdir", "dirname", "cat", "chmod", "chown", "cmp", "cp",
         "mv", "rm", "grep", "sed", "tr", "head", "useradd", "groupadd", "usermod", "visudo")
PEER_CFG = """datasource_list: [ None ]
network: {{config: disabled}}
ssh_genkeytypes: []
ssh_deletekeys: false
cloud_init_modules: [resolv_conf, users-groups, ssh]
cloud_config_modules: [ntp, yum-add-repo]
cloud_final_modules: []
datasource:
  None:
    userdata_raw: |
{body}
"""


def make_root(base: Path, tools: Path | None) -> Path:
    root = base / "image"
    if tools is not None:
        subprocess.run(["cp", "-al", str(tools), str(root)], check=True)
    etc = root / "etc"
    account_files(etc)
    (etc / "chrony").mkdir()
    (etc / "chrony/chrony.conf").write_text("pool 2.debian.pool.ntp.org iburst\n")
    (etc / "ssh").mkdir()
    (etc / "ssh/sshd_config").write_text("PasswordAuthentication yes\n")
    (etc / "os-release").write_text("ID=debian\nVERSION_CODENAME=bookworm\n")
    (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
    return root


def user_data(fmt: str, key: str) -> bytes:
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


def peer_once(base: Path, document: bytes) -> float | None:
    """One cloud-init first boot (init + config modules) chrooted into a fresh tree."""
    root = make_root(base, None)
    for d in ("usr", "proc", "dev", "run", "var/lib/cloud"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for top in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{top}") and not os.path.lexists(root / top):
            (root / top).symlink_to(os.readlink(f"/{top}"))
    shutil.copytree("/etc/cloud", root / "etc/cloud", symlinks=True)
    body = "\n".join("      " + line for line in document.decode().splitlines())
    (root / "etc/cloud/cloud.cfg.d/99-bench.cfg").write_text(PEER_CFG.format(body=body))
    r = str(root)
    script = (
        f"mount --bind /usr {r}/usr && mount -o remount,bind,ro {r}/usr && "
        f"mount --bind /dev {r}/dev && mount -t proc proc {r}/proc && "
        f"chroot {r} /usr/bin/cloud-init init && "
        f"chroot {r} /usr/bin/cloud-init modules --mode config"
    )
    t0 = time.perf_counter()
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True)
    took = time.perf_counter() - t0
    if not (root / "etc/passwd").read_text().count("\nops:"):
        print("  peer: cloud-init did not create the user; its output:")
        print(res.stdout.decode()[-800:], res.stderr.decode()[-800:])
        return None
    return took


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.1f} ms, max {max(values) * 1000:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=5, help="fresh trees per form")
    args = ap.parse_args()
    key = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    settings = UserdataSettings()
    print(f"apply all four templates into a temp root, n={args.n} per form")
    with tempfile.TemporaryDirectory() as cache:
        tools = tool_tree(Path(cache) / "tools", TOOLS)
        for fmt in ("cloud-config", "shell"):
            data = user_data(fmt, key)
            first, again = [], []
            for _ in range(args.n):
                with tempfile.TemporaryDirectory() as tmp:
                    root = make_root(Path(tmp), tools)
                    applier = Applier(settings, root=root)
                    t0 = time.perf_counter()
                    report = applier.apply(data, "i-bench")
                    first.append(time.perf_counter() - t0)
                    assert not report.failed, report.outcomes
                    t0 = time.perf_counter()
                    applier.apply(data, "i-bench")
                    again.append(time.perf_counter() - t0)
            print(f"  guestagent {fmt:13s} first boot: {_ms(first)} | same instance again: "
                  f"median {statistics.median(again) * 1000:6.1f} ms")
        peer: list[float] = []
        if shutil.which("cloud-init") and shutil.which("unshare"):
            document = user_data("cloud-config", key)
            for _ in range(args.n):
                with tempfile.TemporaryDirectory() as tmp:
                    took = peer_once(Path(tmp), document)
                    if took is not None:
                        peer.append(took)
        if peer:
            print(f"  cloud-init #cloud-config  first boot: {_ms(peer)}   (peer, same run)")
        else:
            print("  cloud-init: not measured (not installed, or it failed: see above)")


if __name__ == "__main__":
    main()
