"""First boot in two stages, as cloud-init does it.

* ``local``: before sshd and ``network-online.target`` — the configuration handlers (DNS,
  NTP, repositories, accounts and keys, sshd settings, files).
* ``final``: after ``network-online.target`` — user-data shell scripts and ``runcmd``
  (where package operations belong too), so a script may start a unit that is ordered
  after the network without waiting on itself.

No stage named means both, in order (``userdata apply`` by hand, the daemon's fallback).
Each stage leaves ``<state>/userdata/stage-<name>.json`` with UTC start and end times and
its outcomes, so a booted system shows what ran when; every apply holds
``<state>/userdata/apply.lock`` (the CLI, both units and the daemon take the same one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestagent.files import atomic_write
from guestagent.userdata.errors import UserdataError

LOCAL, FINAL = "local", "final"
STAGES = (LOCAL, FINAL)


def check_stage(stage: str | None) -> str | None:
    if stage is not None and stage not in STAGES:
        raise UserdataError(f"stage {stage!r}: want {' or '.join(STAGES)}")
    return stage


def runs(stage: str | None, part_stage: str) -> bool:
    """Whether work of ``part_stage`` runs in ``stage`` (None: every stage)."""
    return stage is None or stage == part_stage


class Busy(UserdataError):
    """Another apply holds the lock."""


@contextlib.contextmanager
def apply_lock(state_dir: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold ``<state>/userdata/apply.lock`` (flock: dropped by the kernel if we die);
    wait up to ``wait`` seconds for another apply to finish, then raise Busy."""
    path = state_dir / "userdata" / "apply.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    raise Busy(
                        f"another user-data apply is running{who}: it holds {path}; "
                        "try again when it has finished"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(state_dir: Path, stage: str | None, body: str) -> Path:
    """Write ``stage-<stage>.json`` (``stage-all.json`` when both ran at once); 0600 like
    last-run.json, since an outcome's detail may quote the user-data."""
    return atomic_write(state_dir / "userdata" / f"stage-{stage or 'all'}.json", body, mode=0o600)


def read(state_dir: Path, stage: str) -> dict[str, Any] | None:
    """A stage's record, or None when it has not run here."""
    try:
        data = json.loads((state_dir / "userdata" / f"stage-{stage}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
