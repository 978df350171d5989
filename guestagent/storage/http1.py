"""A small HTTP/1.1 client connection for the S3 client: one request at a time, keep-alive.

Why not ``http.client``: a 4 KiB GET spent ~200 µs of CPU in it (a ``makefile`` reader per
response, headers parsed by the ``email`` package, one ``putheader`` call per header)
against ~80 µs here, and downloads of many small objects are bound by that per-request
cost (bench/storage.py). This module does only what S3 answers need: a status line and
headers read with one buffer, bodies sized by ``Content-Length`` read straight into the
caller's buffer (no copy through a reader) or spliced into the caller's file, ``chunked``
and read-to-close bodies (error pages, some listings) read whole, ``HEAD``/204/304
without a body, 1xx skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import struct
from collections.abc import Mapping
from typing import Protocol

HEAD_LIMIT = 64 * 1024  # a status line and headers longer than this are refused
RECV = 64 * 1024
BODY_LIMIT = 64 * 1024 * 1024  # a chunked or read-to-close body is held in memory
PIPE_SIZE = 1024 * 1024  # a body spliced into a file moves through a pipe this large
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_BODY_METHODS = frozenset({"PUT", "POST", "PATCH"})


class Disconnected(ConnectionError):
    """The server closed the connection before sending a status line (a stale keep-alive
    connection, or a server going away)."""


class ProtocolError(ConnectionError):
    """The answer broke HTTP/1.1 framing (cut short, malformed): the connection is dropped."""


class FileWriteError(Exception):
    """Writing a body into the caller's file failed (disk full, ...): not the server's
    fault, so not an ``OSError`` that a retry loop would take for a network failure."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(exc.strerror or str(exc))
        self.errno = exc.errno


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as exc:
        raise FileWriteError(exc) from exc


class Connection:
    """One TCP (or TLS) connection to ``host:port``; ``sock`` is None until connected."""

    def __init__(self, host: str, port: int, *, timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self.sock: socket.socket | None = None
        self._buf = b""  # bytes received past what has been consumed
        self._pipe: tuple[int, int] | None = None  # for bodies spliced into files
        self._scratch: memoryview | None = None  # for bodies copied into files (TLS)

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            # Connected: from here the kernel keeps the timeout (SO_RCVTIMEO/SO_SNDTIMEO on
            # a blocking socket). Python's own timeout polls before every send and recv: two
            # more system calls, and two more GIL hand-offs, per request.
            sock.settimeout(None)
            seconds = int(self.timeout)
            timeval = struct.pack("ll", seconds, int((self.timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buf = b""
        if self._pipe is not None:  # it may hold bytes of a body cut short
            for end in self._pipe:
                os.close(end)
            self._pipe = None

    # -- request -------------------------------------------------------------------------

    def send(self, method: str, target: str, headers: Mapping[str, str],
             body: bytes | memoryview | None, stream: _Readable | None = None) -> None:
        """Send one request. ``body`` is sent as is; ``stream`` (with ``len``) is read in
        blocks. A ``Content-Length`` is added when the caller did not give one."""
        assert self.sock is not None
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                raise ValueError(f"header {name}: line breaks are not allowed in a value")
            lines.append(f"{name}: {value}\r\n")
        if not any(name.lower() == "content-length" for name in headers):
            size = len(stream) if stream is not None else len(body) if body else 0
            if size or method in _BODY_METHODS:
                lines.append(f"content-length: {size}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        sock = self.sock
        if body and len(body) <= RECV:
            sock.sendall(head + bytes(body))
            return
        sock.sendall(head)
        if body:
            sock.sendall(body)
        elif stream is not None:
            while block := stream.read(1024 * 1024):
                sock.sendall(block)

    # -- response ------------------------------------------------------------------------

    def response(self, method: str) -> Response:
        """Read the status line and headers of the answer to a ``method`` request."""
        while True:
            status, version, headers = self._read_head()
            if not (100 <= status < 200):
                break
        close = "close" in headers.get("connection", "").lower() or (
            version == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower()
        )
        resp = Response(self, status, headers, close)
        if method == "HEAD" or status in (204, 304):
            resp.left = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            resp.hold(self._read_chunked())
        elif "content-length" in headers:
            try:
                resp.left = int(headers["content-length"])
            except ValueError:
                raise ProtocolError(
                    f"bad Content-Length {headers['content-length']!r}"
                ) from None
            if resp.left < 0:
                raise ProtocolError(f"bad Content-Length {resp.left}")
        else:
            resp.will_close = True
            resp.hold(self._read_to_close())
        return resp

    def _recv(self) -> bytes:
        assert self.sock is not None
        return self.sock.recv(RECV)

    def _read_head(self) -> tuple[int, str, dict[str, str]]:
        buf = self._buf
        start = 0
        while (end := buf.find(b"\r\n\r\n", start)) < 0:
            if len(buf) > HEAD_LIMIT:
                raise ProtocolError("answer headers over 64 KiB")
            start = max(0, len(buf) - 3)
            more = self._recv()
            if not more:
                if buf:
                    raise ProtocolError("connection closed inside the answer's headers")
                raise Disconnected("the server closed the connection without answering")
            buf += more
        self._buf = buf[end + 4:]
        lines = buf[:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue  # obsolete line folding and junk: nothing S3 sends
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return int(code), version, headers

    def take(self, view: memoryview, want: int) -> int:
        """Fill ``view[:want]`` from what is buffered, then from the socket."""
        n = 0
        if self._buf:
            n = min(want, len(self._buf))
            view[:n] = self._buf[:n]
            self._buf = self._buf[n:]
        sock = self.sock
        assert sock is not None
        # Plain TCP: one call fills the block (MSG_WAITALL), however the bytes arrive in
        # segments; each return to Python is a GIL hand-off between the transfer threads.
        # It still returns early on the end of the stream, a timeout or a signal, and TLS
        # sockets take no flags (their records are read whole anyway).
        flags = 0 if self.tls is not None else socket.MSG_WAITALL
        while n < want:
            got = sock.recv_into(view[n:want], 0, flags)
            if not got:
                if n:
                    return n  # what did arrive counts; the next read names the cut
                raise ProtocolError("connection closed before the body's end")
            n += got
        return n

    def take_file(self, fd: int, offset: int, want: int) -> int:
        """Move up to ``want`` body bytes into the file ``fd`` at ``offset``; how many.
        Plain TCP: spliced socket -> pipe -> file, never through Python: the kernel hands
        the socket's pages to the page cache (recv + pwrite cost three times the system
        time, bench/storage.py). TLS: decrypted into a buffer, then written."""
        if self._buf:
            n = min(want, len(self._buf))
            pwrite_all(fd, self._buf[:n], offset)
            self._buf = self._buf[n:]
            return n
        assert self.sock is not None
        if self.tls is not None:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(RECV * 4))
            n = self.take(self._scratch, min(want, len(self._scratch)))
            pwrite_all(fd, self._scratch[:n], offset)
            return n
        source, sink = self._pipe or self._open_pipe()
        got = os.splice(self.sock.fileno(), sink, min(want, PIPE_SIZE))
        if not got:
            raise ProtocolError("connection closed before the body's end")
        done = 0
        try:
            while done < got:
                done += os.splice(source, fd, got - done, offset_dst=offset + done)
        except OSError as exc:
            raise FileWriteError(exc) from exc
        return got

    def _open_pipe(self) -> tuple[int, int]:
        source, sink = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over the system's limit: the default size
            fcntl.fcntl(sink, _SETPIPE_SZ, PIPE_SIZE)
        self._pipe = (source, sink)
        return self._pipe

    def _read_line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > HEAD_LIMIT:
                raise ProtocolError("chunk header over 64 KiB")
            more = self._recv()
            if not more:
                raise ProtocolError("connection closed inside a chunked body")
            self._buf += more
        line, self._buf = self._buf[:end], self._buf[end + 2:]
        return line

    def _read_exact(self, n: int) -> bytes:
        out = bytearray(n)
        self.take(memoryview(out), n)
        return bytes(out)

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._read_line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            total += size
            if total > BODY_LIMIT:
                raise ProtocolError("chunked answer over 64 MiB")
            parts.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")

    def _read_to_close(self) -> bytes:
        parts = [self._buf]
        self._buf = b""
        total = len(parts[0])
        while more := self._recv():
            total += len(more)
            if total > BODY_LIMIT:
                raise ProtocolError("answer without a length over 64 MiB")
            parts.append(more)
        return b"".join(parts)


class _Readable(Protocol):
    """What a streamed request body offers (``FileSlice``)."""

    def __len__(self) -> int: ...

    def read(self, size: int = -1) -> bytes: ...


class Response:
    """Status, lower-case headers, and the body to read with ``readinto`` or ``read``."""

    def __init__(self, conn: Connection, status: int, headers: dict[str, str],
                 will_close: bool) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        self.will_close = will_close
        self.left = 0  # body bytes still to come from the connection
        self._held: memoryview | None = None  # a body already read whole

    def hold(self, body: bytes) -> None:
        self._held = memoryview(body)

    @property
    def reusable(self) -> bool:
        """The body was read to its end and the server keeps the connection open."""
        return not self.will_close and self.left == 0

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` as far as the body goes; 0 at the end of the body."""
        view = memoryview(buf)
        if self._held is not None:
            n = min(len(view), len(self._held))
            view[:n] = self._held[:n]
            self._held = self._held[n:] or None
            return n
        want = min(len(view), self.left)
        if want <= 0:
            return 0
        n = self.conn.take(view, want)
        self.left -= n
        return n

    def take_file(self, fd: int, offset: int, want: int) -> int:
        """Move up to ``want`` bytes of the body into the file ``fd`` at ``offset``; how
        many, 0 at the end of the body. A failed write raises ``FileWriteError``."""
        if self._held is not None:
            n = min(want, len(self._held))
            pwrite_all(fd, self._held[:n], offset)
            self._held = self._held[n:] or None
            return n
        want = min(want, self.left)
        if want <= 0:
            return 0
        n = self.conn.take_file(fd, offset, want)
        self.left -= n
        return n

    def read(self) -> bytes:
        """The rest of the body."""
        if self._held is not None:
            data, self._held = bytes(self._held), None
            return data
        if self.left <= 0:
            return b""
        if self.left > BODY_LIMIT:
            raise ProtocolError(f"answer body of {self.left} bytes is too large to hold")
        out = bytearray(self.left)
        self.readinto(out)
        return bytes(out)
