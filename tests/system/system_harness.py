"""Names the booted tests share (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from guestagent.images import rootfs

CACHE = Path(os.environ.get("GUESTAGENT_TEST_CACHE", "/var/cache/guestagent-test"))
RECIPE = rootfs.Recipe()

# Guests share the host's network namespace (they reach the emulator on loopback), so the
# credential server's fixed port 977 would collide between guests booted at once: the
# socket unit keeps only the Unix socket, the agent binds an ephemeral TCP port.
SHARED_HOST_NETWORK = {
    "/etc/systemd/system/guestagent.socket.d/40-test.conf":
        "[Socket]\nListenStream=\nListenStream=/run/guestagent/credentials.sock\n",
    "/etc/systemd/system/guestagent.service.d/40-test.conf":
        "[Service]\nEnvironment=GUESTAGENT_CREDENTIALS_TCP_PORT=0\n",
}


def agent_toml(emulator: Any, extra: str = "") -> str:
    """The guest's /etc/guestagent/agent.toml: the agent pointed at ``emulator``."""
    return f'[metadata]\nurl = "{emulator.url}"\n' + extra
