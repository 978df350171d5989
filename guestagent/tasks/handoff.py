"""Handing a stored job to the daemon's tasks service: ``<run_dir>/tasks.sock`` (0600).

One JSON line per connection each way: ``{"command": "run", "job": ID, "resume": bool}``
in, ``{"job": ID}`` or ``{"error": "..."}`` out. Only job ids cross it, never a secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guestagent import jsonsocket
from guestagent.tasks.errors import TaskError

Handler = jsonsocket.Handler


class HandoffServer(jsonsocket.JsonServer):
    """The tasks service's end of the socket (owner-only)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        super().__init__(path, handler, name="tasks-handoff", mode=0o600, conn_timeout=5.0)


def ask(path: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon listens at ``path``."""
    try:
        return jsonsocket.ask(path, request, timeout=10.0)
    except jsonsocket.NotListening:
        return None
    except jsonsocket.SocketError as exc:
        raise TaskError(str(exc)) from None
