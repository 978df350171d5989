"""A small HTTP/1.1 load generator for Unix sockets and TCP.

``wrk`` cannot open Unix sockets, so this drives both listeners the same way: P worker
processes, each keeping C/P keep-alive connections, timing every request. It pre-builds
the request bytes and parses only ``Content-Length``, so a worker costs a few µs per
request. Each worker reports the CPU time it used: a generator near 100 % of its core is
the bottleneck, not the server (bench/credentials.py prints it beside every figure).

Two modes:

- closed loop (default): one request in flight per connection, the next sent as soon as
  the answer is in (16 clients = 16 connections); measures the server's ceiling.
- fixed rate (``rate``): requests are due at a steady rate over all connections; latency
  is counted from when a request was *due*, not when a free connection sent it, so a
  stalled server is not hidden by the generator waiting for it (no coordinated omission).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import statistics
import time
from dataclasses import dataclass


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_us: list[float]
    cpu_seconds: float = 0.0  # the generator's own CPU time (all workers)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies_us:
            return float("nan")
        data = sorted(self.latencies_us)
        return data[min(len(data) - 1, int(len(data) * p / 100))]

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps),
            "p50_ms": round(self.pct(50) / 1000, 3),
            "p99_ms": round(self.pct(99) / 1000, 3),
            "max_ms": round(max(self.latencies_us, default=0) / 1000, 3),
            "mean_ms": round(statistics.fmean(self.latencies_us) / 1000, 3)
            if self.latencies_us
            else 0.0,
            "gen_cpu_pct": round(100 * self.cpu_seconds / self.seconds, 1) if self.seconds else 0,
        }


def _connect(target: str) -> socket.socket:
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target[5:])
    else:
        host, port = target.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _response_done(buf: bytes) -> int:
    """Length of the first complete response in ``buf``, or 0."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    i = head.find(b"content-length:")
    length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
    total = end + 4 + length
    return total if len(buf) >= total else 0


class _Conn:
    __slots__ = ("buf", "freed", "sent", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.sent = 0.0  # where the latency of the request in flight counts from
        self.freed = 0.0  # when its last answer came in


def _worker(target: str, request: bytes, conns: int, seconds: float, warmup: float,
            rate: float, cpus: list[int] | None, out: mp.Queue) -> None:  # type: ignore[type-arg]
    if cpus:
        os.sched_setaffinity(0, cpus)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    state = {}
    ep = select.epoll()
    for _ in range(conns):
        c = _Conn(_connect(target))
        ep.register(c.sock.fileno(), select.EPOLLIN)
        state[c.sock.fileno()] = c
    idle = collections.deque(state.values())
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + seconds
    interval = 1.0 / rate if rate else 0.0
    due = start  # fixed rate: when the next request is due
    lat: list[float] = []
    errors = 0
    in_flight = 0
    cpu_from = None
    while True:
        now = time.perf_counter()
        if cpu_from is None and now >= measure_from:
            cpu_from = resource.getrusage(resource.RUSAGE_SELF)
        if now < end:
            while idle and (not rate or due <= now):
                c = idle.popleft()
                # Fixed rate: a request that found every connection busy counts from when
                # it was due (the server held it up); one late only by this loop's own
                # timer counts from when it went out (epoll sleeps in whole ms).
                c.sent = due if rate and c.freed > due else now
                c.sock.send(request)
                in_flight += 1
                due += interval
        elif not in_flight or now >= end + 1.0:
            break
        timeout = max(0.0, min(due - now, 0.5)) if rate and idle else 0.5
        for fd, _ev in ep.poll(timeout):
            c = state[fd]
            try:
                chunk = c.sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                errors += 1
                ep.unregister(fd)
                in_flight -= 1
                continue
            buf = c.buf + chunk
            n = _response_done(buf)
            if not n:
                c.buf = buf
                continue
            t = time.perf_counter()
            in_flight -= 1
            if not buf.startswith(b"HTTP/1.1 200"):
                errors += 1
            if measure_from <= c.sent < end:
                lat.append((t - c.sent) * 1e6)
            c.buf = buf[n:]
            c.freed = t
            idle.append(c)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    base = cpu_from or cpu0
    cpu = cpu1.ru_utime - base.ru_utime + cpu1.ru_stime - base.ru_stime
    for c in state.values():
        c.sock.close()
    out.put((len(lat), errors, lat, cpu))


def request_bytes(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def run(target: str, path: str, *, clients: int = 16, workers: int = 1, seconds: float = 5.0,
        warmup: float = 1.0, headers: dict[str, str] | None = None, rate: float = 0.0,
        cpus: list[int] | None = None) -> Result:
    """Drive ``target`` (``unix:/path`` or ``host:port``) with ``clients`` connections;
    ``rate`` > 0: requests due at that total rate (per second) instead of a closed loop;
    ``cpus``: the cores the generator runs on."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    request = request_bytes(path, headers)
    per = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
    procs = [
        ctx.Process(target=_worker, args=(target, request, n, seconds, warmup,
                                          rate * n / clients, cpus, queue))
        for n in per if n
    ]
    for p in procs:
        p.start()
    total = errors = 0
    cpu = 0.0
    lat: list[float] = []
    for _ in procs:
        n, e, lt, c = queue.get(timeout=seconds + warmup + 30)
        total += n
        errors += e
        cpu += c
        lat.extend(lt)
    for p in procs:
        p.join()
    return Result(total, errors, seconds, lat, cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("target", help="unix:/path/to.sock or host:port")
    ap.add_argument("path")
    ap.add_argument("-c", "--clients", type=int, default=16)
    ap.add_argument("-w", "--workers", type=int, default=1)
    ap.add_argument("-d", "--seconds", type=float, default=5.0)
    ap.add_argument("-r", "--rate", type=float, default=0.0, help="fixed total rate, req/s")
    ap.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    args = ap.parse_args()
    headers = dict(h.split(": ", 1) for h in args.header)
    res = run(args.target, args.path, clients=args.clients, workers=args.workers,
              seconds=args.seconds, rate=args.rate, headers=headers)
    print(json.dumps(res.summary()))


if __name__ == "__main__":
    main()
