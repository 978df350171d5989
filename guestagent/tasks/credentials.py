"""Task-scoped credentials: one consumer per instance in the credential service, revoked
when the instance ends.

Each instance gets two consumers of the instance role's :class:`Source`:

- ``task:<job>.<task>.<i>:alibaba`` — reached by a secret capability path, for
  ``ALIBABA_CLOUD_CREDENTIALS_URI`` (Alibaba clients cannot send a header);
- ``task:<job>.<task>.<i>:aws`` — reached by its own token, for
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` + ``AWS_CONTAINER_AUTHORIZATION_TOKEN``.

Either secret selects exactly one consumer, so one instance's token never reads another's
endpoint; the host consumer is never reachable through them.

Network path for containers (non-privileged, Docker's default bridge): the credential
server refuses non-loopback TCP peers, so the agent runs a small relay on the bridge at
``169.254.170.2`` (the address AWS SDKs accept over plain HTTP; added to the bridge
interface, routed to the host by the containers' default route — no NAT rule). The relay
passes on only requests that carry a live task secret, to the server's Unix socket (where
the agent itself is the peer). Host-mode instances use the server's loopback listener.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guestagent import process

log = logging.getLogger(__name__)

TASK_ADDRESS = "169.254.170.2"
MAX_HEAD = 8192
ALIBABA = "/v1/credentials/alibaba"
AWS = "/v1/credentials/aws"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass
class _Allowed:
    """Secrets the relay passes on (digests only), by consumer name."""

    paths: dict[str, str] = field(default_factory=dict)  # capability -> name
    tokens: dict[bytes, str] = field(default_factory=dict, repr=False)  # digest -> name


class Relay:
    """HTTP relay from the Docker bridge to the credential server's Unix socket."""

    def __init__(self, socket_path: Path, address: str, bridge: str | None = None) -> None:
        self.socket_path = socket_path
        self.address = address
        self.bridge = bridge
        self.allowed = _Allowed()
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
            self.allowed.paths[path.strip("/")] = name
            self.allowed.tokens[_digest(token)] = name

    def forget(self, name: str) -> None:
        with self._lock:
            self.allowed.paths = {k: v for k, v in self.allowed.paths.items() if v != name}
            self.allowed.tokens = {k: v for k, v in self.allowed.tokens.items() if v != name}

    def _permitted(self, target: str, authorization: str | None) -> bool:
        first = target.split("?", 1)[0].lstrip("/").split("/", 1)[0]
        with self._lock:
            if first in self.allowed.paths:
                return True
            if authorization:
                token = authorization.strip()
                if token[:7].lower() == "bearer ":
                    token = token[7:].strip()
                presented = _digest(token)
                return any(hmac.compare_digest(presented, d) for d in self.allowed.tokens)
        return False

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
            if len(parts) != 3 or not self._permitted(parts[1], headers.get("authorization")):
                conn.sendall(_refusal())
                return
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
    """The scheduler's minter: ``(instance name, docker) -> (env, revoke)``."""

    def __init__(self, registry: Any, source: Any, host_base: str | None,
                 relay: Relay | Callable[[], Relay | None] | None = None) -> None:
        self.registry = registry
        self.source = source
        self.host_base = host_base
        self._relay = relay
        self._lock = threading.Lock()

    @property
    def relay(self) -> Relay | None:
        """The relay, started at the first Docker instance when given as a factory."""
        with self._lock:
            if self._relay is not None and not isinstance(self._relay, Relay):
                try:
                    self._relay = self._relay()
                except OSError as exc:
                    log.warning("no credential relay for containers: %s", exc)
                    self._relay = None
            return self._relay

    def close(self) -> None:
        with self._lock:
            if isinstance(self._relay, Relay):
                self._relay.stop()
                self._relay = None

    def __call__(self, name: str, docker: bool) -> tuple[dict[str, str], Callable[[], None]]:
        from guestagent.credentials.consumers import Consumer

        relay = self.relay if docker else None
        base = relay.base if relay is not None else (None if docker else self.host_base)
        if base is None:
            log.warning("%s: no credential endpoint reachable from the instance", name)
            return {}, _nothing
        ali_name, aws_name = f"task:{name}:alibaba", f"task:{name}:aws"
        capability = secrets.token_urlsafe(24)
        self.registry.add(Consumer(name=ali_name, source=self.source, capability=capability,
                                   hint=f"task endpoint {name}"))
        try:
            minted = self.registry.mint(aws_name, self.source, with_path=False)
        except BaseException:
            self.registry.remove(ali_name)
            raise
        if relay is not None:
            relay.allow(name, capability, minted.token)

        def revoke() -> None:
            self.registry.remove(ali_name)
            self.registry.remove(aws_name)
            if relay is not None:
                relay.forget(name)

        env = {
            "ALIBABA_CLOUD_CREDENTIALS_URI": f"{base}/{capability}{ALIBABA}",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{base}{AWS}",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": minted.token,
        }
        return env, revoke


def _nothing() -> None:
    return None
