"""HTTP servers of the emulator: the metadata service itself, and the base both it and the
control API share (threaded, keep-alive, open connections closed on stop)."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from guestagent.localcloud.emulator import tree
from guestagent.localcloud.emulator.faults import FaultRule
from guestagent.localcloud.emulator.tokens import TOKEN_HEADER, TTL_HEADER, parse_ttl

if TYPE_CHECKING:
    from guestagent.localcloud.emulator.instance import Emulator

log = logging.getLogger(__name__)

VERSIONS = ("latest", "2016-01-01")
VERSIONS_LISTING = "\n".join(sorted(VERSIONS)).encode()
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Server(ThreadingHTTPServer):
    """Threaded server that remembers its open connections so stop() can close them
    (a keep-alive client or a hanging request must not keep a thread or the port busy)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops SYNs under connection churn (clients that
    # open a connection per request), which shows up as 1 s retransmit stalls.
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], emulator: Emulator
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.emulator = emulator
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Peers (and our own reset faults) drop connections all the time: not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s dropped: %s", client_address, exc)
        else:
            log.exception("error serving %s", client_address)

    def close_connections(self) -> None:
        with self._open_lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def write(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
        *,
        declared_length: int | None = None,
    ) -> None:
        """One send for status line, headers and body (no Nagle stalls on keep-alive)."""
        length = len(body) if declared_length is None else declared_length
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n"
            f"Date: {self.date_time_string()}\r\n"
        )
        if self.close_connection:
            head += "Connection: close\r\n"
        self.wfile.write(head.encode("latin-1") + b"\r\n" + body)

    def finish(self) -> None:
        # The connection may have been reset on purpose (fault) or by the peer.
        with contextlib.suppress(OSError):
            super().finish()


class MetadataHandler(BaseHandler):
    def do_GET(self) -> None:
        self.handle_request("GET")

    def do_PUT(self) -> None:
        self.handle_request("PUT")

    def do_POST(self) -> None:
        self.handle_request("POST")

    def do_DELETE(self) -> None:
        self.handle_request("DELETE")

    def do_HEAD(self) -> None:
        self.handle_request("HEAD")

    def do_PATCH(self) -> None:
        self.handle_request("PATCH")

    def do_OPTIONS(self) -> None:
        self.handle_request("OPTIONS")

    def handle_request(self, method: str) -> None:
        emu = self.server.emulator
        if method not in ("GET", "HEAD"):
            self.read_body()  # keep the connection usable
        path, _, query = self.path.partition("?")
        path = unquote(path)
        _, version, rel = [*path.split("/", 2), "", ""][:3]
        rel_path = rel if version in VERSIONS else None
        rule = emu.faults.take(path, rel_path, method)
        if rule is not None:
            self.apply_fault(rule, method, path, rel_path, query)
            return
        status, body = self.answer(method, path, rel_path, query)
        emu.record(path, method, status)
        self.write(status, body)

    def answer(self, method: str, path: str, rel: str | None, query: str) -> tuple[int, bytes]:
        emu = self.server.emulator
        if rel is None:
            if path == "/" and method == "GET":
                return 200, VERSIONS_LISTING
            return 404, b"Not Found"
        if rel == "api/token":
            return self.issue_token(method)
        if method != "GET":
            return 405, b"Method Not Allowed"
        refused = self.refusal()
        if refused is not None:
            return refused
        node = emu.tree.lookup(rel)
        if node is None:
            return 404, b"Not Found"
        if node.kind != tree.DYNAMIC:
            return 200, node.data
        body = emu.dynamic_leaf(node.name, rel, parse_qs(query) if query else {})
        return (404, b"Not Found") if body is None else (200, body)

    def issue_token(self, method: str) -> tuple[int, bytes]:
        """``PUT /latest/api/token``: a token for the asked TTL (1..21600 s)."""
        if method != "PUT":
            return 405, b"Method Not Allowed"
        if self.headers.get("X-Forwarded-For") is not None:
            return 403, b"Forbidden"
        ttl = parse_ttl(self.headers.get(TTL_HEADER))
        if ttl is None:
            return 400, b"Bad Request: token ttl must be an integer in 1..21600"
        return 200, self.server.emulator.tokens.issue(ttl).encode()

    def refusal(self) -> tuple[int, bytes] | None:
        """401 for a bad token, 403 for none where tokens are required; else None."""
        emu = self.server.emulator
        token = self.headers.get(TOKEN_HEADER)
        if token is not None:
            return None if emu.tokens.valid(token) else (401, b"Unauthorized")
        return (403, b"Forbidden") if emu.token_required else None

    def apply_fault(
        self, rule: FaultRule, method: str, path: str, rel: str | None, query: str
    ) -> None:
        emu = self.server.emulator
        spec = rule.spec
        if spec.latency > 0:
            emu.pause(spec.latency)
        kind = spec.kind
        if kind == "hang":
            while not rule.released.wait(0.05):
                if emu.stopping:
                    break
            if not rule.released.is_set():
                emu.record(path, method, 0)
                self.close_connection = True
                return
            kind = "latency"  # released: answer normally
        if kind == "reset":
            emu.record(path, method, 0)
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
            return
        if kind == "status":
            body = (spec.body if spec.body is not None else _REASONS.get(spec.status, "")).encode()
            emu.record(path, method, spec.status)
            self.write(spec.status, body)
            return
        if kind == "body":
            emu.record(path, method, 200)
            self.write(200, (spec.body or "").encode())
            return
        status, body = self.answer(method, path, rel, query)
        emu.record(path, method, status)
        if kind == "truncate":
            self.close_connection = True
            self.write(status, body[: len(body) // 2], declared_length=max(len(body), 1))
            return
        self.write(status, body)
