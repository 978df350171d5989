"""Task-scoped credentials: one consumer per instance minted in the credential service
(``CredentialAccess.mint``: its own secret path and token), removed when the instance ends.

An instance gets ``ALIBABA_CLOUD_CREDENTIALS_URI`` and ``AWS_CONTAINER_CREDENTIALS_FULL_URI``
under its secret path, and ``AWS_CONTAINER_AUTHORIZATION_TOKEN``. Both go through a relay
of the agent's own, which passes on only requests under a live task path, to the credential
server's Unix socket (where the agent is the peer). The consumer is minted with
``path_unless_token``: the path alone answers a request without a token (Alibaba clients
cannot send a header), and a token that is sent must be the path's own — one instance's
token never reads another's endpoint, and the host endpoint is never reachable through
the relay.

Agent restarts: the task store keeps, per running instance, only the digests of its token
and path and its relay's port (:class:`Grant`'s ``record``). A re-adopted instance's
consumer is registered again from those digests (``CredentialAccess.restore``), and the
relays listen on the ports they had, so the URL and token in the instance's environment
work again; nothing secret is ever written to disk.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.credentials.consumers import digest
from guestagent.files import atomic_write

log = logging.getLogger(__name__)

TASK_ADDRESS = "169.254.170.2"
MAX_HEAD = 8192
ALIBABA = "/v1/credentials/alibaba"
AWS = "/v1/credentials/aws"


class Relay:
    """HTTP relay from the Docker bridge to the credential server's Unix socket.

    It knows each live task path only by its digest (never a token): a request under one
    is passed on as sent; the credential server then decides (the path alone when no
    token is sent, else the token must be that path's)."""

    def __init__(self, socket_path: Path, address: str, bridge: str | None = None,
                 port: int = 0) -> None:
        self.socket_path = socket_path
        self.address = address
        self.bridge = bridge
        self.wanted_port = port  # the previous agent's, so re-adopted instances reach us
        # Digests of live task paths -> instance name; in memory only.
        self.allowed: dict[bytes, str] = {}
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
            # Already there: left by an agent killed with -9 (or another engine's relay).
            if not res.ok and not any(m in res.stderr for m in (b"File exists",
                                                                 b"already assigned")):
                raise OSError(f"cannot add {TASK_ADDRESS} to {self.bridge}: "
                              f"{res.stderr.decode(errors='replace').strip()}")
        relay = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                relay.serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = self._bind(Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="task-credentials-relay",
                         daemon=True).start()
        log.info("task credential relay on %s", self.base)
        return self

    def _bind(self, handler: type[socketserver.BaseRequestHandler]
              ) -> socketserver.ThreadingTCPServer:
        if self.wanted_port:
            try:
                return socketserver.ThreadingTCPServer((self.address, self.wanted_port), handler)
            except OSError as exc:
                log.warning("task credential relay: port %s of %s is taken (%s): instances "
                            "started before the restart cannot reach their credentials",
                            self.wanted_port, self.address, exc)
        return socketserver.ThreadingTCPServer((self.address, 0), handler)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._added_address and self.bridge:
            process.run(["ip", "addr", "del", f"{TASK_ADDRESS}/32", "dev", self.bridge],
                        timeout=10)
            self._added_address = False

    def allow(self, name: str, path_digest: bytes) -> None:
        with self._lock:
            self.allowed = {**self.allowed, path_digest: name}

    def forget(self, name: str) -> None:
        with self._lock:
            self.allowed = {k: v for k, v in self.allowed.items() if v != name}

    def _live(self, target: str) -> bool:
        """Whether ``target`` is under a live task path."""
        first = target.split("?", 1)[0].lstrip("/").split("/", 1)[0]
        return bool(first) and digest(first) in self.allowed

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
            if len(parts) != 3 or not self._live(parts[1]):
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


# Starts a relay, on the given port if it can (0: any).
RelayFactory = Callable[[int], "Relay | None"]


@dataclass(frozen=True)
class Grant:
    """A freshly minted instance credential: ``env`` for the instance (secrets: hand it
    over, keep it nowhere) and ``record``, what :meth:`TaskCredentials.restore` needs after
    an agent restart — digests, the relay and its port, no secret — for the task store."""

    env: dict[str, str] = field(repr=False)
    record: dict[str, Any]


class TaskCredentials:
    """The scheduler's minter: ``mint(instance name, docker) -> Grant``, ``restore`` after
    a restart, ``revoke`` at the instance's end.

    ``access`` is the credential service's ``CredentialAccess`` (mint, restore, remove).
    ``ports_file`` remembers the relays' ports, so the next agent listens where the
    instances it re-adopts were told to ask."""

    def __init__(self, access: Any, host_relay: Relay | RelayFactory | None,
                 docker_relay: Relay | RelayFactory | None = None,
                 ports_file: Path | None = None) -> None:
        self.access = access
        self.ports_file = ports_file
        self._relays: dict[str, Relay | RelayFactory | None] = {
            "host": host_relay, "docker": docker_relay}
        self._lock = threading.Lock()

    def previous_port(self, kind: str) -> int:
        """The port the previous agent's ``kind`` relay listened on (0: none known)."""
        if self.ports_file is None:
            return 0
        try:
            return int(json.loads(self.ports_file.read_text()).get(kind, 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    def relay(self, kind: str) -> Relay | None:
        """The ``kind`` ("host"/"docker") relay; one given as a factory starts at first use
        (asked for the port the previous agent's had)."""
        with self._lock:
            relay = self._relays.get(kind)
            if relay is not None and not isinstance(relay, Relay):
                try:
                    relay = relay(self.previous_port(kind))
                except OSError as exc:
                    log.warning("no credential relay for %s instances: %s", kind, exc)
                    relay = None
                self._relays[kind] = relay
                if relay is not None:
                    self._remember(kind, relay.port)
            return relay

    @property
    def host_relay(self) -> Relay | None:
        return self.relay("host")

    @property
    def docker_relay(self) -> Relay | None:
        return self.relay("docker")

    def _remember(self, kind: str, port: int) -> None:
        if self.ports_file is None:
            return
        ports: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            ports = dict(json.loads(self.ports_file.read_text()))
        ports[kind] = port
        self.ports_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.ports_file, json.dumps(ports) + "\n", mode=0o600)

    def close(self) -> None:
        with self._lock:
            for relay in self._relays.values():
                if isinstance(relay, Relay):
                    relay.stop()
            self._relays = {"host": None, "docker": None}

    def mint(self, name: str, docker: bool) -> Grant | None:
        kind = "docker" if docker else "host"
        relay = self.relay(kind)
        if relay is None:
            log.warning("%s: no credential endpoint reachable from the instance", name)
            return None
        self.access.remove(_consumer(name))  # left by an attempt this process let go of
        minted = self.access.mint(_consumer(name), with_path=True, path_unless_token=True)
        path_digest = digest(minted.path.strip("/"))
        relay.allow(name, path_digest)
        base = relay.base + minted.path
        env = {
            "ALIBABA_CLOUD_CREDENTIALS_URI": base + ALIBABA,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": base + AWS,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": minted.token,
        }
        record = {"relay": kind, "port": relay.port, "path": path_digest.hex(),
                  "token": digest(minted.token).hex()}
        return Grant(env, record)

    def restore(self, name: str, record: dict[str, Any]) -> bool:
        """Make the endpoint of an instance re-adopted after a restart answer again: the
        same URL and token it holds, known here only by their digests."""
        try:
            kind = str(record["relay"])
            path_digest = bytes.fromhex(str(record["path"]))
            token_digest = bytes.fromhex(str(record["token"]))
            port = int(record["port"])
        except (KeyError, ValueError, TypeError):
            log.warning("%s: unreadable credential record; the instance gets none", name)
            return False
        relay = self.relay(kind)
        if relay is None:
            return False
        if relay.port != port:
            log.warning("%s: its credential relay was on port %s, now on %s: its requests "
                        "will fail", name, port, relay.port)
        self.access.remove(_consumer(name))  # this process may have minted it before
        self.access.restore(_consumer(name), token_digest=token_digest,
                            path_digest=path_digest, path_unless_token=True)
        relay.allow(name, path_digest)
        return True

    def revoke(self, name: str) -> None:
        for kind in ("host", "docker"):
            relay = self._relays.get(kind)
            if isinstance(relay, Relay):
                relay.forget(name)
        self.access.remove(_consumer(name))

    def __call__(self, name: str, docker: bool) -> tuple[dict[str, str], Callable[[], None]]:
        """``(env, revoke)`` for callers that persist nothing."""
        grant = self.mint(name, docker)
        if grant is None:
            return {}, _nothing

        def revoke() -> None:
            self.revoke(name)

        return grant.env, revoke


def _consumer(name: str) -> str:
    return f"task:{name}"


def _nothing() -> None:
    return None
