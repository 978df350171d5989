"""Run the executables of a hook directory (``spot.d``, ``maintenance.d``) in name order.

Each hook gets its own timeout, never more than what is left before the deadline; its output
is logged line by line; one failing or hanging hook never stops the next. A hook runs in its
own process group and whatever it leaves behind (``setsid sleep 600 &``) is ended with it
(see :func:`guestagent.process.run`).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from guestagent import process

log = logging.getLogger(__name__)

PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                         "LISTEN_PID", "LISTEN_FDNAMES"})
SKIPPED = "skipped: deadline passed"
MAX_LOGGED_LINES = 200  # per stream: a chatty hook must not flood the journal


@dataclass(frozen=True)
class HookResult:
    name: str
    returncode: int | None
    seconds: float
    timed_out: bool = False
    error: str | None = None  # could not start, or skipped (deadline passed)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3), "ok": self.ok}


def list_hooks(directory: Path) -> list[Path]:
    """Executable regular files of ``directory`` in name order (missing dir: none).

    Editor backups and packaging leftovers are ignored so a half-edited hook never runs."""
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list hooks in %s: %s", directory, exc)
        return []
    hooks = []
    for path in entries:
        name = path.name
        if name.startswith(".") or name.endswith(("~", ".dpkg-old", ".dpkg-new", ".rpmnew",
                                                  ".rpmsave", ".disabled", ".swp")):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if not os.access(path, os.X_OK):
            log.warning("hook %s is not executable: skipped", path)
            continue
        hooks.append(path)
    return hooks


def hook_env(env: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment without systemd's private variables, plus ``env``."""
    inherited = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
    return {**inherited, **env}


def run_hook(hook: Path, env: Mapping[str, str], limit: float, kind: str = "hook", *,
             group: str | None = None, die_with_parent: bool = False) -> HookResult:
    """Run one hook (``env`` complete, see :func:`hook_env`) for at most ``limit`` seconds.
    ``group`` tags its process so that only this group's hooks can be ended early;
    ``die_with_parent``: it does not outlive the agent."""
    log.info("running %s %s (timeout %.1fs)", kind, hook.name, limit)
    began = time.monotonic()
    try:
        res = process.run([str(hook)], timeout=limit, env=env, cwd="/", group=group,
                          die_with_parent=die_with_parent)
    except process.ProcessError as exc:
        log.error("%s %s could not start: %s", kind, hook.name, exc)
        return HookResult(hook.name, None, time.monotonic() - began, error=str(exc))
    _log_output(kind, hook.name, "stdout", res.stdout)
    _log_output(kind, hook.name, "stderr", res.stderr)
    if res.timed_out:
        log.error("%s %s killed after its %.1fs timeout", kind, hook.name, limit)
    elif res.returncode != 0:
        log.error("%s %s exited %s after %.2fs", kind, hook.name, res.returncode, res.seconds)
    else:
        log.info("%s %s done in %.2fs", kind, hook.name, res.seconds)
    return HookResult(hook.name, res.returncode, res.seconds, res.timed_out)


def run_hooks(
    directory: Path,
    env: Mapping[str, str],
    timeout: float,
    deadline: Callable[[], float] = lambda: math.inf,
    kind: str = "hook",
    *,
    group: str | None = None,
    progress: Callable[[], None] | None = None,
) -> list[HookResult]:
    """Run every hook of ``directory`` with ``env`` added to the agent's environment.

    ``progress`` is called before each hook. ``deadline`` is read before each hook (a
    ``time.monotonic()`` value) so a deadline that moves earlier meanwhile (SIGTERM during
    a drain) is honoured by the hooks still to run.
    """
    results = []
    full_env = hook_env(env)
    for hook in list_hooks(directory):
        if progress is not None:
            progress()  # e.g. the caller's heartbeat: each hook is bounded by its timeout
        remaining = deadline() - time.monotonic()
        if remaining <= 0:
            log.warning("%s %s skipped: the deadline has passed", kind, hook.name)
            results.append(HookResult(hook.name, None, 0.0, error=SKIPPED))
            continue
        results.append(run_hook(hook, full_env, min(timeout, remaining), kind, group=group))
    return results


def _log_output(kind: str, name: str, stream: str, data: bytes) -> None:
    lines = data.decode(errors="replace").splitlines()
    for line in lines[:MAX_LOGGED_LINES]:
        log.info("%s %s %s: %s", kind, name, stream, line)
    if len(lines) > MAX_LOGGED_LINES:
        log.info("%s %s %s: (%d more lines not logged)", kind, name, stream,
                 len(lines) - MAX_LOGGED_LINES)
