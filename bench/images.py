"""Figures of the image: build time (cold, with the .deb cache, fully cached), size, boot to
``guestagent.service`` active under systemd-nspawn, first-boot apply time and agent RSS in
the guest — each beside a peer from the same run.

Peers: the bare ``debootstrap --variant=minbase`` of the same recipe (inside the cold
build); systemd's own start-up of the same guest (``systemd-analyze``'s userspace time);
systemd-journald's RSS in the same guest, and the design's 35 MB target.

    python bench/images.py [--cache DIR] [--skip-cold] [-n 3]     (as root)
"""

from __future__ import annotations

import argparse
import json
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

from guestagent.images import agent, nspawn, rootfs
from guestagent.localcloud.emulator import Emulator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "system"))
from system_harness import SHARED_HOST_NETWORK  # noqa: E402


def build(cache: Path, out: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.monotonic()
    res = subprocess.run([str(REPO / "images" / "build"), "-o", str(out), "--cache", str(cache)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode:
        sys.exit(f"build failed: {res.stderr}")
    return time.monotonic() - start, res.stdout


def build_figures(work: Path, skip_cold: bool) -> None:
    out = work / "image.tar.gz"
    if not skip_cold:
        cold_cache = work / "cold-cache"
        seconds, _ = build(cold_cache, out)
        tree = rootfs.cached(rootfs.Recipe(), cold_cache)
        deboot = json.loads((tree / rootfs.COMPLETE).read_text())["seconds"] if tree else "?"
        print(f"build, cold (download + debootstrap + agent + tar):  {seconds:6.1f} s"
              f"   peer: debootstrap alone (inside it) {deboot} s")
        rootfs.remove_tree(cold_cache / "rootfs")
        seconds, _ = build(cold_cache, out)
        print(f"build, .deb cache (debootstrap + agent + tar):       {seconds:6.1f} s")
        rootfs.remove_tree(cold_cache)
    seconds, _ = build(Path("/var/cache/guestagent-image"), out)  # warm the tree cache
    seconds, _ = build(Path("/var/cache/guestagent-image"), out)
    print(f"build, tree cached (agent + deprovision + tar):      {seconds:6.1f} s")
    tree = work / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-xzf", str(out), "-C", str(tree)], check=True)
    du = subprocess.run(["du", "-sm", str(tree)], capture_output=True, text=True).stdout.split()[0]
    venv = subprocess.run(["du", "-sm", str(tree / "opt/guestagent")], capture_output=True,
                          text=True).stdout.split()[0]
    print(f"image size: tarball {out.stat().st_size / 1e6:.1f} MB, tree {du} MB "
          f"(of which the agent's venv {venv} MB)")
    rootfs.remove_tree(tree)


def user_data(work: Path) -> bytes:
    from guestagent.userdata.cli import combine, render_template

    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    parts = [
        render_template("dns", {"nameservers": "10.0.0.2"}, "cloud-config"),
        render_template("ntp", {"servers": "ntp1.aliyun.com"}, "cloud-config"),
        render_template("repo", {"kind": "apt", "id": "corp", "suite": "bookworm",
                                 "baseurl": "http://mirrors.cloud.aliyuncs.com/debian"},
                        "cloud-config"),
        render_template("sudo-account", {"user": "ops", "ssh_keys": key}, "cloud-config"),
    ]
    return combine([(f"part{i}.yaml", p.encode()) for i, p in enumerate(parts)])


def ms(props: dict[str, str], a: str, b: str) -> float:
    return (int(props[b]) - int(props[a])) / 1000.0


def rss_mb(guest: nspawn.Machine, unit: str) -> float:
    pid = guest.show(unit, "MainPID")["MainPID"]
    status = guest.run(["cat", f"/proc/{pid}/status"]).text()
    kb = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
    return kb / 1024


def boot_figures(work: Path, runs: int) -> None:
    cache = Path(os.environ.get("GUESTAGENT_TEST_CACHE", "/var/cache/guestagent-test"))
    base = rootfs.ensure(rootfs.Recipe(), cache)
    wheels = agent.wheelhouse(REPO, cache, work / "wheels")
    layer = work / "layer"
    with nspawn.overlay([base], layer, work / "merged") as merged:
        agent.install(merged, wheels, REPO)
    boot, systemd_up, apply_ms, rss, journald = [], [], [], [], []
    with Emulator().start() as emu:
        emu.set_user_data(user_data(work))
        for i in range(runs):
            g = work / f"g{i}"
            with nspawn.overlay([layer, base], g / "upper", g / "root") as root:
                (root / "etc/guestagent").mkdir(parents=True, exist_ok=True)
                (root / "etc/guestagent/agent.toml").write_text(
                    f'[metadata]\nurl = "{emu.url}"\n')
                for inside, text in SHARED_HOST_NETWORK.items():
                    (root / inside.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                    (root / inside.lstrip("/")).write_text(text)
                guest = nspawn.Machine(root, f"ga-bench-{os.getpid()}-{i}", g / "boot.log")
                start_us = time.monotonic_ns() // 1000
                guest.boot()
                try:
                    guest.wait_unit("guestagent.service")
                    guest.wait_booted()
                    active = guest.show("guestagent.service", "ActiveEnterTimestampMonotonic")
                    boot.append((int(active["ActiveEnterTimestampMonotonic"]) - start_us) / 1000)
                    sysd = guest.run(["systemctl", "show", "--property=UserspaceTimestampMonotonic",
                                      "--property=FinishTimestampMonotonic"]).text()
                    sp = dict(ln.split("=", 1) for ln in sysd.split())
                    systemd_up.append(ms(sp, "UserspaceTimestampMonotonic",
                                         "FinishTimestampMonotonic"))
                    fb = guest.show("guestagent-firstboot-local.service",
                                    "ExecMainStartTimestampMonotonic",
                                    "ExecMainExitTimestampMonotonic")
                    apply_ms.append(ms(fb, "ExecMainStartTimestampMonotonic",
                                       "ExecMainExitTimestampMonotonic"))
                    rss.append(rss_mb(guest, "guestagent.service"))
                    journald.append(rss_mb(guest, "systemd-journald.service"))
                finally:
                    guest.poweroff()
            rootfs.remove_tree(g)
    med = statistics.median
    print(f"boot: systemd-nspawn start -> guestagent.service active: median {med(boot):.0f} ms"
          f" (max {max(boot):.0f}, n={runs})   peer: systemd start-up to finished in the same"
          f" guest {med(systemd_up):.0f} ms")
    print(f"first-boot apply in the guest (DNS+NTP+repo+sudo account, local stage unit run): "
          f"median {med(apply_ms):.0f} ms (max {max(apply_ms):.0f})")
    print(f"agent RSS in the guest: median {med(rss):.1f} MB (max {max(rss):.1f})   peer: "
          f"systemd-journald {med(journald):.1f} MB; target <= 35 MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-cold", action="store_true", help="no cold builds (they download)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("-n", type=int, default=3, help="boots to measure")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="guestagent-bench-images.", dir="/var/tmp"))
    try:
        if not args.skip_build:
            build_figures(work, args.skip_cold)
        boot_figures(work, args.n)
    finally:
        rootfs.remove_tree(work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
