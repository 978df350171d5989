"""The local credential server: asyncio, a minimal HTTP/1.1 parser, keep-alive.

Requests are tiny GETs, so the server is a protocol object per connection that parses
request heads straight from the receive buffer and writes a pre-serialised response
(rebuilt only when the rotator publishes a new snapshot). Peers are identified once per
connection: ``SO_PEERCRED`` on the Unix socket, the connection table on loopback TCP.

Routes (after an optional capability prefix ``/<secret>``):

- ``GET /v1/credentials/alibaba`` the metadata service's JSON (ALIBABA_CLOUD_CREDENTIALS_URI, oss2)
- ``GET /v1/credentials/aws``     container-credentials JSON (AWS_CONTAINER_CREDENTIALS_FULL_URI)
- ``GET /v1/health``              state without secrets (no token needed)
- ``/latest/...``                  EC2-style role credentials (see :mod:`.ec2`), capability
                                   path only
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from guestagent.credentials import ec2, formats
from guestagent.credentials.consumers import Consumer, Registry
from guestagent.credentials.peers import Peer, is_loopback, tcp_peer, unix_peer
from guestagent.credentials.rotation import Snapshot

log = logging.getLogger(__name__)

MAX_HEAD = 8192
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
_ROUTES = {b"/v1/credentials/alibaba": "alibaba", b"/v1/credentials/aws": "aws"}
_HEALTH = b"/v1/health"


def response(status: int, body: bytes, *, close: bool = False, extra: bytes = b"") -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store\r\n%s%s\r\n"
        % (
            status,
            _REASONS.get(status, b"Error"),
            len(body),
            extra,
            b"Connection: close\r\n" if close else b"",
        )
    )
    return head + body


def error_response(status: int, code: str, message: str, *, close: bool = False) -> bytes:
    return response(status, formats.error(code, message), close=close)


class _Rendered:
    """Full 200 responses of one snapshot, built once per (snapshot, format, close)."""

    __slots__ = ("cache", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.cache: dict[tuple[str, bool], bytes] = {}

    def get(self, fmt: str, close: bool) -> bytes:
        key = (fmt, close)
        out = self.cache.get(key)
        if out is None:
            out = self.cache[key] = response(200, self.snapshot.bodies[fmt], close=close)
        return out


class CredentialServer:
    """Serve a :class:`Registry` over a Unix socket and optionally loopback TCP.

    The event loop runs in its own thread; :meth:`start` returns once listening.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        socket_path: Path | None,
        socket_mode: int = 0o660,
        socket_gid: int | None = None,
        tcp: tuple[str, int] | None = None,
        request_wait: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        self.tcp = tcp
        self.request_wait = request_wait
        self.clock = clock
        self.tcp_address: tuple[str, int] | None = None
        self.requests = 0
        self.refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._rendered: dict[int, _Rendered] = {}  # id(source) -> responses of its snapshot
        self._published: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> CredentialServer:
        self._thread = threading.Thread(target=self._serve, name="credentials-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def published(self) -> None:
        """A source published a snapshot (any thread): wake requests waiting for it."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_published)

    def _on_published(self) -> None:
        if self._published is not None:
            self._published.set()
            self._published = asyncio.Event()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._published = asyncio.Event()
            loop.run_until_complete(self._listen())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for srv in self._servers:
                srv.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        if self.socket_path is not None:
            sock = self._unix_socket(self.socket_path)
            srv = await loop.create_unix_server(lambda: _Connection(self, "unix"), sock=sock)
            self._servers.append(srv)
            log.info("credential server listening on %s", self.socket_path)
        if self.tcp is not None:
            host, port = self.tcp
            if not is_loopback(host):
                raise OSError(f"credential TCP listener must be on loopback, not {host}")
            srv = await loop.create_server(
                lambda: _Connection(self, "tcp"), host, port, reuse_address=True
            )
            self._servers.append(srv)
            self.tcp_address = srv.sockets[0].getsockname()[:2]
            log.info("credential server listening on http://%s:%s", *self.tcp_address)

    def _unix_socket(self, path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Created with no access at all, opened up only once mode and group are right.
        old = os.umask(0o777)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self.socket_gid is not None:
            os.chown(path, -1, self.socket_gid)
        os.chmod(path, self.socket_mode)
        sock.listen(512)
        sock.setblocking(False)
        return sock

    # -- requests ----------------------------------------------------------------------

    def rendered(self, consumer: Consumer) -> _Rendered:
        snap = consumer.source.snapshot
        key = id(consumer.source)
        cached = self._rendered.get(key)
        if cached is None or cached.snapshot is not snap:
            cached = self._rendered[key] = _Rendered(snap)
        return cached

    def handle(self, peer: Peer, req: Request) -> bytes | Snapshot:
        """The response bytes, or the snapshot to wait past (mandatory window)."""
        method, target, headers, close = req
        self.requests += 1
        if b"x-forwarded-for" in headers:
            return self._refuse(
                peer, 403, "Forbidden", "requests carrying X-Forwarded-For are refused", close
            )
        path = target.split(b"?", 1)[0]
        consumer, rest = self.registry.resolve(path, headers.get(b"authorization"))
        if consumer is None:
            return self._refuse(peer, 404, "NotFound", "no such endpoint", close)
        if not consumer.permits(peer):
            why = (
                f"uid {peer.uid} may not read the instance's credentials; {consumer.hint}"
                if peer.uid is not None
                else f"cannot identify the client process ({peer.why})"
            )
            return self._refuse(peer, 403, "Forbidden", why, close)
        if rest == _HEALTH:
            return self._health(consumer, close)
        if rest.startswith(ec2.PREFIX):
            return self._ec2(consumer, method, rest, req.headers, close)
        fmt = _ROUTES.get(rest)
        if fmt is None:
            return error_response(
                404, "NotFound", "no such path; use /v1/credentials/alibaba, /v1/credentials/aws "
                "or /v1/health", close=close,
            )
        if method != b"GET":
            return error_response(405, "MethodNotAllowed", "only GET is served", close=close)
        if not consumer.token_ok(headers.get(b"authorization")):
            return self._refuse(
                peer, 401, "Unauthorized", "missing or wrong Authorization token; send the "
                "content of the endpoint's token file", close,
            )
        return self._answer(consumer, fmt, close)

    def _answer(self, consumer: Consumer, fmt: str, close: bool) -> bytes | Snapshot:
        rendered = self.rendered(consumer)
        snap = rendered.snapshot
        verdict = snap.verdict(self.clock())
        if verdict == "serve":
            return rendered.get(fmt, close)
        if verdict == "wait":
            consumer.source.kick()
            return snap
        return self._unavailable(snap, close)

    def _ec2(self, consumer: Consumer, method: bytes, rest: bytes,
             headers: dict[bytes, bytes], close: bool) -> bytes | Snapshot:
        if consumer.capability is None and consumer.token_digest is not None:
            return error_response(404, "NotFound", "EC2-style routes are served only under "
                                  "a capability path", close=close)
        if rest == ec2.TOKEN:
            if method != b"PUT":
                return error_response(405, "MethodNotAllowed", "PUT a token", close=close)
            ttl = ec2.token_ttl(headers)
            if ttl is None:
                return error_response(400, "BadRequest", "X-aws-ec2-metadata-token-ttl-seconds"
                                      " must be 1..21600", close=close)
            return response(200, ec2.new_token(), close=close,
                            extra=b"X-Aws-Ec2-Metadata-Token-Ttl-Seconds: %d\r\n" % ttl)
        role = ec2.role_of(rest)
        if role is None or method != b"GET":
            return error_response(404, "NotFound", "no such EC2-style path", close=close)
        snap = consumer.source.snapshot
        name = (snap.role or "guestagent").encode()
        if role == b"":
            return response(200, name, close=close)
        if role != name:
            return error_response(404, "NotFound", "no such role", close=close)
        return self._answer(consumer, "ec2", close)

    async def wait_and_handle(self, req: Request, snap: Snapshot) -> bytes:
        """Mandatory window: wait for the rotator's next word, then serve or refuse."""
        _method, target, headers, close = req
        deadline = self.clock() + self.request_wait
        path = target.split(b"?", 1)[0]
        consumer, rest = self.registry.resolve(path, headers.get(b"authorization"))
        assert consumer is not None  # handle() resolved it before asking to wait
        fmt = _ROUTES.get(rest) or ("ec2" if ec2.role_of(rest) else "aws")
        while True:
            left = deadline - self.clock()
            current = consumer.source.snapshot
            if current.generation > snap.generation or left <= 0:
                break
            event = self._published
            assert event is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.25))
        rendered = self.rendered(consumer)
        if rendered.snapshot.verdict(self.clock()) == "serve":
            return rendered.get(fmt, close)
        return self._unavailable(rendered.snapshot, close)

    def _unavailable(self, snap: Snapshot, close: bool) -> bytes:
        status, code, message = snap.refusal(self.clock())
        return error_response(status, code, message, close=close)

    def _health(self, consumer: Consumer, close: bool) -> bytes:
        snap = consumer.source.snapshot
        now = self.clock()
        ok = snap.verdict(now) == "serve"
        doc: dict[str, Any] = {"status": snap.state if not ok else "ok", "role": snap.role}
        if snap.credentials is not None:
            doc["expires_in"] = max(0, int(snap.expires_at - now))
        if snap.error:
            doc["error"] = snap.error
        body = json.dumps(doc, separators=(",", ":")).encode()
        return response(200 if ok else 503, body, close=close)

    def _refuse(self, peer: Peer, status: int, code: str, message: str, close: bool) -> bytes:
        self.refused += 1
        log.info("refused credential request from %s: %s", peer.describe(), message)
        return error_response(status, code, message, close=close)


class _Connection(asyncio.Protocol):
    """One client connection: buffer, parse heads, answer in order (pipelining is fine)."""

    def __init__(self, server: CredentialServer, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.peer: Peer | None = None
        self.busy = False  # a request is waiting (peer lookup or mandatory refresh)
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if self.kind == "unix":
            self.peer = unix_peer(sock)
            return
        remote = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if not is_loopback(remote[0]):
            transport.write(error_response(403, "Forbidden", "only loopback peers", close=True))
            transport.close()
            self.closing = True
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The connection-table walk is slow: do it once, in a worker thread.
        self.busy = True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, tcp_peer, local[:2], remote[:2])
        future.add_done_callback(self._identified)

    def _identified(self, future: asyncio.Future[Peer]) -> None:
        try:
            self.peer = future.result()
        except Exception as exc:  # the lookup must never kill the connection silently
            self.peer = Peer("tcp", why=f"lookup failed: {exc}")
        self.busy = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None

    def _drain(self) -> None:
        """Answer every complete request in the buffer, stopping at one that must wait."""
        transport = self.transport
        peer = self.peer
        if transport is None or peer is None:
            return
        while not self.closing:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._finish(error_response(431, "HeaderTooLarge", "request head too large",
                                                close=True), True)
                return
            head = self.buf[:end]
            self.buf = self.buf[end + 4 :]
            parsed = _parse_head(head)
            if parsed is None:
                bad = error_response(400, "BadRequest", "malformed request", close=True)
                self._finish(bad, True)
                return
            req, body_len = parsed
            close = req.close
            if body_len:
                if body_len < 0 or body_len > MAX_HEAD:
                    self._finish(error_response(400, "BadRequest", "unsupported body", close=True),
                                 True)
                    return
                # Tiny bodies on a GET are tolerated and skipped.
                if len(self.buf) < body_len:
                    self.buf = head + b"\r\n\r\n" + self.buf
                    return
                self.buf = self.buf[body_len:]
            result = self.server.handle(peer, req)
            if isinstance(result, bytes):
                self._finish(result, close)
                continue
            self.busy = True
            task = asyncio.get_running_loop().create_task(
                self.server.wait_and_handle(req, result)
            )
            task.add_done_callback(lambda t, c=close: self._waited(t, c))  # type: ignore[misc]
            return

    def _waited(self, task: asyncio.Task[bytes], close: bool) -> None:
        self.busy = False
        if task.cancelled():
            return
        self._finish(task.result(), close)
        self._drain()

    def _finish(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        if close:
            self.closing = True
            transport.close()


class Request(NamedTuple):
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    close: bool


def _parse_head(head: bytes) -> tuple[Request, int] | None:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    method, target, version = parts
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    conn = headers.get(b"connection", b"").lower()
    close = conn == b"close" if version == b"HTTP/1.1" else conn != b"keep-alive"
    if b"transfer-encoding" in headers:
        return None
    length = headers.get(b"content-length")
    try:
        body_len = int(length) if length else 0
    except ValueError:
        return None
    return Request(method, target, headers, close), body_len


def resolve_group(name: str) -> int:
    """A group name or numeric gid, as settings give it."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {name!r}") from None
