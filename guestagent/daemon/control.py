"""The daemon's local control socket (``run_dir/control.sock``) and its client.

One request per connection: a JSON line ``{"command": "status"}`` in, a JSON line out.
Only facts meant for ``guestagent status`` cross it: never a secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guestagent import jsonsocket

SOCKET_NAME = jsonsocket.CONTROL_SOCKET

Handler = jsonsocket.Handler


class ControlError(Exception):
    """The daemon could not be asked (not running, socket refused, bad answer)."""


class ControlServer(jsonsocket.JsonServer):
    """The daemon's end of the control socket (owner and group may ask)."""

    def __init__(self, path: Path, handler: Handler, mode: int = 0o660) -> None:
        super().__init__(path, handler, name="control", mode=mode, conn_timeout=2.0)


def ask(path: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the daemon at ``path`` and return its answer."""
    try:
        reply = jsonsocket.ask(path, {"command": command}, timeout)
    except jsonsocket.NotListening:
        raise ControlError(
            f"no guestagent daemon is running (nothing listens on {path})") from None
    except jsonsocket.SocketError as exc:
        raise ControlError(str(exc)) from None
    if "error" in reply:
        raise ControlError(f"the daemon refused {command!r}: {reply['error']}")
    return reply
