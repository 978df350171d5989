"""A file a user names as input (user-data, a job, user_config.json) that is far too big —
a wrong path, a disk image — is refused in one line, never read whole; a device is
refused by its type before it is opened."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = {
    "userdata validate": ("userdata", "validate", "FILE"),
    "userdata apply": ("userdata", "apply", "--file", "FILE", "--instance-id", "i-1",
                       "--dry-run", "--root", "ROOT"),
    "tasks submit": ("tasks", "submit", "FILE", "--foreground"),
    "migrate check": ("migrate", "check", "--config", "FILE"),
}


@pytest.mark.parametrize("source", ["sparse", "/dev/zero"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_oversized_input_file_is_one_line(tmp_path: Path, command: str, source: str) -> None:
    if source == "sparse":
        big = tmp_path / "input.cfg"
        with open(big, "wb") as fh:
            fh.truncate(17 * 1024 * 1024)  # sparse: costs no disk
        name = str(big)
    else:
        name = source
    argv = [name if a == "FILE" else str(tmp_path) if a == "ROOT" else a
            for a in COMMANDS[command]]
    config = tmp_path / "agent.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'run_dir = "{tmp_path / "run"}"\n')
    res = subprocess.run([sys.executable, "-m", "guestagent", *argv], capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, GUESTAGENT_CONFIG=str(config)))
    assert res.returncode == 2, res.stderr
    expected = "larger than 16 MiB" if source == "sparse" else "a character device"
    assert expected in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
