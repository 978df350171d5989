"""Metadata client benchmark: cached read, uncached read, credentials read in token mode.

Runs the emulator in a separate process (so its CPU is not charged to the client), and
compares with raw http.client on one keep-alive connection (the floor of any client).

    python bench/metadata.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

from guestagent.metadata.client import MetadataClient
from guestagent.metadata.settings import MetadataSettings


def start_emulator() -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestagent.cli", "emulator", "serve", "--port", "0",
         "--control-port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url, control = [w for w in line.split() if w.startswith("http://")][:2]
    return proc, url, control


def measure(name: str, fn: Callable[[], object], seconds: float) -> None:
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    lat.sort()
    p50 = statistics.median(lat) * 1e6
    p99 = lat[int(len(lat) * 0.99) - 1] * 1e6
    print(f"{name:<44} {len(lat) / seconds:>10.0f} ops/s  p50 {p50:8.1f} us  p99 {p99:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    proc, url, control = start_emulator()
    try:
        base = MetadataSettings(url=url)
        cached = MetadataClient(base)
        uncached = MetadataClient(MetadataSettings(url=url, cache_ttl=0))
        role = cached.ram_role_names()[0]
        req = urllib.request.Request(f"{control}/token", data=b'{"required": true}',
                                     method="POST")
        urllib.request.urlopen(req).read()
        token_client = MetadataClient(MetadataSettings(url=url, require_token=True))
        print(f"emulator {url} (separate process), {os.cpu_count()} cores")
        measure("cached read   (meta-data/instance-id)", cached.instance_id, args.seconds)
        measure("uncached read (meta-data/instance-id)", uncached.instance_id, args.seconds)
        measure("credentials read, token mode (validated)",
                lambda: token_client.ram_credentials(role), args.seconds)
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port)

        def raw() -> bytes:
            conn.request("GET", "/latest/meta-data/instance-id")
            return conn.getresponse().read()

        measure("peer: raw http.client keep-alive, no token", raw, args.seconds)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
