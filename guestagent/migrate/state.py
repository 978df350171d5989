"""``client_data``: what the migration has done so far, beside user_config.json.

One JSON document rewritten atomically (mode 0600) after every unit of work — a step
finished, an instance created, a disk sent — so a kill -9 at any point repeats at most the
unit that was running. It holds no secret: the one-time SSH key is a separate 0600 file
whose path is recorded here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestagent.files import atomic_write

STATE_FILE = "client_data"
KEY_DIR = "client_keys"


@dataclass
class State:
    path: Path
    version: int = 1
    image_name: str = ""
    client_token: str = ""
    instance_id: str = ""
    image_id: str = ""
    done: list[str] = field(default_factory=list)
    current: str = ""
    attempts: dict[str, int] = field(default_factory=dict)
    rsync_pid: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    transfers: dict[str, dict[str, int]] = field(default_factory=dict)
    result: str = ""
    last_error: list[str] = field(default_factory=list)
    log_file: str = ""
    updated_at: str = ""
    pid: int = 0

    @classmethod
    def load(cls, directory: Path) -> State:
        path = directory / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable ({exc}); move it away to start over") from None
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "path"}
        return cls(path, **known)

    def save(self, durable: bool = True) -> None:
        """``durable=False`` for progress notes only (``status`` reads them; resuming
        never depends on them)."""
        self.updated_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.pid = os.getpid()
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600,
                     durable=durable)

    def mark_done(self, step: str) -> None:
        if step not in self.done:
            self.done.append(step)
        self.current = ""
        self.save()

    def forget_instance(self) -> None:
        """The intermediate instance is gone: everything sent to it must be sent again."""
        self.instance_id = ""
        self.done = [s for s in self.done if s == "prechecks"]
        self.transfers = {}
        self.save()

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "path"} | {"path": str(self.path)}
