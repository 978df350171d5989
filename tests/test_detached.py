"""Work that outlives the agent (no systemd here: the session-and-record fallback; the
transient-unit way is proven in tests/system)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from polling import wait_for

from guestagent import detached, process

AGENT = """
import sys
from pathlib import Path
from guestagent import detached, process
process.set_owner(sys.argv[1])
process.end_orphans()
run_dir = Path(sys.argv[2])
found = detached.adopt("worker", run_dir=run_dir)
if found is None:
    found = detached.start("worker", ["sleep", "300"], run_dir=run_dir)
    print("started", found.pid, flush=True)
else:
    print("adopted", found.pid, flush=True)
process.run(["sleep", "300"], timeout=300)  # an ordinary child, killed with this agent
"""


def agent(tmp_path: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", AGENT, str(tmp_path / "state"),
                             str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                            text=True)


def test_detached_work_survives_an_agent_kill_and_is_adopted(tmp_path: Path) -> None:
    if process.systemd_running():
        pytest.skip("systemd is PID 1 here: the transient-unit way applies (tests/system)")
    first = agent(tmp_path)
    assert first.stdout is not None
    word, pid = first.stdout.readline().split()
    assert word == "started"
    try:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        again = agent(tmp_path)
        assert again.stdout is not None
        # Still running after kill -9 and the next agent's orphan sweep, and adopted.
        assert again.stdout.readline().split() == ["adopted", pid]
        found = detached.adopt("worker", run_dir=tmp_path / "run")
        assert found is not None and found.running() and found.init == "none"
        again.send_signal(signal.SIGKILL)
        again.wait(30)
        found.stop(grace=1.0, run_dir=tmp_path / "run")
        wait_for(lambda: not found.running())
        assert detached.adopt("worker", run_dir=tmp_path / "run") is None
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def test_a_reused_pid_is_not_adopted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "detached").mkdir(parents=True)
    # A record naming a live process that is not the one started (wrong start time).
    (run / "detached" / "worker.json").write_text(f'{{"pid": {os.getpid()}, "started": 1.0}}')
    assert detached.adopt("worker", run_dir=run) is None


def test_bad_names_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use letters, digits"):
        detached.start("../x", ["true"], run_dir=tmp_path)
    assert not (tmp_path / "detached").exists()
