"""Frequencies ``once`` / ``per-instance`` / ``always``, as semaphore files under the state
directory (cloud-init's scheme): ``per-instance`` ones are keyed on the instance id, so a
baked image re-applies on a new instance and never twice on one."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from guestagent.files import atomic_write
from guestagent.userdata.errors import UserdataError

ONCE, PER_INSTANCE, ALWAYS = "once", "per-instance", "always"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_instance_id(instance_id: str) -> str:
    if not _SAFE.fullmatch(instance_id):
        raise UserdataError(f"instance id {instance_id!r} is not usable as a key")
    return instance_id


class Semaphores:
    def __init__(self, state_dir: Path, instance_id: str) -> None:
        self.base = state_dir / "userdata" / "sem"
        self.instance_id = check_instance_id(instance_id)

    def _path(self, name: str, frequency: str) -> Path | None:
        if frequency == ALWAYS:
            return None
        if not _SAFE.fullmatch(name):
            raise UserdataError(f"semaphore name {name!r} is not safe")
        if frequency == ONCE:
            return self.base / "once" / name
        if frequency == PER_INSTANCE:
            return self.base / f"instance-{self.instance_id}" / name
        raise UserdataError(f"unknown frequency {frequency!r}")

    def done(self, name: str, frequency: str) -> bool:
        path = self._path(name, frequency)
        return path is not None and path.exists()

    def mark(self, name: str, frequency: str) -> None:
        path = self._path(name, frequency)
        if path is not None:
            record = {"instance_id": self.instance_id, "time": int(time.time())}
            atomic_write(path, json.dumps(record) + "\n", mode=0o644)
