"""process.run/spawn end what they start: the group, and descendants that escaped it
(``setsid … &``); reading output never waits on a pipe an escaped grandchild keeps open;
groups are ended on their own; orphans of a killed agent are found by the next one."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import gone, wait_for

from guestagent import process


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip()))


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Pids a test started indirectly: killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    process.reap_adopted()


@pytest.fixture(params=[True, False], ids=["subreaper", "no-subreaper"])
def reaper(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Both ways of finding escaped descendants: re-parented to us, or anywhere by tag."""
    monkeypatch.setitem(process._state, "subreaper", False)
    if request.param:
        assert process.become_subreaper()
    yield bool(request.param)
    # The test process goes back to being an ordinary parent (other tests expect orphans
    # to go to init).
    ctypes.CDLL(None, use_errno=True).prctl(process._PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    process.reap_adopted()


def test_output_is_not_held_hostage_by_an_escaped_grandchild(tmp_path: Path,
                                                             cleanup: list[int]) -> None:
    pid_file = tmp_path / "bg.pid"
    # The background job keeps stdout/stderr open (inherited) and outlives the hook.
    script = f"setsid sleep 300 & echo $! > {pid_file}; echo done"
    res = process.run(["sh", "-c", script], timeout=120)
    bg = read_pid(pid_file)
    cleanup.append(bg)
    # Returned with the hook's own output while the job still holds the pipe: had run()
    # waited for end of file, it would have waited until the 120 s timeout killed the job.
    assert res.ok and res.stdout == b"done\n" and not res.timed_out
    assert not gone(bg)


def test_at_the_deadline_escaped_descendants_are_killed_too(
    tmp_path: Path, cleanup: list[int], reaper: bool
) -> None:
    pid_file = tmp_path / "bg.pid"
    script = f"setsid sleep 300 > /dev/null 2>&1 & echo $! > {pid_file}; sleep 300"
    res = process.run(["sh", "-c", script], timeout=1.0)
    bg = read_pid(pid_file)
    cleanup.append(bg)
    assert res.timed_out and res.leftovers == 1
    wait_for(lambda: gone(bg))


def test_a_double_fork_with_a_cleared_group_is_still_found(tmp_path: Path,
                                                           cleanup: list[int]) -> None:
    pid_file = tmp_path / "bg.pid"
    # Daemonised twice over: new session, parent gone at once.
    script = f"(setsid sh -c 'sleep 300 & echo $! > {pid_file}' &) ; sleep 300"
    res = process.run(["sh", "-c", script], timeout=1.0)
    bg = read_pid(pid_file)
    cleanup.append(bg)
    assert res.timed_out
    wait_for(lambda: gone(bg))


def test_end_group_ends_only_that_group(tmp_path: Path, cleanup: list[int]) -> None:
    import threading

    pids = {name: tmp_path / f"{name}.pid" for name in ("drain", "maintenance")}
    results: dict[str, process.Result] = {}

    def hook(group: str) -> None:
        script = f"setsid sleep 300 > /dev/null 2>&1 & echo $! > {pids[group]}; sleep 300"
        results[group] = process.run(["sh", "-c", script], timeout=120, group=group)

    threads = [threading.Thread(target=hook, args=(g,)) for g in pids]
    for t in threads:
        t.start()
    bg = {g: read_pid(p) for g, p in pids.items()}
    cleanup.extend(bg.values())
    assert process.end_group("drain") >= 2  # the hook and its escaped job
    threads[0].join(30)
    assert results["drain"].returncode == -signal.SIGKILL
    wait_for(lambda: gone(bg["drain"]))
    assert not gone(bg["maintenance"]) and "maintenance" not in results
    process.end_group("maintenance")
    threads[1].join(30)
    wait_for(lambda: gone(bg["maintenance"]))


def test_what_a_finished_hook_left_behind_ends_with_its_group(tmp_path: Path,
                                                              cleanup: list[int]) -> None:
    pid_file = tmp_path / "bg.pid"
    script = f"setsid sleep 300 > /dev/null 2>&1 & echo $! > {pid_file}"
    assert process.run(["sh", "-c", script], group="drain-test").ok
    bg = read_pid(pid_file)
    cleanup.append(bg)
    assert not gone(bg)
    assert process.end_group("drain-test") == 1
    wait_for(lambda: gone(bg))


def test_spawned_child_stop_ends_its_escaped_descendants(tmp_path: Path,
                                                         cleanup: list[int]) -> None:
    pid_file = tmp_path / "bg.pid"
    child = process.spawn(["sh", "-c", f"setsid sleep 300 & echo $! > {pid_file}; sleep 300"])
    bg = read_pid(pid_file)
    cleanup.extend([bg, child.pid])
    child.stop(grace=0.5)
    wait_for(lambda: gone(bg))


def test_the_next_agent_ends_what_a_killed_one_left(tmp_path: Path,
                                                    cleanup: list[int]) -> None:
    pid_file = tmp_path / "bg.pid"
    owner = str(tmp_path / "state")
    code = (
        "from guestagent import process\n"
        f"process.set_owner({owner!r})\n"
        f"process.run(['sh', '-c', 'sleep 300 & echo $! > {pid_file}; wait'], timeout=300)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    agent = subprocess.Popen([sys.executable, "-c", code], env=env)
    bg = read_pid(pid_file)
    cleanup.append(bg)
    agent.send_signal(signal.SIGKILL)
    agent.wait(60)
    assert not gone(bg)
    previous = process._state["owner"]
    try:
        process.set_owner(str(tmp_path / "other"))
        assert process.end_orphans() == 0  # another agent's children: never touched
        process.set_owner(owner)
        assert process.end_orphans() >= 1
    finally:
        process._state["owner"] = previous
    wait_for(lambda: gone(bg))


def test_children_do_not_inherit_the_agents_oom_protection() -> None:
    # The agent's unit sets OOMScoreAdjust=-500; its hooks must not be protected with it.
    code = (
        "import sys\n"
        "from guestagent import process\n"
        "open('/proc/self/oom_score_adj', 'w').write('-500')\n"
        "res = process.run(['cat', '/proc/self/oom_score_adj'])\n"
        "sys.stdout.write(res.text())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
