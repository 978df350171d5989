"""Handing a stored job to the daemon's tasks service: ``<run_dir>/tasks.sock`` (0600).

One JSON line per connection each way: ``{"command": "run", "job": ID, "resume": bool}``
in, ``{"job": ID}`` or ``{"error": "..."}`` out. Only job ids cross it, never a secret.
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

from guestagent.tasks.errors import TaskError

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class HandoffServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None

    def start(self) -> HandoffServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # the daemon holds its lock: a socket here is a dead one's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._serve, name="tasks-handoff", daemon=True).start()
        return self

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(self._answer(_read_line(conn))).encode() + b"\n")

    def _answer(self, data: bytes) -> dict[str, Any]:
        try:
            request = json.loads(data.decode() or "{}")
            if not isinstance(request, dict):
                raise ValueError("want a JSON object")
            return self.handler(request)
        except ValueError as exc:
            return {"error": f"bad request: {exc}"}
        except Exception as exc:
            log.exception("tasks hand-over failed")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data


def ask(path: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon listens at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(10.0)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = _read_line(sock)
    except OSError as exc:
        raise TaskError(f"cannot reach the daemon at {path}: {exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data.decode())
    except ValueError:
        raise TaskError(f"the daemon at {path} gave a bad answer") from None
    if not isinstance(reply, dict):
        raise TaskError(f"the daemon at {path} gave a bad answer")
    return reply
