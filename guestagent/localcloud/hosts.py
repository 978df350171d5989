"""Test hosts: a network namespace with its own address, reached over a veth pair, running
the real ``sshd`` (and so ``rsync --server``) — another machine, as far as SSH can tell.

Names start with ``migrate`` and carry random hex so parallel runs never collide; addresses are
/30 networks inside the subnet the owner gives (e.g. 10.213.7.0/24), chosen under a lock
so two hosts never share one. The file system is this machine's: a host's "disks" are
directories the owner names.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from guestagent import process
from guestagent.files import atomic_write

log = logging.getLogger(__name__)

PREFIX = "migrate"  # namespaces and veth ends: migrate<6 hex>[hn], 14 characters at most
LOCK = Path("/run/lock/guestagent-testhosts.lock")
SSHD = "/usr/sbin/sshd"


def new_keypair(comment: str) -> tuple[str, str]:
    """An ed25519 key: (private key in OpenSSH format, public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, f"{public} {comment}"


class TestHost:
    """One namespace + veth + sshd. ``start()`` returns once sshd accepts connections."""

    __test__ = False  # not a pytest class

    def __init__(self, workdir: Path, subnet: str) -> None:
        self.workdir = workdir
        self.subnet = ipaddress.ip_network(subnet)
        tag = secrets.token_hex(3)
        self.netns = f"{PREFIX}{tag}"
        self.host_if, self.ns_if = f"{PREFIX}{tag}h", f"{PREFIX}{tag}n"
        self.address = ""
        self.gateway = ""
        self.port = 22
        self.host_public_key = ""
        self._sshd: process.Child | None = None

    def __repr__(self) -> str:
        return f"TestHost({self.netns}, {self.address or 'down'})"

    # -- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> TestHost:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._start_sshd()
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("test host %s up at %s", self.netns, self.address)
        return self

    def stop(self) -> None:
        if self._sshd is not None:
            self._sshd.stop(5.0)
            self._sshd = None
        process.run(["ip", "netns", "del", self.netns], timeout=30)
        process.run(["ip", "link", "del", self.host_if], timeout=30)

    def _network(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            net = self._free_net()
            gw, addr = (str(h) for h in list(net.hosts())[:2])
            for argv in (
                ["ip", "netns", "add", self.netns],
                ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                ["ip", "link", "set", self.ns_if, "netns", self.netns],
                ["ip", "addr", "add", f"{gw}/30", "dev", self.host_if],
                ["ip", "link", "set", self.host_if, "up"],
                ["ip", "-n", self.netns, "addr", "add", f"{addr}/30", "dev", self.ns_if],
                ["ip", "-n", self.netns, "link", "set", self.ns_if, "up"],
                ["ip", "-n", self.netns, "link", "set", "lo", "up"],
            ):
                process.run(argv, timeout=30, check=True)
        self.gateway, self.address = gw, addr

    def _free_net(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        res = process.run(["ip", "-j", "addr"], timeout=30, check=True)
        taken = [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
                 for link in json.loads(res.stdout or b"[]") for a in link.get("addr_info", [])]
        for net in self.subnet.subnets(new_prefix=30):
            if not any(net.overlaps(t) for t in taken):
                return net
        raise RuntimeError(f"no free /30 left in {self.subnet}")

    def _start_sshd(self) -> None:
        d = self.workdir
        private, public = new_keypair(f"host@{self.netns}")
        atomic_write(d / "ssh_host_ed25519_key", private, mode=0o600)
        self.host_public_key = " ".join(public.split()[:2])
        atomic_write(d / "authorized_keys", "", mode=0o600)
        config = "\n".join([
            "Port 22", f"ListenAddress {self.address}",
            f"HostKey {d / 'ssh_host_ed25519_key'}", f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "PrintMotd no", "AllowUsers root", "MaxStartups 100", "LogLevel ERROR",
            "X11Forwarding no", "AllowTcpForwarding no", "ClientAliveInterval 15", "",
        ])
        atomic_write(d / "sshd_config", config, mode=0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self._sshd = process.spawn(
            ["ip", "netns", "exec", self.netns, SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            name=f"sshd-{self.netns}", log_path=d / "sshd.log")

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            if self._sshd is not None and self._sshd.poll() is not None:
                tail = (self.workdir / "sshd.log").read_text(errors="replace")[-300:]
                raise RuntimeError(f"sshd in {self.netns} exited: {tail.strip()}")
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.address, self.port), timeout=2) as conn:
                if conn.recv(4).startswith(b"SSH-"):
                    return
            if time.monotonic() > end:
                raise RuntimeError(f"sshd in {self.netns} not ready after {timeout:.0f}s")
            time.sleep(0.1)

    # -- what the owner does with it ----------------------------------------------------
    def authorize(self, public_key: str) -> None:
        """Let exactly this key in (a new session's key replaces the last one)."""
        atomic_write(self.workdir / "authorized_keys",
                     f"restrict {public_key.strip()}\n", mode=0o600, durable=False)

    def cut_connections(self) -> int:
        """Kill every SSH session of this host (the listener stays): a network cut as the
        client sees it. Returns how many session processes were killed."""
        if self._sshd is None:
            return 0
        try:
            sessions = psutil.Process(self._sshd.pid).children(recursive=True)
        except psutil.Error:
            return 0
        killed = 0
        for proc in sessions:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
        return killed

    def remove_files(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def leftover_namespaces() -> list[str]:
    res = process.run(["ip", "netns", "list"], timeout=30)
    return [ln.split()[0] for ln in res.text().splitlines() if ln.startswith(PREFIX)]


def environment_allowing(subnet: str) -> dict[str, str]:
    """What a test guard needs to let connections to ``subnet`` through."""
    current = os.environ.get("TESTGUARD_ALLOW_CIDRS", "")
    return {"TESTGUARD_ALLOW_CIDRS": ",".join(filter(None, [current, subnet]))}
