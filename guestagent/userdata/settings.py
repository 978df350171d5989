"""Settings of first-boot user-data handling: section ``[userdata]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UserdataSettings:
    enabled: bool = True

    def validate(self) -> None:
        pass
