"""Names the booted tests share (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from guestagent.images import rootfs

CACHE = Path(os.environ.get("GUESTAGENT_TEST_CACHE", "/var/cache/guestagent-test"))
RECIPE = rootfs.Recipe()


def agent_toml(emulator: Any, extra: str = "") -> str:
    """The guest's /etc/guestagent/agent.toml: the agent pointed at ``emulator``."""
    return f'[metadata]\nurl = "{emulator.url}"\n' + extra
