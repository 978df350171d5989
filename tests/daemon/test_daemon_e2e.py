"""The real ``guestagent run`` process: status, lock, signals, sd_notify, restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon_probes import events
from fixtures.agent import subprocess_env
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
    agent.send(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert events(agent.workdir / "probe")[2:] == [
        ("second", "drain draining=True"), ("first", "drain draining=True"),
        ("second", "stop"), ("first", "stop")]
    assert not agent.socket.exists()


def test_sigterm_budget_bounds_a_slow_drain(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first", "daemon_probes:second"],
                          daemon={"stop_timeout": 1.0}, env={"PROBE_SECOND_DRAIN": "30"})
    wait_for(lambda: len(events(agent.workdir / "probe")) == 2)
    agent.send(signal.SIGTERM)
    # The probe asks for 30 s to drain: without the 1 s budget this wait would time out.
    assert agent.wait(10) == 0
    assert ("first", "stop") in events(agent.workdir / "probe")  # stopped, not abandoned


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
    wait_for(lambda: "reload failed" in agent.log())
    assert agent.running() and agent.status()["spot"]["poll_interval"] == 0.7
    # The probe was not restarted: only services whose settings changed are.
    assert [e for e in events(agent.workdir / "probe") if e[1] == "run"] == [("first", "run")]


def test_reload_with_a_value_a_service_refuses_keeps_everything_running(
    agent_factory: Any
) -> None:
    agent = agent_factory(credentials={"enabled": True})
    wait_for(lambda: agent.service("credentials")["ready"])
    before = agent.service("credentials")["started_at"]
    # Valid TOML and a valid [credentials] section, but a user this machine does not have:
    # only building the service finds out. Nothing may change, and the daemon stays.
    agent.config["credentials"]["allow_users"] = ["no-such-user-guestagent"]
    agent.config["spot"]["poll_interval"] = 0.9
    agent.write_config()
    agent.send(signal.SIGHUP)
    wait_for(lambda: "reload failed" in agent.log())
    failed = [line for line in agent.log().splitlines() if "reload failed" in line]
    assert len(failed) == 1 and "unknown user 'no-such-user-guestagent'" in failed[0]
    assert agent.running()
    status = agent.status()
    assert status["spot"]["poll_interval"] == 0.2  # the whole reload was refused
    assert agent.service("credentials")["started_at"] == before and status["healthy"]


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_sd_notify_ready_watchdog_stopping(agent_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = _notify_socket(path)
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


def test_a_deadlocked_service_stops_the_watchdog(agent_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = _notify_socket(path)
    agent = agent_factory(extra=["daemon_probes:hang"],
                          env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    got: list[str] = []
    wait_for(lambda: got.append(sock.recv(4096).decode()) or got.count("WATCHDOG=1") >= 3)
    (agent.workdir / "probe" / "hang").touch()
    wait_for(lambda: ("hang", "hung") in events(agent.workdir / "probe"))
    row = wait_for(lambda: (s := agent.service("hang")) and not s["healthy"] and s)
    assert "no heartbeat" in row["last_error"]
    wait_for(lambda: "watchdog not fed: no heartbeat from hang" in agent.log())
    # From now on not one WATCHDOG=1: drain what was sent before, then 10 intervals of none.
    sock.settimeout(0.1)
    with contextlib.suppress(TimeoutError):
        while True:
            sock.recv(4096)
    sock.settimeout(1.0)
    late: list[str] = []
    with contextlib.suppress(TimeoutError):
        while True:
            late.append(sock.recv(4096).decode())
    assert "WATCHDOG=1" not in late and agent.running()
    sock.close()


def test_kill_9_then_restart_resumes(agent_factory: Any) -> None:
    agent = agent_factory(extra=["daemon_probes:first"])
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(5)
    again = agent_factory(extra=["daemon_probes:first"])  # same state and run dirs
    assert again.status()["healthy"]
    assert cli("status", config=again.config_path).returncode == 0


def test_the_daemon_does_not_import_what_it_does_not_run(agent_factory: Any) -> None:
    # -X importtime lists every module as it is imported, for the life of the process.
    agent = agent_factory(extra=["daemon_probes:first"], python_flags=("-X", "importtime"),
                          userdata={"enabled": True, "default_dns": False,
                                    "default_ntp": False, "defer_to_cloud_init": False})
    wait_for(lambda: agent.service("userdata")["state"] == "done")
    assert agent.stop() == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in agent.log().splitlines()
                if line.startswith("import time:")}
    assert "guestagent.daemon.agent" in imported  # the listing is real
    # The local cloud, the other commands and first boot's heavy parts (it runs in a child).
    for heavy in ("guestagent.localcloud", "guestagent.localcloud.emulator", "yaml",
                  "guestagent.userdata.apply", "guestagent.metadata.cli",
                  "guestagent.demo", "email.mime"):
        assert heavy not in imported, heavy
