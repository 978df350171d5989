"""Credential server throughput and latency beside nginx serving the same JSON as a file.

    python bench/credentials.py [--rounds 5] [--seconds 3] [--clients 16] [--rate 4000]

Routes: ``ecs`` is ``GET /v1/credentials/aws`` with the endpoint's ``Authorization`` token
(AWS_CONTAINER_CREDENTIALS_FULL_URI clients); ``ec2`` is ``GET
/latest/meta-data/iam/security-credentials/<role>`` with an IMDSv2 session token from
``PUT /latest/api/token`` (aws-sdk-go's EC2 role provider). Transports: loopback TCP and
the Unix socket. The agent runs with every HTTP limit on, its token and session checks
included; nginx (Debian's, one worker, as the agent has one event loop) serves the same
bytes from static files, on TCP and on a Unix socket, and gets the same request heads.

How the figures are kept honest on a shared 2-core machine:

- A/B interleaving: for each case, the agent and nginx run back to back, their order
  alternating per round (A B, B A, ...), so a neighbour's burst hits both alike; each
  round's ratio is agent/nginx from the same pair. Reported: medians and [min-max] over
  the rounds, never the best run.
- Pinning: both servers on core 0, the generator on core 1 (``--no-pin`` to let the
  scheduler place them), so neither server shares its core with the generator.
- The generator is checked, not trusted: every row shows the server's and the
  generator's CPU use over the run. A generator near 100 % of its core, with the server
  below it, means the generator is the limit. TCP load comes from ``wrk`` (C, one
  thread); it cannot open Unix sockets, so those use ``bench/loadgen.py`` (Python).
- CPU per answer (server CPU time / answers, "µs/req") is printed too: a neighbour's load
  delays a server but barely changes what each answer costs it, so that column compares
  the two servers' own work even when req/s is disturbed (1e6 / µs is a core's ceiling).
- Closed loop with 16 clients: latency is bounded by Little's law (p50 ≈ 16 / req/s), so
  the p99 there mostly says how steady the throughput is. A second table drives a fixed
  rate (``--rate``, default 4,000 req/s: the AWS ECS agent's figure) where latency is the
  server's own, counted from when each request was due.

Target (DESIGN.md §5): within 10 % of nginx (ratio >= 0.90), p99 <= 0.5 ms.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import psutil

ECS_PATH = "/v1/credentials/aws"
EC2_ROLES = "/latest/meta-data/iam/security-credentials/"


def _emulator(q: mp.Queue) -> None:  # type: ignore[type-arg]
    from guestagent.localcloud.emulator import Emulator

    emu = Emulator().start()
    q.put(emu.url)
    threading.Event().wait()


def _agent(url: str, sock: str, parser: str, cpus: list[int] | None,
           q: mp.Queue, tree: str | None = None) -> None:  # type: ignore[type-arg]
    if cpus:
        os.sched_setaffinity(0, cpus)  # before any thread starts: they all inherit it
    if tree:  # another checkout's agent (nothing of guestagent is imported before here)
        sys.path.insert(0, tree)
    import parsers

    from guestagent.config import from_mapping
    from guestagent.credentials import server as server_module
    from guestagent.credentials.service import CredentialService
    from guestagent.metadata.client import MetadataClient

    server_module.Connection = parsers.VARIANTS[parser]  # type: ignore[misc]

    settings = from_mapping(
        {"metadata": {"url": url},
         "credentials": {"socket_path": sock, "tcp_enabled": True, "tcp_port": 0}}
    )
    service = CredentialService(settings, MetadataClient(settings.metadata))
    stop = threading.Event()
    server = service.start(stop)
    while service.rotator.snapshot.state != "ok":
        time.sleep(0.01)
    q.put((server.tcp_address, service.token_file.read_text().strip()))
    stop.wait()


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 30s;
    client_header_timeout 5s;
    server {{
        listen 127.0.0.1:{port};
        listen unix:{dir}/nginx.sock;
        location / {{ root {dir}/www; default_type application/json; }}
    }}
}}
"""


@dataclass
class Server:
    name: str
    pid: int  # the process that answers (nginx: its worker)
    tcp: str  # host:port
    unix: str  # unix:/path
    headers: dict[str, dict[str, str]] | None = None  # per route: what its requests carry


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _nginx(files: dict[str, bytes], workdir: str, cpus: list[int] | None
           ) -> tuple[subprocess.Popen[bytes], Server] | None:
    """nginx serving each ``files`` path, one worker (the agent has one event loop)."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                    else None)
    if exe is None:
        return None
    root = Path(workdir)
    for path, body in files.items():
        target = root / "www" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        target.chmod(0o644)
    # nginx's worker runs as www-data: it must reach the files (mkdtemp makes 0700).
    for d in [root, *(p for p in (root / "www").rglob("*") if p.is_dir()), root / "www"]:
        d.chmod(0o755)
    port = _free_port()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port))

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen([exe, "-c", str(conf), "-p", workdir], preexec_fn=pin,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            workers = psutil.Process(proc.pid).children()
            if workers:
                return proc, Server("nginx", workers[0].pid, f"127.0.0.1:{port}",
                                    f"unix:{workdir}/nginx.sock")
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    return None


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _wrk(url: str, seconds: float, clients: int, headers: dict[str, str],
         cpus: list[int] | None) -> dict[str, float]:
    extra: list[str] = []
    for key, value in headers.items():
        extra += ["-H", f"{key}: {value}"]
    # One wrk thread: a second one only takes a core from the server on a 2-core machine.
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", *extra, url]
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    before = _children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    cpu = _children_cpu() - before

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "errors": float(errors.group(1)) if errors else 0.0,
            "gen_cpu_pct": 100 * cpu / seconds}


@dataclass(frozen=True)
class Case:
    route: str  # ecs | ec2
    transport: str  # tcp | unix


class Bench:
    def __init__(self, args: argparse.Namespace, servers: list[Server],
                 paths: dict[str, str]) -> None:
        self.args = args
        self.servers = servers
        self.paths = paths
        ncpu = os.cpu_count() or 1
        self.gen_cpus = None if args.no_pin or ncpu < 2 else list(range(1, ncpu))

    def generator(self, case: Case, rate: float) -> str:
        if case.transport == "tcp" and not rate and self.args.tcp_generator == "wrk":
            return "wrk"
        return "loadgen"

    def run(self, server: Server, case: Case, rate: float = 0.0,
            seconds: float | None = None) -> dict[str, float]:
        secs = seconds or self.args.seconds
        target = server.tcp if case.transport == "tcp" else server.unix
        assert server.headers is not None
        path, headers = self.paths[case.route], server.headers[case.route]
        proc = psutil.Process(server.pid)
        t0 = proc.cpu_times()
        w0 = time.monotonic()
        if self.generator(case, rate) == "wrk":
            got = _wrk(f"http://{target}{path}", secs, self.args.clients, headers, self.gen_cpus)
        else:
            res = loadgen.run(target, path, clients=self.args.clients, seconds=secs, warmup=0.5,
                              headers=headers, rate=rate, cpus=self.gen_cpus)
            got = {k: float(v) for k, v in res.summary().items()}
        t1 = proc.cpu_times()
        wall = time.monotonic() - w0
        used = t1.user - t0.user + t1.system - t0.system
        got["server_cpu_pct"] = 100 * used / wall
        # CPU per answer: what a neighbour's load barely changes (it delays, not costs).
        got["server_us"] = 1e6 * used / max(1.0, got["rps"] * secs)
        return got

    def interleaved(self, cases: list[Case], rounds: int, rate: float = 0.0
                    ) -> dict[tuple[str, Case], list[dict[str, float]]]:
        out: dict[tuple[str, Case], list[dict[str, float]]] = {}
        for case in cases:  # warm-up: connections, caches, the first peer lookups
            for server in self.servers:
                self.run(server, case, rate, seconds=1.0)
        for r in range(rounds):
            for case in cases:
                # Each server goes first in turn (A B, B A; with three: A B C, B C A, ...).
                k = r % len(self.servers)
                order = (self.servers[::-1] if len(self.servers) == 2 and k
                         else self.servers[k:] + self.servers[:k])
                for server in order:
                    out.setdefault((server.name, case), []).append(self.run(server, case, rate))
        return out


def _spread(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def report(title: str, bench: Bench, results: dict[tuple[str, Case], list[dict[str, float]]],
           rate: float) -> None:
    print(title)
    print(f"{'server':<7} {'route':<5} {'via':<5} {'gen':<8} {'req/s':>22} {'p50 ms':>8} "
          f"{'p99 ms':>20} {'srv cpu':>8} {'µs/req':>7} {'gen cpu':>8} {'err':>4} "
          f"{'vs nginx':>18}")
    for (name, case), runs in results.items():
        ratio = "-"
        peer = results.get(("nginx", case))
        if name != "nginx" and peer and not rate:
            # Paired: round i of the agent against round i of nginx (adjacent runs).
            pairs = [a["rps"] / b["rps"] for a, b in zip(runs, peer, strict=True) if b["rps"]]
            ratio = _spread(pairs, lambda v: f"{v:.2f}") if pairs else "-"
        print(f"{name:<7} {case.route:<5} {case.transport:<5} "
              f"{bench.generator(case, rate):<8} "
              f"{_spread([r['rps'] for r in runs], lambda v: f'{v:.0f}'):>22} "
              f"{statistics.median(r['p50_ms'] for r in runs):>8.3f} "
              f"{_spread([r['p99_ms'] for r in runs], lambda v: f'{v:.2f}'):>20} "
              f"{statistics.median(r['server_cpu_pct'] for r in runs):>7.0f}% "
              f"{statistics.median(r['server_us'] for r in runs):>7.1f} "
              f"{statistics.median(r['gen_cpu_pct'] for r in runs):>7.0f}% "
              f"{int(sum(r.get('errors', 0) for r in runs)):>4} {ratio:>18}")


def _http(target: Server, method: str, path: str, headers: dict[str, str]) -> bytes:
    host, port = target.tcp.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{method} {path}: {resp.status} {body!r}")
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per run (default 3)")
    ap.add_argument("--rounds", type=int, default=5, help="A/B pairs per case (default 5)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rate", type=float, default=4000.0,
                    help="fixed-rate latency table, req/s (0: skip it)")
    ap.add_argument("--routes", default="ecs,ec2")
    ap.add_argument("--transports", default="tcp,unix")
    ap.add_argument("--parser", default="builtin", help="see bench/parsers.py")
    ap.add_argument("--tcp-generator", choices=("wrk", "loadgen"), default="wrk")
    ap.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    ap.add_argument("--baseline", metavar="TREE",
                    help="also run the agent of another checkout (e.g. main before a change), "
                    "interleaved with the others, as 'before'")
    args = ap.parse_args()
    if args.tcp_generator == "wrk" and shutil.which("wrk") is None:
        print("(wrk not installed: TCP load from bench/loadgen.py)")
        args.tcp_generator = "loadgen"
    ncpu = os.cpu_count() or 1
    server_cpus = None if args.no_pin or ncpu < 2 else [0]

    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    emu = ctx.Process(target=_emulator, args=(q,), daemon=True)
    emu.start()
    url = q.get(timeout=30)
    procs = []

    def start_agent(name: str, tree: str | None) -> tuple[Server, str]:
        sock = os.path.join(tempfile.mkdtemp(prefix="ga-bench-"), "credentials.sock")
        proc = ctx.Process(target=_agent, args=(url, sock, args.parser, server_cpus, q, tree),
                           daemon=True)
        proc.start()
        procs.append(proc)
        (host, port), token = q.get(timeout=60)
        assert proc.pid is not None
        return Server(name, proc.pid, f"{host}:{port}", f"unix:{sock}"), str(token)

    agent, token = start_agent("agent", None)
    before = start_agent("before", args.baseline) if args.baseline else None
    role = _http(agent, "GET", EC2_ROLES, {
        "X-aws-ec2-metadata-token": _http(agent, "PUT", "/latest/api/token", {
            "X-aws-ec2-metadata-token-ttl-seconds": "21600"}).decode()}).decode()
    session = _http(agent, "PUT", "/latest/api/token",
                    {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}).decode()
    paths = {"ecs": ECS_PATH, "ec2": EC2_ROLES + role}
    headers = {"ecs": {"Authorization": token}, "ec2": {"X-aws-ec2-metadata-token": session}}
    bodies = {path: _http(agent, "GET", path, headers[route]) for route, path in paths.items()}
    started = _nginx(bodies, tempfile.mkdtemp(prefix="ga-bench-nginx-"), server_cpus)
    servers = [agent] + ([before[0]] if before else []) + ([started[1]] if started else [])
    if started is None:
        print("(nginx not installed: no peer; scripts/bootstrap installs it)")
    agent.headers = headers
    if started is not None:
        started[1].headers = headers  # the same heads, byte for byte in size
    if before is not None:
        before[0].headers = {  # heads of the same size: its own token and session
            "ecs": {"Authorization": before[1]},
            "ec2": {"X-aws-ec2-metadata-token": _http(
                before[0], "PUT", "/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}).decode()},
        }
    bench = Bench(args, servers, paths)
    cases = [Case(r, t) for r in args.routes.split(",") for t in args.transports.split(",")]
    load = os.getloadavg()[0]
    closed = bench.interleaved(cases, args.rounds)
    pinning = ("servers on core 0, generator on the others" if server_cpus else "no pinning")
    report(f"credential server, closed loop: {args.clients} keep-alive clients, "
           f"{args.seconds:.0f} s runs, {args.rounds} interleaved A/B rounds; median "
           f"[min-max]; {ncpu} cores, {pinning}, load average {load:.1f} at the start",
           bench, closed, 0.0)
    if args.rate:
        fixed = bench.interleaved(cases, max(3, args.rounds // 2), args.rate)
        print()
        report(f"fixed rate {args.rate:.0f} req/s over {args.clients} connections (latency from "
               f"when each request was due); load average {os.getloadavg()[0]:.1f}",
               bench, fixed, args.rate)
    rss = psutil.Process(agent.pid).memory_info().rss / 2**20
    print(f"agent RSS after its runs: {rss:.1f} MiB (credential service alone)")
    if started is not None:
        started[0].terminate()
        started[0].wait(10)
    for proc in procs:
        proc.kill()
    emu.kill()


if __name__ == "__main__":
    main()
