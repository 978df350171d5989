"""Hook directories: name order, environment, per-hook timeout, the deadline, skipped files."""

from __future__ import annotations

import time
from pathlib import Path

from fixtures.agent import write_hook

from guestagent.hooks import list_hooks, run_hooks


def test_hooks_run_in_name_order_with_env(tmp_path: Path) -> None:
    d, out = tmp_path / "spot.d", tmp_path / "out"
    for name in ("20-b", "10-a", "30-c"):
        write_hook(d, name, f'echo "{name} $GUESTAGENT_TERMINATION_TIME" >> {out}')
    results = run_hooks(d, {"GUESTAGENT_TERMINATION_TIME": "2030-01-01T00:00:00Z"}, 5)
    assert [r.name for r in results] == ["10-a", "20-b", "30-c"]
    assert all(r.ok for r in results)
    assert out.read_text().splitlines() == [
        "10-a 2030-01-01T00:00:00Z", "20-b 2030-01-01T00:00:00Z", "30-c 2030-01-01T00:00:00Z"]


def test_hanging_hook_is_killed_and_the_next_runs(tmp_path: Path) -> None:
    d, out = tmp_path / "spot.d", tmp_path / "out"
    write_hook(d, "10-hang", "sleep 60")
    write_hook(d, "20-next", f"echo next >> {out}")
    results = run_hooks(d, {}, 0.3)
    assert results[0].timed_out and not results[0].ok
    assert results[1].ok and out.read_text() == "next\n"


def test_deadline_caps_timeouts_and_skips_late_hooks(tmp_path: Path) -> None:
    d = tmp_path / "spot.d"
    write_hook(d, "10-hang", "sleep 60")
    write_hook(d, "20-late", "true")
    deadline = time.monotonic() + 0.3
    results = run_hooks(d, {}, 60, deadline=lambda: deadline)
    assert results[0].timed_out and results[0].seconds < 2
    assert results[1].error == "skipped: deadline passed"


def test_failing_and_unstartable_hooks_are_reported(tmp_path: Path) -> None:
    d = tmp_path / "spot.d"
    write_hook(d, "10-fail", "echo oops >&2; exit 3")
    bad = d / "20-noshebang"
    bad.write_bytes(b"\x00\x01binary")
    bad.chmod(0o755)
    results = run_hooks(d, {}, 5)
    assert results[0].returncode == 3
    assert results[1].error and "cannot start" in results[1].error


def test_non_executables_backups_and_dirs_are_ignored(tmp_path: Path) -> None:
    d = tmp_path / "spot.d"
    write_hook(d, "10-ok", "true")
    write_hook(d, "10-ok~", "true")
    write_hook(d, ".hidden", "true")
    write_hook(d, "30-old.dpkg-old", "true")
    (d / "20-plain").write_text("#!/bin/sh\n")
    (d / "40-dir").mkdir()
    assert [p.name for p in list_hooks(d)] == ["10-ok"]
    assert list_hooks(tmp_path / "missing") == []
