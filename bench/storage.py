"""OSS transfers: our upload and download beside ``rclone copy``, same run, same server
(``rclone serve s3`` over a local directory, on loopback), same data.

    python bench/storage.py [--sets big,small,medium] [--directions upload,download]
                            [--rounds 5] [--dir /var/tmp] [--server URL]

Data sets: (big) one 1 GiB file, (small) 10,000 files of 4 KiB, (medium) 100 files of
10 MiB. Each tool runs as its own process (ours: ``bench/storage.py --worker``, the
library the CLI calls, default settings; rclone: ``rclone copy`` with its defaults), and
its peak RSS and CPU time are read from ``wait4``. Uploads go to fresh prefixes; both
downloads read the same objects (the ones rclone uploaded). The machine is shared, so the
two tools run interleaved, A/B then B/A, for ``--rounds`` rounds; the figures are the
medians with their spread (every sample is printed too), with the load average before and
after, and the CPU time the server spent on each tool's run (on 2 cores the server and the
client share the CPU: a client that needs less of it leaves more to the server).

Each tool runs as installed: rclone is the binary itself (not a version manager's shim
script in front of it), and ours runs from byte-compiled modules, as a wheel install
leaves them (an environment with PYTHONDONTWRITEBYTECODE would otherwise compile every
module at every start, ~25 ms).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1024 * 1024
SETS = {
    "big": (1, 1024 * MiB),
    "small": (10_000, 4096),
    "medium": (100, 10 * MiB),
}


def make_data(root: Path, name: str) -> Path:
    count, size = SETS[name]
    where = root / "data" / name
    stamp = where / ".complete"
    if stamp.exists():
        return where
    where.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(size, 16 * MiB))
    for i in range(count):
        sub = where / f"d{i // 1000:02}" if count > 1000 else where
        sub.mkdir(exist_ok=True)
        with (sub / f"f{i:05}.bin").open("wb") as fh:
            left = size
            while left:
                chunk = block[: min(left, len(block))]
                # Vary content per file so no layer can dedupe it.
                fh.write(i.to_bytes(8, "little") + chunk[8:])
                left -= len(chunk)
    stamp.touch()
    return where


Sample = tuple[float, float, float, float]  # seconds, peak RSS MB, CPU s, server CPU s


def process_cpu(pid: int | None) -> float:
    """CPU seconds a running process has used so far (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(seconds, peak RSS in MB, CPU seconds) of one child process."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        # Its own session, as a command typed at a terminal: with the kernel's autogroup
        # scheduling each session shares the CPU fairly with the others (other developers'
        # tests), not with whatever else runs in the bench's own session.
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{argv[0]} failed: {err.read().decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def rclone_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update({
        "RCLONE_CONFIG": "/dev/null",
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": url,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": "bench",
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": "bench",
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    })
    return env


def worker(args: argparse.Namespace) -> int:
    """One transfer with the agent's library (what ``guestagent storage cp -r`` runs)."""
    from guestagent.storage.endpoint import from_url
    from guestagent.storage.keys import Keys, StaticKeys
    from guestagent.storage.ossurl import OssUrl
    from guestagent.storage.s3 import S3Client
    from guestagent.storage.settings import StorageSettings
    from guestagent.storage.transfer import Options, Transfers

    st = StorageSettings()
    opts = Options(state_dir=Path(args.state), part_size=st.part_size,
                   multipart_threshold=st.multipart_threshold, concurrency=st.concurrency)
    client = S3Client(from_url(args.url, path_style=True), StaticKeys(Keys("bench", "bench")))
    with Transfers(client, opts) as t:
        if args.worker == "up":
            t.upload_tree(Path(args.src), OssUrl.parse(args.dst))
        else:
            t.download_tree(OssUrl.parse(args.src), Path(args.dst))
    client.close()
    return 0


def rclone_binary() -> str:
    """The rclone binary the agent would run (a shim on PATH costs ~20 ms a start)."""
    from guestagent.storage.rclonebin import locate

    found = shutil.which(locate())
    if found is None:
        raise SystemExit("rclone not found")
    return found


def installed_env(root: Path) -> dict[str, str]:
    """Our worker's environment: modules byte-compiled once, as a wheel install does."""
    import compileall

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    package = Path(__file__).resolve().parent.parent / "guestagent"
    before, sys.pycache_prefix = sys.pycache_prefix, env["PYTHONPYCACHEPREFIX"]
    try:
        compileall.compile_dir(package, quiet=1)
    finally:
        sys.pycache_prefix = before
    return env


def ours(direction: str, src: str, dst: str, url: str, state: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", direction, "--url", url, "--state",
            str(state), "--src", src, "--dst", dst]


def _argv(tool: str, direction: str, name: str, prefix: str, src: Path, out: Path,
          url: str, root: Path, rclone: str) -> list[str]:
    if direction == "upload":
        if tool == "ours":
            return ours("up", str(src), f"oss://bkt/{prefix}/", url, root / "state")
        return [rclone, "copy", str(src), f"bench:bkt/{prefix}"]
    # Both downloads read one copy: the one rclone uploaded.
    if tool == "ours":
        return ours("down", f"oss://bkt/rclone-{name}-src/", str(out), url, root / "state")
    return [rclone, "copy", f"bench:bkt/rclone-{name}-src", str(out)]


def run_set(name: str, root: Path, url: str, rounds: int, directions: list[str],
            server: int | None) -> list[dict[str, object]]:
    count, size = SETS[name]
    total = count * size
    src = make_data(root, name)
    env = installed_env(root)
    renv = rclone_env(url)
    rclone = rclone_binary()
    # The objects both downloads read (not timed; rclone copy skips what is already there).
    subprocess.run([rclone, "copy", str(src), f"bench:bkt/rclone-{name}-src"], env=renv,
                   check=True)
    results = []
    for direction in directions:
        samples: dict[str, list[Sample]] = {"ours": [], "rclone": []}
        for rnd in range(rounds):
            order = ("rclone", "ours") if rnd % 2 == 0 else ("ours", "rclone")
            for tool in order:
                # A fresh prefix each time: the server is never changed behind its back.
                prefix = f"{tool}-{name}-{rnd}-{os.getpid()}"
                out = root / "out" / prefix
                shutil.rmtree(out, ignore_errors=True)
                argv = _argv(tool, direction, name, prefix, src, out, url, root, rclone)
                served = process_cpu(server)
                sample = timed(argv, renv if tool == "rclone" else env)
                samples[tool].append((*sample, process_cpu(server) - served))
                if direction == "download":
                    got = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                    assert got == total, f"{tool} downloaded {got} of {total} bytes"
                    shutil.rmtree(out)
                else:
                    subprocess.run([rclone, "purge", f"bench:bkt/{prefix}"], env=renv,
                                   check=False, stderr=subprocess.DEVNULL)
        results += _rows(name, direction, total, count, samples)
    shutil.rmtree(root / "out", ignore_errors=True)
    return results


def _rows(name: str, direction: str, total: int, count: int,
          samples: dict[str, list[Sample]]) -> list[dict[str, object]]:
    theirs = statistics.median(s[0] for s in samples["rclone"])
    # Per round, rclone's time over ours in the same round (the A/B or B/A pair).
    pairs = [round(r[0] / o[0], 2) for o, r in zip(samples["ours"], samples["rclone"],
                                                    strict=True)]
    rows: list[dict[str, object]] = []
    for tool in ("ours", "rclone"):
        times = [s[0] for s in samples[tool]]
        seconds = statistics.median(times)
        rows.append({
            "set": name, "direction": direction, "tool": tool, "seconds": round(seconds, 2),
            "min": round(min(times), 2), "max": round(max(times), 2),
            "MB/s": round(total / seconds / 1e6, 1), "files/s": round(count / seconds, 1),
            "peak_rss_MB": round(max(s[1] for s in samples[tool]), 1),
            "cpu_s": round(statistics.median(s[2] for s in samples[tool]), 2),
            "server_cpu_s": round(statistics.median(s[3] for s in samples[tool]), 2),
            "ratio": round(theirs / seconds, 2),
            "pair_ratios": pairs,
            "pair_ratio_median": round(statistics.median(pairs), 2),
            "samples": [round(t, 2) for t in times],
        })
    return rows


def report(rows: list[dict[str, object]], rounds: int, load: tuple[str, str]) -> None:
    print(f"medians of {rounds} interleaved rounds (min-max); load average before "
          f"{load[0]}, after {load[1]}")
    print(f"{'set':7} {'dir':9} {'tool':7} {'s':>6} {'min-max':>11} {'MB/s':>7} "
          f"{'files/s':>8} {'ratio':>6} {'RSS MB':>7} {'CPU s':>6} {'srv CPU':>7}  "
          "per-round ratios / samples (s)")
    for r in rows:
        ours = r["tool"] == "ours"
        ratio = f"{r['ratio']:.2f}x" if ours else ""
        spread = f"{r['min']}-{r['max']}"
        tail = f"{r['pair_ratios']} median {r['pair_ratio_median']}" if ours else r["samples"]
        print(f"{r['set']:7} {r['direction']:9} {r['tool']:7} {r['seconds']:>6} {spread:>11} "
              f"{r['MB/s']:>7} {r['files/s']:>8} {ratio:>6} {r['peak_rss_MB']:>7} "
              f"{r['cpu_s']:>6} {r['server_cpu_s']:>7}  {tail}")
    print(json.dumps(rows))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="big,small,medium")
    parser.add_argument("--directions", default="upload,download")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--server", help="an rclone serve s3 already running (bucket bkt)")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--worker", choices=("up", "down"))
    parser.add_argument("--url")
    parser.add_argument("--state")
    parser.add_argument("--src")
    parser.add_argument("--dst")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from guestagent.localcloud.oss import RcloneOss

    root = Path(args.dir) / "guestagent-bench-storage"
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    directions = args.directions.split(",")
    before = loadavg()
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        oss = None
        if not args.server:
            oss = RcloneOss(Path(tmp), {"GUESTAGENT_LOCALCLOUD_BUCKETS": "bkt"})
            oss.start()
        try:
            server = oss.pid if oss is not None else None
            for name in args.sets.split(","):
                rows += run_set(name, root, args.server or oss.url,  # type: ignore[union-attr]
                                args.rounds, directions, server)
        finally:
            if oss is not None:
                oss.stop()
    if not args.keep_data:
        shutil.rmtree(root / "data", ignore_errors=True)
    report(rows, args.rounds, (before, loadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
