"""Migration transfer: our system-disk transfer step vs a bare ``rsync -aHAX`` of the same
tree to the same test host (network namespace + sshd), and the bandwidth limit honoured.

    sudo python3 bench/migrate.py [--size-mb 600] [--rounds 5] [--bwlimit 20000]

Target: ours >= 0.95x bare rsync's throughput (our orchestration costs <= 5 %), and the
measured rate under ``bandwidth_limit`` within 10 % of the limit.

Fair by construction: the same tree (page cache warmed for both), the same host, the same
ssh command line (``transfer.ssh_command``: same key type, default cipher, no
compression), an empty destination each time, the order alternated every round, medians.
Ours is the whole transfer step as a run does it: a fresh one-time SSH session from the
cloud, the sparse-file scan done inline (a run starts it earlier, while the instance is
created), the excludes file, rsync with every flag the issue requires (``--numeric-ids
--delete --partial-dir --info=progress2 --stats --bwlimit --exclude-from``), its progress
read and shown, the step state written.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def transfer_cpu(sshd_pid: int) -> float:
    """CPU seconds used so far by the rsync and ssh processes of both ends: ours (children
    we waited for) and the test host's (children its sshd waited for). Less sensitive to a
    shared machine's load than wall time."""
    import psutil

    sshd = psutil.Process(sshd_pid)
    end = time.monotonic() + 30
    while sshd.children() and time.monotonic() < end:
        time.sleep(0.02)  # a session's CPU is counted once sshd has reaped it
    mine = resource.getrusage(resource.RUSAGE_CHILDREN)
    theirs = sshd.cpu_times()
    return (mine.ru_utime + mine.ru_stime + theirs.children_user
            + theirs.children_system)


class SaveTimer:
    """Wall time spent writing client_data (fsynced records and progress notes)."""

    def __init__(self, migration: Migration) -> None:
        self.seconds = 0.0
        self.count = 0
        state = migration.state
        inner = state.save

        def timed(durable: bool = True) -> None:
            start = time.monotonic()
            inner(durable)
            self.seconds += time.monotonic() - start
            self.count += 1

        state.save = timed  # type: ignore[method-assign]


RSYNC_SECONDS: list[float] = []
_run_rsync = transfer.run_rsync


def _timed_rsync(*args: Any, **kwargs: Any) -> transfer.Outcome:
    """rsync's own share of our step: the rest is orchestration."""
    start = time.monotonic()
    try:
        return _run_rsync(*args, **kwargs)
    finally:
        RSYNC_SECONDS.append(time.monotonic() - start)


transfer.run_rsync = _timed_rsync


def ours(migration: Migration, dest: str, cpu: list[float] | None = None) -> float:
    migration.state.current = "transfer:system"
    migration.session = None  # a run opens its session in its first transfer step
    migration._scans.clear()  # and scans for holes (inline here: the worst case)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    migration.step_transfer("/", dest)
    took = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return took


def pre_transfer(tree: Path, config: UserConfig) -> tuple[float, float]:
    """Seconds of the local work before a transfer: the used-space check of the config
    (a walk: the tree is not a mount point) and the sparse-file scan."""
    from guestagent.migrate import prechecks

    start = time.monotonic()
    prechecks.used_space(tree, [])
    walk = time.monotonic() - start
    start = time.monotonic()
    transfer.has_sparse(tree, list(transfer.DEFAULT_EXCLUDES))
    return walk, time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=5)
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
        t_bare: list[float] = []
        t_ours: list[float] = []
        cpu: list[float] = []
        saves = SaveTimer(migration)
        sshd = api.cloud.instances[migration.state.instance_id].host._sshd
        assert sshd is not None
        work_cpu: dict[str, list[float]] = {"bare": [], "ours": []}
        for n in range(args.rounds):
            for name in ("bare", "ours") if n % 2 == 0 else ("ours", "bare"):
                dest = f"{base}-{name}{n}"
                before = transfer_cpu(sshd.pid)
                if name == "bare":
                    t_bare.append(bare(tree, target, dest))
                else:
                    t_ours.append(ours(migration, dest, cpu))
                work_cpu[name].append(transfer_cpu(sshd.pid) - before)
                shutil.rmtree(dest, ignore_errors=True)
                subprocess.run(["sync"], check=False)  # no writeback left for the next one
        mb = size / 2**20
        b, o = statistics.median(t_bare), statistics.median(t_ours)
        ratios = sorted(tb / to for tb, to in zip(t_bare, t_ours, strict=True))
        print(f"tree: {mb:.0f} MiB, 2000 small + 20 medium + 1 big file; {args.rounds} rounds, "
              "alternating order; medians")
        print(f"bare rsync -aHAX : {b:6.2f} s  {mb / b:7.1f} MiB/s   (peer)   runs "
              + " ".join(f"{t:.2f}" for t in t_bare))
        print(f"guestagent       : {o:6.2f} s  {mb / o:7.1f} MiB/s            runs "
              + " ".join(f"{t:.2f}" for t in t_ours))
        print(f"ratio (median times) {b / o:.3f}x (target >= 0.95x); per-round ratios "
              + " ".join(f"{r:.3f}" for r in ratios))
        cb, co = statistics.median(work_cpu["bare"]), statistics.median(work_cpu["ours"])
        print(f"CPU of rsync + ssh, both ends (median): bare {cb:.2f} s, ours {co:.2f} s "
              f"(ours/bare {co / cb:.3f}); runs bare "
              + " ".join(f"{t:.2f}" for t in work_cpu["bare"]) + "; ours "
              + " ".join(f"{t:.2f}" for t in work_cpu["ours"]))
        outside = statistics.median(t - r for t, r in
                                    zip(t_ours, RSYNC_SECONDS[:len(t_ours)], strict=True))
        print(f"our step outside rsync (session, scan, excludes, state): {outside * 1000:.0f} "
              f"ms per transfer (median), {outside / o * 100:.1f} % of our time")
        print(f"client_data writes: {saves.count / args.rounds:.0f} per transfer, "
              f"{saves.seconds / args.rounds * 1000:.0f} ms per transfer in all")
        walk, scan = pre_transfer(tree, config)
        print(f"our own CPU per transfer: {statistics.median(cpu):.2f} s (progress parsing, "
              f"state, scan); before a run's transfer: used-space walk {walk:.2f} s, sparse "
              f"scan {scan:.2f} s (a mount point such as / is measured by statvfs instead)")

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
        wall = big / seconds / 1024
        steady = (b1 - b0) / (t1 - t0) / 1024 if t1 - t0 > 1.0 else wall
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
