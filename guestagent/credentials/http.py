"""HTTP/1.1 for the local credential server: one asyncio protocol object per connection.

Requests are tiny GETs, so heads are parsed straight from the receive buffer and answered
with pre-serialised bytes (pipelining is fine; answers go out in order). The limits a
misbehaving local client meets, each closing only its own connection:

- a request head is at most :data:`MAX_HEAD` bytes, however many reads it takes (431);
- a head must be complete within ``header_timeout`` of its first byte (408), and a
  connection with nothing to do is closed after ``idle_timeout``;
- at most ``max_connections`` in total and ``max_per_peer`` per client (its uid, or its
  address when it has none): 503, then close;
- while an answer is pending (peer lookup, mandatory refresh) at most :data:`MAX_BUFFER`
  bytes are read ahead; a client that does not read its answers stops being read.

Error answers close with a short "lingering" half-close, so a client still sending gets
the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from guestagent.credentials import formats
from guestagent.credentials.peers import Peer, is_loopback, tcp_peer, unix_peer
from guestagent.credentials.rotation import Snapshot

log = logging.getLogger(__name__)

MAX_HEAD = 8192
MAX_BUFFER = 65536
_SPACE = (0x20, 0x09)
LINGER = 2.0  # seconds an error-closed connection is drained before it is dropped
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def response(status: int, body: bytes, *, close: bool = False, extra: bytes = b"") -> bytes:
    """A whole answer; ``extra``: more header lines, each ending in CRLF."""
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


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 5.0
    idle_timeout: float = 30.0
    max_connections: int = 512
    max_per_peer: int = 64


class Request(NamedTuple):
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    close: bool


class Handler(Protocol):
    """What a connection asks of the server."""

    def handle(self, peer: Peer, req: Request) -> bytes | Snapshot: ...

    def answer(self, peer: Peer, req: Request) -> tuple[bytes | Snapshot, Any]:
        """As ``handle``, plus an opaque grant to :meth:`replay` for the same head (or None)."""

    def replay(self, grant: Any) -> bytes | Snapshot | None:
        """Answer from a grant of this connection's last head; None: call ``answer``."""

    def wait_and_handle(self, req: Request, snap: Snapshot) -> Awaitable[bytes]: ...


class Connections:
    """Every open connection: the caps, and one sweeper closing those past their deadline."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: set[Connection] = set()
        self.per_peer: dict[object, int] = {}
        self.refused = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def admit(self, conn: Connection) -> bool:
        if len(self.open) >= self.limits.max_connections:
            return False
        self.open.add(conn)
        if self._sweeper is None:
            self._schedule()
        return True

    def admit_peer(self, key: object) -> bool:
        count = self.per_peer.get(key, 0)
        if count >= self.limits.max_per_peer:
            return False
        self.per_peer[key] = count + 1
        return True

    def release(self, conn: Connection) -> None:
        self.open.discard(conn)
        key = conn.peer_key
        if key is not None:
            left = self.per_peer.get(key, 1) - 1
            if left > 0:
                self.per_peer[key] = left
            else:
                self.per_peer.pop(key, None)

    def _schedule(self) -> None:
        tick = min(max(min(self.limits.header_timeout, self.limits.idle_timeout) / 4, 0.05), 1.0)
        self._sweeper = asyncio.get_running_loop().call_later(tick, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for conn in [c for c in self.open if c.deadline <= now]:
            conn.expire()
        if self.open:
            self._schedule()


class Connection(asyncio.Protocol):
    """One client connection: buffer, parse heads, answer in order."""

    def __init__(self, server: Handler, conns: Connections, kind: str, *,
                 loopback_only: bool = True) -> None:
        self.server = server
        self.conns = conns
        self.kind = kind
        self.loopback_only = loopback_only
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.peer: Peer | None = None
        self.peer_key: object = None
        self.busy = False  # an answer is pending (peer lookup or mandatory refresh)
        self.closing = False
        self.paused = False
        self.eof = False
        self.deadline = math.inf
        # The last head parsed and what came of it: keep-alive clients repeat their head
        # byte for byte, and such a repeat skips parsing and the per-head checks.
        self.last_head = b""
        self.last: tuple[Request, int, Any] | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.conns.admit(self):
            self.conns.refused += 1
            self._fail(503, "TooManyConnections", "the credential server has too many open "
                       "connections; retry shortly")
            return
        self.deadline = time.monotonic() + self.conns.limits.header_timeout
        sock = transport.get_extra_info("socket")
        if self.kind == "unix":
            self._identified_as(unix_peer(sock), None)
            return
        remote = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if self.loopback_only and not is_loopback(remote[0]):
            self._fail(403, "Forbidden", "only loopback peers")
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Off the event loop: the lookup is a netlink round trip (or a table scan).
        self.busy = True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, tcp_peer, local[:2], remote[:2])
        future.add_done_callback(lambda f: self._looked_up(f, remote[0]))

    def _looked_up(self, future: asyncio.Future[Peer], address: str) -> None:
        try:
            peer = future.result()
        except Exception as exc:  # the lookup must never kill the connection silently
            peer = Peer("tcp", why=f"lookup failed: {exc}")
        self.busy = False
        self._identified_as(peer, address)

    def _identified_as(self, peer: Peer, address: str | None) -> None:
        if self.transport is None or self.closing:
            return
        key = ("uid", peer.uid) if peer.uid is not None else ("address", address or peer.address)
        if not self.conns.admit_peer(key):
            self.conns.refused += 1
            self._fail(503, "TooManyConnections", f"too many connections from {peer.describe()} "
                       f"(at most {self.conns.limits.max_per_peer}); reuse connections")
            return
        self.peer, self.peer_key = peer, key
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after an error: discard
        if not self.buf and not self.busy:
            self.deadline = time.monotonic() + self.conns.limits.header_timeout
        self.buf += data
        if not self.busy:
            self._drain()
        elif len(self.buf) > MAX_BUFFER and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        # The client is done sending; an answer still owed goes out, then close.
        self.eof = True
        if self.busy and not self.closing:
            return True
        return None

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        self.conns.release(self)

    def expire(self) -> None:
        """Past the deadline: a half-sent head gets 408, an idle connection just closes."""
        transport = self.transport
        if transport is None or self.closing:
            return
        if self.buf:
            self._fail(408, "RequestTimeout", "request head not received in time")
        else:
            self.closing = True
            transport.close()

    # -- requests ----------------------------------------------------------------------

    def _drain(self) -> None:
        """Answer every complete request in the buffer, stopping at one that must wait."""
        transport, peer = self.transport, self.peer
        if transport is None or peer is None:
            return
        while not self.closing:
            end = self._head_end()
            if end < 0:
                break
            head = self.buf[:end]
            request = self._request(head)
            if request is None:
                return  # refused: the connection is closing
            req, body_len, grant = request
            if len(self.buf) < end + 4 + body_len:
                break  # tiny bodies on a GET are tolerated and skipped, once here
            self.buf = self.buf[end + 4 + body_len :]
            result = None if grant is None else self.server.replay(grant)
            if result is None:
                result, grant = self.server.answer(peer, req)
                self.last_head, self.last = head, (req, body_len, grant)
            if isinstance(result, bytes):
                self._answer(result, req.close)
                continue
            self._wait(req, result)
            return
        self._rearm()

    def _head_end(self) -> int:
        """Where the buffered request head ends; -1 while it is incomplete (or refused)."""
        # Look no further than the limit: a head is refused by its size, however many
        # reads it took to arrive (one big read included).
        end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0 and len(self.buf) >= MAX_HEAD + 4:
            self._fail(431, "HeaderTooLarge", f"request head larger than {MAX_HEAD} bytes")
        return end

    def _request(self, head: bytes) -> tuple[Request, int, Any] | None:
        """The request, its body length and the grant it last had when ``head`` repeats the
        previous one; None when refused (answered with 400 and closing)."""
        last = self.last
        if last is not None and head == self.last_head:
            return last
        parsed = parse_head(head)
        if parsed is None:
            self._fail(400, "BadRequest", "malformed request")
            return None
        req, body_len = parsed
        if body_len > MAX_HEAD:
            self._fail(400, "BadRequest", "unsupported body")
            return None
        return req, body_len, None

    def _wait(self, req: Request, snap: Snapshot) -> None:
        self.busy = True
        self.deadline = math.inf  # the server is the slow one
        task = asyncio.ensure_future(self.server.wait_and_handle(req, snap))
        task.add_done_callback(lambda t: self._waited(t, req.close))

    def _waited(self, task: asyncio.Future[bytes], close: bool) -> None:
        self.busy = False
        if task.cancelled():
            return
        self._answer(task.result(), close or self.eof)
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self._drain()

    def _rearm(self) -> None:
        if self.closing:
            return
        limits = self.conns.limits
        # Between requests: idle; a next head already begun: its own header deadline.
        wait = limits.header_timeout if self.buf else limits.idle_timeout
        self.deadline = time.monotonic() + wait

    def _answer(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        if close:
            self.closing = True
            transport.close()

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer an error and close, draining what the client still sends for a moment."""
        transport = self.transport
        self.closing = True
        self.buf = b""
        if transport is None:
            return
        transport.write(error_response(status, code, message, close=True))
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER, transport.abort)
        else:
            transport.close()


def parse_head(head: bytes) -> tuple[Request, int] | None:
    """A request head (without the blank line) → request and body length, or None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    method, target, version = parts
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        i = line.find(b":")
        # No empty name, no whitespace around it (obs-fold, request smuggling).
        if i <= 0 or line[i - 1] in _SPACE or line[0] in _SPACE:
            return None
        headers[line[:i].lower()] = line[i + 1 :].strip()
    conn = headers.get(b"connection", b"").lower()
    close = conn == b"close" if version == b"HTTP/1.1" else conn != b"keep-alive"
    if b"transfer-encoding" in headers:
        return None
    length = headers.get(b"content-length")
    try:
        body_len = int(length) if length else 0
    except ValueError:
        return None
    if body_len < 0:
        return None
    return Request(method, target, headers, close), body_len

