"""``guestagent demo`` runs end to end: local cloud, daemon, credentials, spot drain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon_harness import subprocess_env


def test_demo_runs_to_a_clean_drain(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "guestagent.cli", "demo", "--workdir", str(tmp_path),
         "--release-after", "20"],
        capture_output=True, text=True, env=subprocess_env(), timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert '"Code": "Success"' in out
    assert "spot hook 10-stop-app: instance released at" in out
    assert "drain: completed=True deadline_held=True" in out
    assert "the daemon exited 0" in out
    # Storage: input read through the read-only mount, output uploaded and listed.
    if "storage part skipped" not in out:
        assert "1/1 mount(s) ok" in out and "(writing into it fails:" in out
        assert "oss://demo/output/summary.txt" in out
        assert "after the drain: released" in out
