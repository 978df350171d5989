"""``guestagent demo``: placeholder, written once the emulator lands."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    pass
