"""Listening sockets handed over by systemd socket activation (``sd_listen_fds``).

systemd passes them as descriptors 3, 4, ... with ``LISTEN_FDS``, ``LISTEN_PID`` and
``LISTEN_FDNAMES`` (each socket unit's ``FileDescriptorName=``). They are read once per
process and kept open here for its whole life: a service that stops and starts again
(supervisor restart, SIGHUP reload) gets the same sockets back, so a listener is never
closed, and its address never free for someone else to take, while the agent runs.
Callers get duplicates, which they may close.
"""

from __future__ import annotations

import os
import socket
import threading

FIRST_FD = 3

_lock = threading.Lock()
# The sockets taken from the environment, by name; absent until first asked.
_taken: dict[str, dict[str, list[socket.socket]]] = {}


def _read(environ: dict[str, str] | os._Environ[str]) -> dict[str, list[socket.socket]]:
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    if pid != os.getpid() or count <= 0:
        return {}  # meant for another process (a parent that exec'd us, say)
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, list[socket.socket]] = {}
    for i in range(count):
        fd = FIRST_FD + i
        name = names[i] if i < len(names) and names[i] else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (a FIFO, say): not ours to use
        os.set_inheritable(fd, False)  # children (hooks, tasks) must not hold our listeners
        out.setdefault(name, []).append(sock)
    return out


def inherited(name: str) -> list[socket.socket]:
    """Duplicates of the sockets systemd passed under ``name`` (empty without systemd)."""
    with _lock:
        if "all" not in _taken:
            _taken["all"] = _read(os.environ)
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(var, None)
        return [s.dup() for s in _taken["all"].get(name, [])]


def reset_for_tests(taken: dict[str, list[socket.socket]] | None = None) -> None:
    """Forget (or set) what was inherited: tests simulate systemd in-process."""
    with _lock:
        _taken.clear()
        if taken is not None:
            _taken["all"] = taken
