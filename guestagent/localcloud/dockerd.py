"""A private Docker engine: Debian's ``dockerd`` with its own roots, socket and bridge.

Several engines can run on one machine (tests, the demo, other developers' runs): each
gets its own ``--data-root``, ``--exec-root``, pidfile, ``unix://`` socket, containerd
namespace and a bridge of its own (name and /24 chosen free), and touches no iptables rule
(containers need no internet here; they reach the host on the bridge's gateway address).
Stopped by pid, with the bridge removed afterwards.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from guestagent import process

log = logging.getLogger(__name__)

# Candidate subnets for private bridges: 172.30.0.0/16 in /24 steps.
_POOL = ipaddress.IPv4Network("172.30.0.0/16")
START_TIMEOUT = 60.0


class EngineError(RuntimeError):
    """dockerd is missing or did not come up; the message says which and why."""


def _used_networks() -> list[ipaddress.IPv4Network]:
    res = process.run(["ip", "-4", "-o", "addr", "show"], timeout=10)
    nets: list[ipaddress.IPv4Network] = []
    for line in res.text().splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates: list[ipaddress.IPv4Network] = list(_POOL.subnets(new_prefix=24))
    # Random start so two engines started at once rarely race for the same subnet.
    start = secrets.randbelow(len(candidates))
    for net in candidates[start:] + candidates[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise EngineError("no free /24 left in 172.30.0.0/16 for a docker bridge")


class DockerEngine:
    """``with DockerEngine(workdir) as engine: engine.host`` → ``unix:///…/docker.sock``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        # Interface names are at most 15 bytes.
        self.bridge = "gad" + secrets.token_hex(4)
        self.subnet: ipaddress.IPv4Network | None = None
        self.socket_path = self.workdir / "docker.sock"
        self._child: process.Child | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def gateway(self) -> str:
        """The host's address on the bridge: what containers use to reach the host."""
        if self.subnet is None:
            raise EngineError("engine not started")
        return str(next(self.subnet.hosts()))

    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": self.host}

    def start(self) -> DockerEngine:
        exe = shutil.which("dockerd")
        if exe is None:
            raise EngineError("dockerd not found: install Debian's docker.io")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_bridge()
        argv = [
            exe,
            "--data-root", str(self.workdir / "data"),
            "--exec-root", str(self.workdir / "exec"),
            "--pidfile", str(self.workdir / "dockerd.pid"),
            "-H", self.host,
            "--bridge", self.bridge,
            "--iptables=false", "--ip-masq=false", "--ip-forward=false",
            "--containerd-namespace", self.bridge,
            "--containerd-plugins-namespace", self.bridge + "p",
        ]
        self._child = process.spawn(argv, name="dockerd", log_path=self.workdir / "dockerd.log",
                                    env=_clean_env(os.environ))
        try:
            self._wait_ready()
        except EngineError:
            self.stop()
            raise
        log.info("dockerd up on %s (bridge %s %s)", self.host, self.bridge, self.subnet)
        return self

    def _make_bridge(self) -> None:
        self.subnet = _free_subnet()
        prefix = f"{next(self.subnet.hosts())}/{self.subnet.prefixlen}"
        for argv in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", prefix, "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            res = process.run(argv, timeout=10)
            if not res.ok:
                self._drop_bridge()
                raise EngineError(f"cannot create bridge {self.bridge}: "
                                  f"{res.stderr.decode(errors='replace').strip()}")

    def _drop_bridge(self) -> None:
        process.run(["ip", "link", "del", self.bridge], timeout=10)

    def _wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            assert self._child is not None
            if self._child.poll() is not None:
                raise EngineError(f"dockerd exited {self._child.returncode}: {self._log_tail()}")
            if self._ping():
                return
            time.sleep(0.1)
        raise EngineError(f"dockerd not ready after {START_TIMEOUT:.0f}s: {self._log_tail()}")

    def _ping(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            try:
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.0 200")
            except OSError:
                return False

    def _log_tail(self) -> str:
        try:
            lines = (self.workdir / "dockerd.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])

    def stop(self) -> None:
        if self._child is not None:
            # dockerd stops its containers and its containerd on SIGTERM.
            self._child.stop(grace=30)
            self._child = None
        if self.subnet is not None:
            self._drop_bridge()
            self.subnet = None
        # Left-over overlay mounts would keep the data root busy.
        _unmount_under(self.workdir)

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unmount_under(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for target in sorted(targets, key=len, reverse=True):
        with contextlib.suppress(process.ProcessError):
            process.run(["umount", "-l", target], timeout=10)


def _clean_env(env: Mapping[str, str]) -> dict[str, str]:
    # Not the developer's DOCKER_HOST, nor proxies that would send pulls elsewhere.
    drop = {"DOCKER_HOST", "DOCKER_CONTEXT", "AWS_CA_BUNDLE"}
    return {k: v for k, v in env.items() if k not in drop}


class DockerComponent:
    """``guestagent localcloud up --with docker``."""

    name = "docker"

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self._engine = DockerEngine(workdir)

    def start(self) -> dict[str, str]:
        self._engine.start()
        return {**self._engine.env(), "GUESTAGENT_LOCALCLOUD_DOCKER_GATEWAY": self._engine.gateway}

    def stop(self) -> None:
        self._engine.stop()
