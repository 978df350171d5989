"""OSS transfers: our upload and download beside ``rclone copy``, same run, same server
(``rclone serve s3`` over a local directory, on loopback), same data.

    python bench/storage.py [--sets big,small,medium] [--rounds 2] [--dir /var/tmp]

Data sets: (big) one 1 GiB file, (small) 10,000 files of 4 KiB, (medium) 100 files of
10 MiB. Each tool runs as its own process (ours: ``bench/storage.py --worker``, the
library the CLI calls, default settings; rclone: ``rclone copy`` with its defaults), and
its peak RSS is read from ``wait4``. Uploads go to separate prefixes; both downloads read
the same objects. Best of ``--rounds`` for each. Prints MB/s, files/s, ratio, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


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


def ours(direction: str, src: str, dst: str, url: str, state: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", direction, "--url", url, "--state",
            str(state), "--src", src, "--dst", dst]


def run_set(name: str, root: Path, oss: object, rounds: int) -> list[dict[str, object]]:
    url: str = oss.url  # type: ignore[attr-defined]
    count, size = SETS[name]
    total = count * size
    src = make_data(root, name)
    env = dict(os.environ)
    renv = rclone_env(url)
    results = []
    for direction in ("upload", "download"):
        best: dict[str, tuple[float, float]] = {}
        for rnd in range(rounds):
            for tool in ("rclone", "ours"):
                # A fresh prefix each time: the server is never changed behind its back.
                prefix = f"{tool}-{name}-{rnd}"
                out = root / "out" / prefix
                shutil.rmtree(out, ignore_errors=True)
                if direction == "upload":
                    if tool == "ours":
                        argv = ours("up", str(src), f"oss://bkt/{prefix}/", url, root / "state")
                    else:
                        argv = ["rclone", "copy", str(src), f"bench:bkt/{prefix}"]
                elif tool == "ours":
                    argv = ours("down", f"oss://bkt/rclone-{name}-0/", str(out), url,
                                root / "state")
                else:
                    # Both downloads read one copy: the one rclone uploaded.
                    argv = ["rclone", "copy", f"bench:bkt/rclone-{name}-0", str(out)]
                seconds, rss = timed(argv, renv if tool == "rclone" else env)
                if direction == "download":
                    got = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                    assert got == total, f"{tool} downloaded {got} of {total} bytes"
                    shutil.rmtree(out)
                old = best.get(tool, (float("inf"), 0.0))
                best[tool] = (min(seconds, old[0]), max(rss, old[1]))
        for tool in ("ours", "rclone"):
            seconds, rss = best[tool]
            results.append({
                "set": name, "direction": direction, "tool": tool, "seconds": round(seconds, 2),
                "MB/s": round(total / seconds / 1e6, 1), "files/s": round(count / seconds, 1),
                "peak_rss_MB": round(rss, 1),
                "ratio": round(best["rclone"][0] / seconds, 2),
            })
    shutil.rmtree(root / "out", ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="big,small,medium")
    parser.add_argument("--rounds", type=int, default=2)
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
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        oss = RcloneOss(Path(tmp), {"GUESTAGENT_LOCALCLOUD_BUCKETS": "bkt"})
        oss.start()
        try:
            for name in args.sets.split(","):
                rows += run_set(name, root, oss, args.rounds)
        finally:
            oss.stop()
    if not args.keep_data:
        shutil.rmtree(root / "data", ignore_errors=True)
    print(f"{'set':7} {'dir':9} {'tool':7} {'s':>7} {'MB/s':>8} {'files/s':>9} "
          f"{'ratio':>6} {'RSS MB':>7}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["tool"] == "ours" else ""
        print(f"{r['set']:7} {r['direction']:9} {r['tool']:7} {r['seconds']:>7} "
              f"{r['MB/s']:>8} {r['files/s']:>9} {ratio:>6} {r['peak_rss_MB']:>7}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
