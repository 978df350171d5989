"""One JSON request and its JSON answer over a local Unix socket.

The daemon's control socket and the tasks hand-over speak it: one connection per request,
a JSON object on one line each way; the server answers ``{"error": "..."}`` when a
request is malformed or its handler fails. Imports nothing of the agent: both the daemon
and the capabilities stand on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guestagent import jsondoc

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
# The daemon's control socket in its run directory: the daemon serves it, and a
# capability's CLI asks it here without importing the daemon.
CONTROL_SOCKET = "control.sock"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class SocketError(Exception):
    """The peer could not be asked, or gave a bad answer (the message says which)."""


class NotListening(SocketError):
    """Nothing listens on the socket: no such file, or connection refused."""


class JsonServer:
    """Answer each connection's request with ``handler(request)``, in one thread.

    The socket is made with ``mode`` (never wider, even for a moment) and removed on
    ``close``. Its owner holds a lock, so a socket file already there is a dead one's.
    """

    def __init__(self, path: Path, handler: Handler, *, name: str, mode: int = 0o600,
                 conn_timeout: float = 5.0) -> None:
        self.path = path
        self.handler = handler
        self.name = name
        self.mode = mode
        self.conn_timeout = conn_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> JsonServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # born owner-only; widened to ``mode`` below
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if not self._closing.is_set():
                    log.debug("%s: accept failed: %s", self.name, exc)
                    self._closing.wait(0.1)
                continue
            with conn:
                conn.settimeout(self.conn_timeout)
                try:
                    conn.sendall(_encode(self._answer(_read_line(conn, MAX_REQUEST))))
                except OSError as exc:
                    log.debug("%s: connection failed: %s", self.name, exc)

    def _answer(self, data: bytes) -> dict[str, Any]:
        try:
            request = jsondoc.loads(data.decode() or "{}")  # a repeated key: refused
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            return self.handler(request)
        except ValueError as exc:
            return {"error": f"bad request: {exc}"}
        except Exception as exc:
            log.exception("%s request failed", self.name)
            return {"error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        self._closing.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._thread is not None:
            self._thread.join(2.0)


def ask(path: Path, request: dict[str, Any], timeout: float,
        peer: str = "the daemon") -> dict[str, Any]:
    """Send ``request`` to the server at ``path`` and return its answer (a JSON object).

    Raises ``NotListening`` when nothing listens there, ``SocketError`` naming ``peer``
    when it cannot be reached or its answer is not a JSON object.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotListening(f"nothing listens on {path}") from None
        except PermissionError:
            raise SocketError(f"cannot reach {peer} at {path}: permission denied") from None
        sock.sendall(_encode(request))
        data = _read_line(sock)
    except OSError as exc:
        raise SocketError(f"cannot reach {peer} at {path}: {exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data.decode())
    except ValueError:
        raise SocketError(f"{peer} at {path} gave a bad answer") from None
    if not isinstance(reply, dict):
        raise SocketError(f"{peer} at {path} gave a bad answer")
    return reply


def _read_line(conn: socket.socket, limit: int | None = None) -> bytes:
    """Bytes up to and including the first newline (or the peer's end, or ``limit``)."""
    data = b""
    while b"\n" not in data and (limit is None or len(data) < limit):
        chunk = conn.recv(limit or 65536)
        if not chunk:
            break
        data += chunk
    return data


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
