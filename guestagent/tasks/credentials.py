"""Task-scoped credentials: one consumer per instance minted in the credential service
(``CredentialAccess.mint``: its own secret path and token), removed when the instance ends.

An instance gets ``ALIBABA_CLOUD_CREDENTIALS_URI`` and ``AWS_CONTAINER_CREDENTIALS_FULL_URI``
under its secret path, and ``AWS_CONTAINER_AUTHORIZATION_TOKEN``. Both go through a relay
of the agent's own, which passes on only requests under a live task path, to the credential
server's Unix socket (where the agent is the peer), adding the instance's token when the
client sent none (Alibaba clients cannot send a header). A request naming one instance's
path with another's token is refused by the server: one instance's token never reads
another's endpoint, and the host endpoint is never reachable through the relay.

Network path: host-mode instances reach a relay on 127.0.0.1. Containers (not privileged,
Docker's default bridge) reach one at ``169.254.170.2`` — the address AWS SDKs accept over
plain HTTP — which the agent adds to the bridge interface; the containers' default route
brings it to the host, so no NAT rule is needed (the credential server itself refuses
non-loopback peers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guestagent import process

log = logging.getLogger(__name__)

TASK_ADDRESS = "169.254.170.2"
MAX_HEAD = 8192
ALIBABA = "/v1/credentials/alibaba"
AWS = "/v1/credentials/aws"


class Relay:
    """HTTP relay from the Docker bridge to the credential server's Unix socket."""

    def __init__(self, socket_path: Path, address: str, bridge: str | None = None) -> None:
        self.socket_path = socket_path
        self.address = address
        self.bridge = bridge
        # Live task paths -> (instance name, its token); in memory only.
        self.allowed: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._added_address = False
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self) -> Relay:
        if self.bridge and self.address == TASK_ADDRESS:
            res = process.run(["ip", "addr", "add", f"{TASK_ADDRESS}/32", "dev", self.bridge],
                              timeout=10)
            self._added_address = res.ok
            if not res.ok and b"File exists" not in res.stderr:
                raise OSError(f"cannot add {TASK_ADDRESS} to {self.bridge}: "
                              f"{res.stderr.decode(errors='replace').strip()}")
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                relay.serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer((self.address, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="task-credentials-relay",
                         daemon=True).start()
        log.info("task credential relay on %s", self.base)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._added_address and self.bridge:
            process.run(["ip", "addr", "del", f"{TASK_ADDRESS}/32", "dev", self.bridge],
                        timeout=10)
            self._added_address = False

    def allow(self, name: str, path: str, token: str) -> None:
        with self._lock:
            self.allowed = {**self.allowed, path.strip("/"): (name, token)}

    def forget(self, name: str) -> None:
        with self._lock:
            self.allowed = {k: v for k, v in self.allowed.items() if v[0] != name}

    def _token_for(self, target: str) -> str | None:
        """The token of the live task path ``target`` is under, or None."""
        first = target.split("?", 1)[0].lstrip("/").split("/", 1)[0]
        entry = self.allowed.get(first)
        return entry[1] if entry is not None else None

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            head = _read_head(conn)
            if head is None:
                return
            lines = head.split(b"\r\n")
            parts = lines[0].decode("latin-1").split()
            headers = {}
            for line in lines[1:]:
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            token = self._token_for(parts[1]) if len(parts) == 3 else None
            if token is None:
                conn.sendall(_refusal())
                return
            headers.setdefault("authorization", token)
            conn.sendall(self._forward(parts[0], parts[1], headers))
        except OSError as exc:
            log.debug("relay connection: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _forward(self, method: str, target: str, headers: dict[str, str]) -> bytes:
        out = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
        for key in ("authorization", "x-aws-ec2-metadata-token",
                    "x-aws-ec2-metadata-token-ttl-seconds", "user-agent", "accept"):
            if key in headers:
                out.append(f"{key}: {headers[key]}")
        request = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.settimeout(10.0)
            up.connect(str(self.socket_path))
            up.sendall(request)
            chunks = []
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def _read_head(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            return None
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def _refusal() -> bytes:
    body = json.dumps({"code": "Forbidden",
                       "message": "not a live task credential endpoint"}).encode()
    return (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


class TaskCredentials:
    """The scheduler's minter: ``(instance name, docker) -> (env, revoke)``.

    ``access`` is the credential service's ``CredentialAccess`` (mint, remove)."""

    def __init__(self, access: Any, host_relay: Relay | None,
                 docker_relay: Relay | Callable[[], Relay | None] | None = None) -> None:
        self.access = access
        self.host_relay = host_relay
        self._docker_relay = docker_relay
        self._lock = threading.Lock()

    @property
    def docker_relay(self) -> Relay | None:
        """Started at the first Docker instance when given as a factory."""
        with self._lock:
            if self._docker_relay is not None and not isinstance(self._docker_relay, Relay):
                try:
                    self._docker_relay = self._docker_relay()
                except OSError as exc:
                    log.warning("no credential relay for containers: %s", exc)
                    self._docker_relay = None
            return self._docker_relay

    def close(self) -> None:
        with self._lock:
            for relay in (self.host_relay, self._docker_relay):
                if isinstance(relay, Relay):
                    relay.stop()
            self._docker_relay = None

    def __call__(self, name: str, docker: bool) -> tuple[dict[str, str], Callable[[], None]]:
        relay = self.docker_relay if docker else self.host_relay
        if relay is None:
            log.warning("%s: no credential endpoint reachable from the instance", name)
            return {}, _nothing
        consumer = f"task:{name}"
        minted = self.access.mint(consumer, with_path=True)
        relay.allow(name, minted.path, minted.token)

        def revoke() -> None:
            relay.forget(name)
            self.access.remove(consumer)

        base = relay.base + minted.path
        env = {
            "ALIBABA_CLOUD_CREDENTIALS_URI": base + ALIBABA,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": base + AWS,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": minted.token,
        }
        return env, revoke


def _nothing() -> None:
    return None
