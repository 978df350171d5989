"""Migration transfer: our system-disk transfer step vs a bare ``rsync -aHAX`` of the same
tree to the same test host (network namespace + sshd), and the bandwidth limit honoured.

    sudo python3 bench/migrate.py [--size-mb 600] [--rounds 3] [--bwlimit 20000]

Target: ours >= 0.95x bare rsync's throughput (our orchestration costs <= 5 %), and the
measured rate under ``bandwidth_limit`` within 10 % of the limit.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guestagent.localcloud.ecsapi import AccessKey, Account, EcsApi
from guestagent.migrate import transfer
from guestagent.migrate.settings import MigrateSettings
from guestagent.migrate.steps import Migration
from guestagent.migrate.userconfig import UserConfig


def build(root: Path, size_mb: int) -> int:
    """Small files, medium files and one big file, random bytes; returns the total size."""
    total = 0
    budget = size_mb * 2**20
    small = root / "usr/share"
    for i in range(2000):
        path = small / f"d{i // 100}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096 + (i * 977) % 60000))
        total += path.stat().st_size
    for i in range(20):
        path = root / "srv/medium" / f"m{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(8 * 2**20))
        total += 8 * 2**20
    big = max(budget - total, 16 * 2**20)
    (root / "var").mkdir()
    with (root / "var/big.bin").open("wb") as fh:
        left = big
        while left:
            chunk = min(left, 2**24)
            fh.write(os.urandom(chunk))
            left -= chunk
    return total + big


def bare(tree: Path, target: transfer.Target, dest: str) -> float:
    argv = ["rsync", "-aHAX", "-e", transfer.ssh_command(target), f"{tree}/",
            f"{target.user}@{target.host}:{dest}/"]
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def ours(migration: Migration, dest: str) -> float:
    migration.state.current = "transfer:system"
    start = time.monotonic()
    migration.step_transfer("/", dest)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bwlimit", type=int, default=20000, help="KB/s for the limit check")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/migrate.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="migbench-"))
    key = AccessKey("LTAI5tBench0001", secrets.token_urlsafe(18))
    api = EcsApi(Account(keys={key.id: key}), work / "cloud",
                 f"10.213.{secrets.randbelow(256)}.0/24").start()
    try:
        tree = work / "tree"
        tree.mkdir()
        size = build(tree, args.size_mb)
        subprocess.run(["cat", *map(str, tree.rglob("*.bin"))], stdout=subprocess.DEVNULL,
                       check=False)  # warm the page cache for both contenders
        cfg_dir = work / "go2aliyun"
        cfg_dir.mkdir()
        config = UserConfig(cfg_dir / "user_config.json", key.id, key.secret, "cn-hangzhou",
                            "BENCH_IMAGE", 40, "Debian", "x86_64")
        settings = MigrateSettings(endpoint=api.url)
        migration = Migration(config, tree, None, settings, out=io.StringIO())
        migration.state.client_token = secrets.token_hex(8)
        migration.step_create_instance()
        session = migration.open_session()
        target = session.target("")
        base = session.system_path.rstrip("/")
        t_bare, t_ours = [], []
        for n in range(args.rounds):
            for name in ("bare", "ours") if n % 2 == 0 else ("ours", "bare"):
                dest = f"{base}-{name}{n}"
                if name == "bare":
                    t_bare.append(bare(tree, target, dest))
                else:
                    t_ours.append(ours(migration, dest))
                shutil.rmtree(dest, ignore_errors=True)
        mb = size / 2**20
        b, o = statistics.median(t_bare), statistics.median(t_ours)
        print(f"tree: {mb:.0f} MiB, 2000 small + 20 medium + 1 big file; {args.rounds} rounds, "
              "alternating order; medians")
        print(f"bare rsync -aHAX : {b:6.2f} s  {mb / b:7.1f} MiB/s   (peer)")
        print(f"guestagent       : {o:6.2f} s  {mb / o:7.1f} MiB/s   ratio {b / o:.3f}x "
              f"(target >= 0.95x)")

        # Bandwidth: the big file alone under bandwidth_limit.
        limited = work / "limited"
        (limited / "var").mkdir(parents=True)
        os.link(tree / "var/big.bin", limited / "var/big.bin")
        big = (limited / "var/big.bin").stat().st_size
        lim_config = UserConfig(config.path, key.id, key.secret, "cn-hangzhou", "BENCH_IMAGE",
                                40, "Debian", "x86_64", bandwidth_limit=args.bwlimit)
        lim = Migration(lim_config, limited, None, settings, out=io.StringIO())
        lim.state.instance_id = migration.state.instance_id
        samples: list[tuple[float, int]] = []
        shown = lim._on_progress

        def sample(name: str, p: transfer.Progress) -> None:
            samples.append((time.monotonic(), p.bytes))
            shown(name, p)

        lim._on_progress = sample  # type: ignore[method-assign]
        seconds = ours(lim, f"{base}-limited")
        (t0, b0), (t1, b1) = samples[0], samples[-1]
        steady = (b1 - b0) / (t1 - t0) / 1024
        wall = big / seconds / 1024
        off = (steady - args.bwlimit) / args.bwlimit * 100
        print(f"bandwidth_limit  : {args.bwlimit} KB/s asked; {steady:.0f} KB/s measured from "
              f"rsync's progress over {(b1 - b0) / 2**20:.0f} MiB ({off:+.1f} %, target within "
              f"10 %); {wall:.0f} KB/s wall-clock incl. SSH setup")
        return 0
    finally:
        api.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
