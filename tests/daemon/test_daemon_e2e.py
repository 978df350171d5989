"""The real ``guestagent run`` process: status, lock, signals, sd_notify, restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon_harness import subprocess_env
from daemon_probes import events
from polling import wait_for

from guestagent.daemon.localrun import to_toml


def cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "guestagent.cli", *args]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=30)


def test_status_reports_services_in_start_order(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first", "daemon_probes:second",
                                 "daemon_probes:disabled"])
    res = cli("status", "--json", config=agent.config_path)
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert [s["name"] for s in reply["services"]] == [
        "metadata", "first", "second", "migrate", "maintenance", "spot"]
    assert reply["healthy"] and reply["phase"] == "running"
    assert reply["spot"]["state"] == "watching"
    assert reply["credentials"] == {"state": "disabled"}
    metadata = reply["services"][0]["details"]
    assert metadata["instance_id"].startswith("i-")
    text = cli("status", config=agent.config_path)
    assert text.returncode == 0
    assert "spot: watching" in text.stdout and "first" in text.stdout


def test_status_without_daemon_exits_3(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(to_toml({"daemon": {"run_dir": str(tmp_path / "run")}}))
    res = cli("status", config=cfg)
    assert res.returncode == 3
    assert res.stderr.count("\n") == 1 and "no guestagent daemon is running" in res.stderr


def test_unhealthy_service_makes_status_fail(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:broken"], daemon={"error_log_period": 300.0})
    svc = wait_for(lambda: (s := agent.service("broken")) and s["restarts"] >= 3 and s)
    assert svc["last_error"] == "RuntimeError: the probe is broken on purpose"
    res = cli("status", config=agent.config_path)
    assert res.returncode == 1
    assert "broken" in res.stdout and "NO" in res.stdout
    # Restarted several times, logged once.
    assert agent.log().count("service broken failed") == 1


def test_flaky_service_recovers(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:flaky"])
    svc = wait_for(lambda: (s := agent.service("flaky")) and s["restarts"] == 2
                   and s["state"] == "running" and s)
    assert svc["healthy"]
    assert cli("status", config=agent.config_path).returncode == 0


def test_second_daemon_is_refused(agent_factory: Any) -> None:
    agent = agent_factory()
    res = cli("run", config=agent.config_path)
    assert res.returncode == 2
    assert f"pid {agent.pid}" in res.stderr and "Traceback" not in res.stderr
    assert agent.running()


def test_sigterm_drains_and_stops_in_reverse_order(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first", "daemon_probes:second"])
    wait_for(lambda: len(events(agent.workdir / "probe")) == 2)
    began = time.monotonic()
    agent.send(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - began < 5
    assert events(agent.workdir / "probe")[2:] == [
        ("second", "drain draining=True"), ("first", "drain draining=True"),
        ("second", "stop"), ("first", "stop")]
    assert not agent.socket.exists()


def test_sigterm_budget_bounds_a_slow_drain(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first", "daemon_probes:second"],
                          daemon={"stop_timeout": 1.0}, env={"PROBE_SECOND_DRAIN": "30"})
    wait_for(lambda: len(events(agent.workdir / "probe")) == 2)
    began = time.monotonic()
    agent.send(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - began < 2.5


def test_sighup_reloads_settings(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first"])
    assert agent.status()["spot"]["poll_interval"] == 0.2
    agent.config["spot"]["poll_interval"] = 0.7
    agent.write_config()
    agent.send(signal.SIGHUP)
    wait_for(lambda: agent.status()["spot"].get("poll_interval") == 0.7)
    # A broken file is refused and the running settings stay.
    agent.config_path.write_text("[spot]\npoll_interval = -1\n")
    agent.send(signal.SIGHUP)
    time.sleep(0.5)
    assert agent.running() and agent.status()["spot"]["poll_interval"] == 0.7
    assert "reload failed" in agent.log()
    # The probe was not restarted: only services whose settings changed are.
    assert [e for e in events(agent.workdir / "probe") if e[1] == "run"] == [("first", "run")]


def test_sd_notify_ready_watchdog_stopping(agent_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    agent = agent_factory(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    got: list[str] = []
    wait_for(lambda: got.append(sock.recv(4096).decode()) or "WATCHDOG=1" in got)
    assert got[0].startswith("READY=1\nSTATUS=running: 4 services")
    assert got.count("WATCHDOG=1") >= 1
    agent.send(signal.SIGTERM)
    wait_for(lambda: got.append(sock.recv(4096).decode()) or
             any(m.startswith("STOPPING=1") for m in got))
    assert agent.wait(10) == 0
    sock.close()


def test_kill_9_then_restart_resumes(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first"])
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(5)
    again = agent_factory(extra=["daemon_probes:first"])  # same state and run dirs
    assert again.status()["healthy"]
    assert cli("status", config=again.config_path).returncode == 0


def test_lean_entry_point_runs_the_same_daemon(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first"], start=False)
    agent.lean = True
    agent.start()
    assert [s["name"] for s in agent.status()["services"]] == [
        "metadata", "first", "migrate", "maintenance", "spot"]
    assert agent.stop() == 0
