"""`guestagent run --once NAME` with a name no service has is refused before the daemon
lock (which creates the state and run directories) is taken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_an_unknown_service_name_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                                         f'run_dir = "{tmp_path / "run"}"\n')
    env = dict(os.environ, GUESTAGENT_CONFIG=str(tmp_path / "agent.toml"))
    done = subprocess.run([sys.executable, "-m", "guestagent", "run", "--once", "nosuch"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("guestagent: cannot start the daemon: no such enabled service: "
                           "nosuch\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]
