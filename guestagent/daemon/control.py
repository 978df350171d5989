"""The daemon's local control socket (``run_dir/control.sock``) and its client.

One request per connection: a JSON line ``{"command": "status"}`` in, a JSON line out.
Only facts meant for ``guestagent status`` cross it: never a secret.
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

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The daemon could not be asked (not running, socket refused, bad answer)."""


class ControlServer:
    def __init__(self, path: Path, handler: Handler, mode: int = 0o660) -> None:
        self.path = path
        self.handler = handler
        self.mode = mode
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # We hold the daemon lock, so a socket file left here is from a dead daemon.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(self.path))
        os.chmod(self.path, self.mode)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    self._answer(conn)
                except OSError as exc:
                    log.debug("control connection failed: %s", exc)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data.decode() or "{}")
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            reply = self.handler(request)
        except ValueError as exc:
            reply = {"error": f"bad request: {exc}"}
        except Exception as exc:
            log.exception("control request failed")
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._closing.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._thread is not None:
            self._thread.join(2.0)


def ask(path: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the daemon at ``path`` and return its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"no guestagent daemon is running (nothing listens on {path})"
            ) from None
        except PermissionError:
            raise ControlError(f"cannot reach the daemon at {path}: permission denied") from None
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ControlError(f"cannot reach the daemon at {path}: {exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data.decode())
    except ValueError:
        raise ControlError(f"the daemon at {path} gave a bad answer") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon at {path} gave a bad answer")
    if "error" in reply:
        raise ControlError(f"the daemon refused {command!r}: {reply['error']}")
    return reply
