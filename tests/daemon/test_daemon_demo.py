"""``guestagent demo`` runs end to end: local cloud, daemon, credentials, storage, spot
drain; and whatever way it ends, nothing it started is left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.agent import subprocess_env
from polling import wait_for

pytestmark = pytest.mark.slow
needs_fuse = pytest.mark.skipif(not Path("/dev/fuse").exists() or os.geteuid() != 0,
                                reason="the demo's OSS mount needs /dev/fuse and root")


def _argv(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "guestagent.cli", "demo", "--workdir", str(workdir),
            "--release-after", "20", "--no-docker", *extra]


def _leftovers(workdir: Path) -> list[str]:
    """Processes whose command line names the work dir, and mounts under it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmdline:
            found.append(f"pid {proc.name}: {cmdline[:120]}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [line for line in mounts.splitlines() if str(workdir) in line]
    return found


@needs_fuse
def test_demo_tells_the_story_and_cleans_up(tmp_path: Path) -> None:
    res = subprocess.run(_argv(tmp_path), capture_output=True, text=True,
                         env=subprocess_env(), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert '"Code": "Success"' in out  # a local program got the role's credentials
    # Storage: the mount served the object's bytes, refused writes, the upload is listed.
    assert "identical to the object" in out
    assert "oss://guestagent-demo/demo/output/levels.json" in out
    assert "matches the demo's own count" in out
    if importlib.util.find_spec("guestagent.tasks.service") is not None:
        # The log-count job ran (host mode) and its merged result in OSS was checked.
        assert "log-count/merge_result.txt" in out and "equals the demo's own count" in out
        assert "Docker mode: skipped, --no-docker given" in out
    # The drain report the daemon left: every step done within the deadline.
    report = json.loads((tmp_path / "state" / "drain.json").read_text())
    assert report["completed"] and report["deadline_held"]
    assert "spot hook 10-stop-app: instance released at" in (tmp_path / "agent.log").read_text()
    assert _leftovers(tmp_path) == []


@needs_fuse
def test_sigterm_mid_demo_stops_everything_it_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(_argv(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    try:
        # Once the daemon's mount is up, the demo owns moto, the emulator, the daemon, rclone.
        wait_for(lambda: any("fuse" in line and str(tmp_path) in line
                             for line in Path("/proc/self/mountinfo").read_text().splitlines()),
                 timeout=240)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("guestagent: demo interrupted")
    wait_for(lambda: _leftovers(tmp_path) == [], timeout=30)
