"""Settings of the daemon (supervisor, state, status socket): section ``[daemon]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = Path("/var/lib/guestagent")
    run_dir: Path = Path("/run/guestagent")
    log_level: str = "INFO"

    def validate(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
