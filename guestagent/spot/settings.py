"""Settings of the spot watcher and drain: section ``[spot]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpotSettings:
    enabled: bool = True
    poll_interval: float = 1.0

    def validate(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval: must be > 0, got {self.poll_interval}")
