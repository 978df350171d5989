"""Credential server throughput and latency: 16 concurrent clients over the Unix socket and
loopback TCP, beside the same load straight on the metadata emulator, plus the server's RSS.

    python bench/credentials.py [--seconds 5] [--clients 16]

The emulator and the credential server each run in their own process (as on an instance:
the agent is one process, the metadata service another). Load comes from
``bench/loadgen.py`` (2 worker processes, closed loop, keep-alive; the only generator
here that speaks Unix sockets) and, for TCP, also from ``wrk`` when installed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen


def _emulator(q: mp.Queue) -> None:  # type: ignore[type-arg]
    from guestagent.localcloud.emulator import Emulator

    emu = Emulator().start()
    q.put((emu.url, emu.role))
    threading.Event().wait()


def _agent(url: str, sock: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    from guestagent.config import from_mapping
    from guestagent.credentials.service import CredentialService
    from guestagent.metadata.client import MetadataClient

    settings = from_mapping(
        {"metadata": {"url": url},
         "credentials": {"socket_path": sock, "tcp_enabled": True, "tcp_port": 0}}
    )
    service = CredentialService(settings, MetadataClient(settings.metadata))
    stop = threading.Event()
    server = service.start(stop)
    while service.rotator.snapshot.state != "ok":
        time.sleep(0.01)
    q.put(server.tcp_address)
    stop.wait()


def _wrk(url: str, seconds: float, clients: int, *, close: bool = False
         ) -> dict[str, float] | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    # One wrk thread: a second one only takes a core from the server on a 2-core machine.
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(
        [exe, "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", *extra, url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return round(value / 1000 if unit == "us" else value * 1000 if unit == "s" else value, 3)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"rps": round(float(rps.group(1))) if rps else 0, "p50_ms": ms("50%"),
            "p99_ms": ms("99%")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="load generator processes")
    args = ap.parse_args()

    import psutil

    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    emu = ctx.Process(target=_emulator, args=(q,), daemon=True)
    emu.start()
    url, role = q.get(timeout=30)
    sock = os.path.join(tempfile.mkdtemp(prefix="ga-bench-"), "credentials.sock")
    agent = ctx.Process(target=_agent, args=(url, sock, q), daemon=True)
    agent.start()
    host, port = q.get(timeout=30)
    rss_idle = psutil.Process(agent.pid).memory_info().rss

    emu_host_port = url.split("//", 1)[1]
    emu_path = f"/latest/meta-data/ram/security-credentials/{role}"
    # A short untimed pass first: imports, first-connection peer lookups, caches.
    loadgen.run(f"unix:{sock}", "/v1/credentials/aws", clients=args.clients, seconds=1,
                warmup=0.5, workers=args.workers)
    runs = [
        ("unix socket", f"unix:{sock}", "/v1/credentials/aws"),
        ("tcp", f"{host}:{port}", "/v1/credentials/aws"),
        ("emulator (metadata service)", emu_host_port, emu_path),
    ]
    rows = []
    for name, target, path in runs:
        res = loadgen.run(target, path, clients=args.clients, seconds=args.seconds,
                          workers=args.workers)
        rows.append((name, "loadgen", res.summary()))
    # Clients that open a connection per request (curl, SDKs without a pool) pay for
    # the connection and the peer lookup each time: measured with Connection: close.
    wrk_runs = [("tcp", f"http://{host}:{port}/v1/credentials/aws", False),
                ("emulator (metadata service)", f"{url}{emu_path}", False),
                ("tcp, new connection each", f"http://{host}:{port}/v1/credentials/aws", True),
                ("emulator, new connection each", f"{url}{emu_path}", True)]
    for name, target, close in wrk_runs:
        w = _wrk(target, args.seconds, args.clients, close=close)
        if w is not None:
            rows.append((name, "wrk", w))
    rss = psutil.Process(agent.pid).memory_info().rss
    print(f"credential server: {args.clients} concurrent clients, {args.seconds:.0f} s per run, "
          f"{os.cpu_count()} cores")
    print(f"{'target':<30} {'generator':<9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, gen, s in rows:
        print(f"{name:<30} {gen:<9} {s['rps']:>9} {s['p50_ms']:>8} {s['p99_ms']:>8} "
              f"{s.get('errors', '-'):>7}")
    print(f"server RSS: {rss_idle / 2**20:.1f} MiB idle, {rss / 2**20:.1f} MiB after the runs")
    print(json.dumps({"rows": rows, "rss_mib": round(rss / 2**20, 1)}), file=sys.stderr)
    agent.kill()
    emu.kill()


if __name__ == "__main__":
    main()
