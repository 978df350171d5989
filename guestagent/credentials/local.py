"""A client of the local credential server: the CLI's probes, the demo and the tests use it."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class LocalError(Exception):
    """The local server answered with an error (status, code, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the credential server's Unix socket (what ``curl --unix-socket`` does)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def local_get(
    conn: http.client.HTTPConnection, path: str, token: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": token} if token else {}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as exc:
        raise LocalError(0, f"credential server unreachable: {exc.strerror or exc}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise LocalError(resp.status, f"credential server sent non-JSON ({resp.status})") from None
    if resp.status != 200:
        message = doc.get("message", "") if isinstance(doc, dict) else ""
        raise LocalError(resp.status, f"credential server: {resp.status} {message}".strip())
    if not isinstance(doc, dict):
        raise LocalError(resp.status, "credential server sent a non-object")
    return doc
