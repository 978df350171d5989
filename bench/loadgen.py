"""A small closed-loop HTTP/1.1 load generator for Unix sockets and TCP.

``wrk`` cannot open Unix sockets, so this drives both listeners the same way: P worker
processes, each keeping C/P keep-alive connections busy with one request in flight per
connection (16 concurrent clients = 16 connections), timing every request. It pre-builds
the request bytes and parses only ``Content-Length``, so a worker costs a few µs per
request; run with ``--workers 1`` against a fast target to see its own ceiling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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


def _worker(target: str, path: str, headers: dict[str, str], conns: int, seconds: float,
            warmup: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()
    socks = [_connect(target) for _ in range(conns)]
    ep = select.epoll()
    state: dict[int, list[object]] = {}
    now = time.perf_counter()
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        s.send(request)
        state[s.fileno()] = [s, b"", now]
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + seconds
    lat: list[float] = []
    errors = 0
    while True:
        for fd, _ev in ep.poll(0.5):
            st = state[fd]
            sock = st[0]
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                errors += 1
                ep.unregister(fd)
                continue
            buf = st[1] + chunk  # type: ignore[operator]
            n = _response_done(buf)
            if not n:
                st[1] = buf
                continue
            t = time.perf_counter()
            if not buf.startswith(b"HTTP/1.1 200"):
                errors += 1
            if t >= measure_from:
                lat.append((t - st[2]) * 1e6)  # type: ignore[operator]
            st[1] = buf[n:]
            if t >= end:
                continue
            st[2] = time.perf_counter()
            sock.send(request)
        if time.perf_counter() >= end + 0.5:
            break
        if time.perf_counter() >= end and all(not v[1] for v in state.values()):
            break
    for s in socks:
        s.close()
    out.put((len(lat), errors, lat))


def run(target: str, path: str, *, clients: int = 16, workers: int = 2, seconds: float = 5.0,
        warmup: float = 1.0, headers: dict[str, str] | None = None) -> Result:
    """Drive ``target`` (``unix:/path`` or ``host:port``) with ``clients`` connections."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    per = [clients // workers + (1 if i < clients % workers else 0) for i in range(workers)]
    procs = [
        ctx.Process(target=_worker, args=(target, path, headers or {}, n, seconds, warmup, queue))
        for n in per if n
    ]
    for p in procs:
        p.start()
    total = errors = 0
    lat: list[float] = []
    for _ in procs:
        n, e, lt = queue.get(timeout=seconds + warmup + 30)
        total += n
        errors += e
        lat.extend(lt)
    for p in procs:
        p.join()
    return Result(total, errors, seconds, lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("target", help="unix:/path/to.sock or host:port")
    ap.add_argument("path")
    ap.add_argument("-c", "--clients", type=int, default=16)
    ap.add_argument("-w", "--workers", type=int, default=2)
    ap.add_argument("-d", "--seconds", type=float, default=5.0)
    args = ap.parse_args()
    res = run(args.target, args.path, clients=args.clients, workers=args.workers,
              seconds=args.seconds)
    print(json.dumps(res.summary()))


if __name__ == "__main__":
    main()
