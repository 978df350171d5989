"""Metadata emulator throughput: raw keep-alive clients straight on the emulator.

Starts ``guestagent emulator serve`` in its own process (its CPU is not charged to the
clients), then C client threads each read one path in a loop on a keep-alive connection.
Prints req/s and latency percentiles per path: the baseline "straight on the emulator" that
the credential server's benchmark compares with.

    python bench/emulator.py [--seconds 3] [--clients 16]
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

PATHS = (
    "/latest/meta-data/instance-id",
    "/latest/meta-data/ram/security-credentials/EcsRamRoleDemo",
    "/latest/dynamic/instance-identity/pkcs7",
)


def start_emulator() -> tuple[subprocess.Popen[str], str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestagent.cli", "emulator", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return proc, line[1]


def hammer(url: str, path: str, seconds: float, clients: int) -> tuple[int, list[float]]:
    parts = urlsplit(url)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def run(mine: list[float]) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
        while time.monotonic() < stop:
            start = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - start)
            assert resp.status == 200, resp.status
        conn.close()

    threads = [threading.Thread(target=run, args=(lat,)) for lat in latencies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged = sorted(x for lat in latencies for x in lat)
    return len(merged), merged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    proc, url = start_emulator()
    try:
        print(f"emulator {url}, {args.clients} keep-alive clients, {args.seconds:g} s per path")
        for path in PATHS:
            count, lat = hammer(url, path, args.seconds, args.clients)
            p50 = lat[len(lat) // 2] * 1000
            p99 = lat[int(len(lat) * 0.99)] * 1000
            print(
                f"{path:60s} {count / args.seconds:8.0f} req/s  p50 {p50:6.2f} ms  "
                f"p99 {p99:6.2f} ms"
            )
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
