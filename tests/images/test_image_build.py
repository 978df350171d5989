"""``guestagent image build`` refuses clearly when the machine lacks a tool."""

from __future__ import annotations

import os
import subprocess
import sys


def test_missing_tool_names_its_debian_package(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing to find: debootstrap is missing
    res = subprocess.run(
        [sys.executable, "-m", "guestagent", "image", "build", "-o", str(tmp_path / "x.tar.gz"),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "debootstrap" in res.stderr and "Debian package debootstrap" in res.stderr
    assert not (tmp_path / "x.tar.gz").exists() and not (tmp_path / "cache").exists()
