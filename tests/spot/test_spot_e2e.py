"""The real daemon process against the emulator: notices, drains, deadlines, faults."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from daemon_probes import events
from fixtures.agent import write_hook
from polling import gone, wait_for

from guestagent.drain import load_report


def test_notice_runs_hooks_in_order_drains_services_and_exits_0(
    agent_factory: Any, emulator: Any, tmp_path: Path
) -> None:
    out = tmp_path / "hooks.out"
    hooks = tmp_path / "agent" / "spot.d"
    write_hook(hooks, "20-flush", f'echo "flush $GUESTAGENT_TERMINATION_TIME" >> {out}')
    write_hook(hooks, "10-stop-app", f'echo "stop-app $GUESTAGENT_TERMINATION_TIME" >> {out}')
    write_hook(hooks, "30-fail", "echo failing; exit 1")
    agent = agent_factory(extra=["daemon_probes:first", "daemon_probes:second"])
    emulator.schedule_termination(0.3, 6)
    scheduled = time.time() + 0.3
    assert agent.wait(15) == 0
    exited = time.time()

    report = load_report(agent.state_dir)
    assert report is not None and report["completed"] and report["deadline_held"]
    tt = report["termination_time"]
    assert out.read_text().splitlines() == [f"stop-app {tt}", f"flush {tt}"]
    assert [h["name"] for h in report["hooks"]] == ["10-stop-app", "20-flush", "30-fail"]
    assert report["hooks"][2]["returncode"] == 1
    assert [s["step"] for s in report["steps"]] == ["stop-new-work", "hooks", "services"]
    # Drained in reverse start order, after new work stopped, before being stopped.
    ev = [e for e in events(agent.workdir / "probe") if e[0] in ("first", "second")]
    assert ev[2:] == [("second", "drain draining=True"), ("first", "drain draining=True"),
                      ("second", "stop"), ("first", "stop")]
    # Seen within a poll or two of appearing, and out well before the termination time.
    seen = _ts(report["seen_at"])
    assert seen - scheduled < 1.5
    assert exited < _ts(report["deadline"])


def test_hanging_hook_is_killed_and_drain_ends_in_time(
    agent_factory: Any, emulator: Any, tmp_path: Path
) -> None:
    out = tmp_path / "hooks.out"
    hooks = tmp_path / "agent" / "spot.d"
    write_hook(hooks, "10-hang", f"echo started >> {out}; sleep 120; echo finished >> {out}")
    write_hook(hooks, "20-after", f"echo after >> {out}")
    agent = agent_factory(extra=["daemon_probes:first"], spot={"hook_timeout": 1.0})
    emulator.schedule_termination(0, 8)
    assert agent.wait(15) == 0  # the hook would sleep 120 s
    report = load_report(agent.state_dir)
    assert report is not None and report["deadline_held"]
    assert report["hooks"][0]["timed_out"] and report["hooks"][1]["ok"]
    assert out.read_text().splitlines() == ["started", "after"]
    assert ("first", "drain draining=True") in events(agent.workdir / "probe")


def test_hook_longer_than_the_deadline_is_cut_at_the_deadline(
    agent_factory: Any, emulator: Any, tmp_path: Path
) -> None:
    write_hook(tmp_path / "agent" / "spot.d", "10-slow", "sleep 120")
    agent = agent_factory(spot={"hook_timeout": 60.0, "deadline_margin": 1.0})
    emulator.schedule_termination(0, 4)
    assert agent.wait(15) == 0
    report = load_report(agent.state_dir)
    assert report is not None
    assert report["hooks"][0]["timed_out"]
    assert report["completed"] and report["deadline_held"]
    assert time.time() < _ts(report["termination_time"])


def test_metadata_failing_in_the_notice_window(agent_factory: Any, emulator: Any) -> None:
    agent = agent_factory()
    path = "meta-data/instance/spot/termination-time"
    rule = emulator.add_fault(path, "status", status=500)
    emulator.schedule_termination(0, 30)
    spot = wait_for(lambda: agent.status()["spot"].get("failing") and agent.status()["spot"])
    # An error is not a notice: still running, still polling, reported unhealthy.
    assert spot["state"] == "watching" and spot["errors"] >= 1
    assert agent.running() and not agent.status()["healthy"]
    emulator.remove_fault(rule)
    emulator.add_fault(path, "reset", count=2)
    emulator.add_fault(path, "latency", latency=0.3, count=2)
    assert agent.wait(20) == 0
    report = load_report(agent.state_dir)
    assert report is not None and report["completed"] and report["deadline_held"]


def test_sigterm_in_the_middle_of_a_drain(agent_factory: Any, emulator: Any,
                                          tmp_path: Path) -> None:
    out = tmp_path / "hooks.out"
    hooks = tmp_path / "agent" / "spot.d"
    pid_file = tmp_path / "hook.pid"
    write_hook(hooks, "10-slow", f"echo $$ > {pid_file}; echo started >> {out}; sleep 120; "
                                 f"echo finished >> {out}")
    write_hook(hooks, "20-never", f"echo never >> {out}")
    agent = agent_factory(extra=["daemon_probes:first"], spot={"hook_timeout": 100.0},
                          daemon={"stop_timeout": 2.0})
    emulator.schedule_termination(0, 200)
    wait_for(lambda: out.exists())
    agent.send(signal.SIGTERM)
    assert agent.wait(10) == 0  # within the stop budget, not the hook's 100 s
    report = load_report(agent.state_dir)
    assert report is not None and report["interrupted"] and report["completed"]
    assert report["hooks"][0]["timed_out"] or report["hooks"][0]["returncode"] == -9
    assert report["hooks"][1]["error"] == "skipped: deadline passed"
    # The hook was killed, not orphaned: it is gone and never wrote its last line.
    wait_for(lambda: gone(int(pid_file.read_text())))
    assert out.read_text().splitlines() == ["started"]


def test_notice_is_handled_once_and_not_again_after_restart(
    agent_factory: Any, emulator: Any, tmp_path: Path
) -> None:
    out = tmp_path / "hooks.out"
    write_hook(tmp_path / "agent" / "spot.d", "10-count", f"echo ran >> {out}")
    agent = agent_factory(spot={"exit_after_drain": False})
    emulator.schedule_termination(0, 60)
    wait_for(lambda: (load_report(agent.state_dir) or {}).get("completed"))
    polls = agent.status()["spot"]["polls"]
    wait_for(lambda: agent.status()["spot"]["polls"] >= polls + 5)
    assert agent.running()
    assert out.read_text() == "ran\n"
    assert agent.stop() == 0
    again = agent_factory(spot={"exit_after_drain": False})
    polls = wait_for(lambda: again.status()["spot"]["polls"] >= 5)
    assert polls and out.read_text() == "ran\n"


def test_maintenance_event_runs_hooks_once(agent_factory: Any, emulator: Any,
                                           tmp_path: Path) -> None:
    out = tmp_path / "maint.out"
    write_hook(tmp_path / "agent" / "maintenance.d", "10-note",
               f'echo "$GUESTAGENT_EVENT_ID $GUESTAGENT_EVENT_CODE" >> {out}')
    agent = agent_factory()
    event_id = emulator.add_maintenance_event("SystemMaintenance.Reboot", 600)
    wait_for(lambda: out.exists())
    m = wait_for(lambda: agent.service("maintenance")["details"]["hooks_run"] == 1)
    assert m
    assert agent.stop() == 0
    again = agent_factory()
    # Three polls that saw the (still active) event, and no second run of its hooks.
    polls: set[str] = set()
    wait_for(lambda: polls.add(again.service("maintenance")["details"]["last_poll"] or "")
             or len(polls - {""}) >= 3)
    assert again.service("maintenance")["details"]["active_events"] == [event_id]
    assert out.read_text() == f"{event_id} SystemMaintenance.Reboot\n"
    state = json.loads((agent.state_dir / "spot" / "maintenance.json").read_text())
    assert state["handled"] == [event_id]


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_final_action_runs_last(agent_factory: Any, emulator: Any, tmp_path: Path) -> None:
    out = tmp_path / "order.out"
    write_hook(tmp_path / "agent" / "spot.d", "10-hook", f"echo hook >> {out}")
    agent = agent_factory(spot={"final_action": "poweroff",
                                "poweroff_command": ["sh", "-c", f"echo poweroff >> {out}"]})
    emulator.schedule_termination(0, 8)
    assert agent.wait(15) == 0
    assert out.read_text().splitlines() == ["hook", "poweroff"]
    report = load_report(agent.state_dir)
    assert report is not None
    assert [s["step"] for s in report["steps"]][-1] == "final" and report["deadline_held"]


def test_a_hook_that_leaves_a_background_job_does_not_delay_the_drain(
    agent_factory: Any, emulator: Any, tmp_path: Path
) -> None:
    pid_file = tmp_path / "bg.pid"
    out = tmp_path / "hooks.out"
    hooks = tmp_path / "agent" / "spot.d"
    # The job escapes the hook's process group and keeps its stdout open for 10 minutes.
    write_hook(hooks, "10-bg", f"setsid sleep 600 & echo $! > {pid_file}; echo started")
    write_hook(hooks, "20-next", f"echo next >> {out}")
    agent = agent_factory(spot={"hook_timeout": 60.0, "deadline_margin": 1.0})
    emulator.schedule_termination(0, 8)
    try:
        assert agent.wait(15) == 0
        report = load_report(agent.state_dir)
        assert report is not None and report["completed"] and report["deadline_held"]
        assert [h["ok"] for h in report["hooks"]] == [True, True]
        assert out.read_text() == "next\n"
        # Ended with the drain, not left running for ten minutes.
        bg = int(pid_file.read_text())
        wait_for(lambda: gone(bg))
    finally:
        if pid_file.exists() and not gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_kill_9_during_the_drain_resumes_at_the_hook_that_was_running(
    agent_factory: Any, emulator: Any, tmp_path: Path
) -> None:
    out = tmp_path / "hooks.out"
    hooks = tmp_path / "agent" / "spot.d"
    write_hook(hooks, "10-a", f'echo "a $GUESTAGENT_DRAIN_ATTEMPT" >> {out}')
    # The first attempt hangs (so the agent can be killed in the middle of it).
    write_hook(hooks, "20-b", f'echo "b start $GUESTAGENT_DRAIN_ATTEMPT" >> {out}\n'
                              f'[ "$GUESTAGENT_DRAIN_ATTEMPT" = 1 ] && sleep 600\n'
                              f'echo "b done $GUESTAGENT_DRAIN_ATTEMPT" >> {out}')
    write_hook(hooks, "30-c", f'echo "c $GUESTAGENT_DRAIN_ATTEMPT" >> {out}')
    agent = agent_factory(spot={"hook_timeout": 120.0, "deadline_margin": 5.0})
    emulator.schedule_termination(0, 60)
    wait_for(lambda: out.exists() and "b start 1" in out.read_text())
    first = load_report(agent.state_dir)
    assert first is not None and first["running_hook"] == {"name": "20-b", "attempt": 1}
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(10)
    # The resumed drain is quick and the agent then exits: it may be gone before it would
    # ever answer a ping, so it is not waited on as "ready".
    again = agent_factory(start=False, spot={"hook_timeout": 120.0, "deadline_margin": 5.0})
    again.start(wait=None)
    assert again.wait(30) == 0
    assert out.read_text().splitlines() == ["a 1", "b start 1", "b start 2", "b done 2", "c 1"]
    report = load_report(again.state_dir)
    assert report is not None and report["completed"] and report["deadline_held"]
    assert report["attempt"] == 2 and report["deadline"] == first["deadline"]
    assert [(h["name"], h["attempt"]) for h in report["hooks"]] == [
        ("10-a", 1), ("20-b", 2), ("30-c", 1)]
    # The hook killed with the first agent did not go on in the background.
    assert "b done 1" not in out.read_text()
