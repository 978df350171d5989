"""`migrate start`: the run handed to the daemon's migrate service, which outlives the
user's session; an agent restart in the middle adopts the running migration."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mig_fixtures import Cloud, make_config, migrate_env
from polling import wait_for

from guestagent.migrate.jobs import MigrateService, read_job
from guestagent.migrate.settings import MigrateSettings


def _start_service(jobs: Path) -> tuple[MigrateService, threading.Event, threading.Thread]:
    service = MigrateService(MigrateSettings(job_poll_interval=0.1), jobs)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    return service, stop, thread


@pytest.mark.slow
def test_start_hands_the_run_to_the_daemon_which_survives_a_restart(
        ecs: Cloud, small_server: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, bandwidth_limit=20000)
    state_dir = tmp_path / "state"
    env = migrate_env(ecs, GUESTAGENT_DAEMON_STATE_DIR=str(state_dir))
    out = subprocess.run([sys.executable, "-m", "guestagent", "migrate", "start", "--config",
                          str(config), "--root", str(small_server)], capture_output=True, text=True,
                         timeout=120, env=env, check=False)
    # No daemon runs yet: the job waits for it, and the user is told so (exit 3).
    assert out.returncode == 3, out.stderr
    assert "no guestagent daemon is running" in out.stderr and "queued" in out.stdout
    jobs = state_dir / "migrate"
    assert read_job(jobs)["state"] == "queued"  # type: ignore[index]
    queued = subprocess.run([sys.executable, "-m", "guestagent", "migrate", "status", "--config",
                             str(config)], capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    assert queued.returncode == 0 and "migration queued for the agent daemon" in queued.stdout
    for key, value in migrate_env(ecs).items():
        monkeypatch.setenv(key, value)

    _service, stop, thread = _start_service(jobs)
    wait_for(lambda: (read_job(jobs) or {}).get("state") == "running", timeout=60)
    pid = read_job(jobs)["pid"]  # type: ignore[index]
    wait_for(lambda: (config.parent / "client_data").exists(), timeout=120)
    # The agent restarts while the migration runs: the child is not the agent's to end.
    stop.set()
    thread.join(30)
    service2, stop2, thread2 = _start_service(jobs)
    try:
        wait_for(lambda: (read_job(jobs) or {}).get("state") in ("finished", "not finished"),
                 timeout=900, step=0.5)
        status = subprocess.run([sys.executable, "-m", "guestagent", "migrate", "status",
                                 "--config", str(config), "--json"], capture_output=True,
                                text=True, timeout=60, env=env, check=False)
        state = json.loads(status.stdout)
        assert state["result"] == "finished", state
        assert state["daemon"]["state"] == "finished" and state["daemon"]["launches"] == 1
        assert ecs.api.calls.count("CreateInstance") == 1
        assert read_job(jobs)["state"] == "finished"  # type: ignore[index]
        assert pid != 0 and service2.status()["state"] == "finished"
    finally:
        stop2.set()
        thread2.join(30)


def test_a_run_that_keeps_dying_in_one_boot_is_given_up(tmp_path: Path) -> None:
    """Gone without a verdict in client_data, in the same boot, after the last allowed
    launch: the job ends "not finished" with the reason, and nothing is started again."""
    from guestagent.migrate.jobs import MAX_SAME_BOOT_LAUNCHES, boot_id, write_job
    from guestagent.migrate.state import State

    config = make_config(tmp_path)
    state = State(config.parent / "client_data")
    state.result, state.current = "running", "transfer:system"
    state.save()
    jobs = tmp_path / "state/migrate"
    write_job(jobs, {"config": str(config), "root": str(tmp_path), "state": "running",
                     "boot_id": boot_id(), "launches": MAX_SAME_BOOT_LAUNCHES})
    service = MigrateService(MigrateSettings(), jobs)
    service.tick()
    job = read_job(jobs) or {}
    assert job["state"] == "not finished" and "without a result" in job["error"]
    assert not (jobs / "run.log").exists() and service.problem() is not None


def test_a_run_ended_with_a_verdict_is_not_started_again(tmp_path: Path) -> None:
    from guestagent.migrate.jobs import write_job
    from guestagent.migrate.state import State

    config = make_config(tmp_path)
    state = State(config.parent / "client_data")
    state.result = "not finished"
    state.save()
    jobs = tmp_path / "state/migrate"
    write_job(jobs, {"config": str(config), "root": str(tmp_path), "state": "running",
                     "boot_id": "an earlier boot", "launches": 1})
    MigrateService(MigrateSettings(), jobs).tick()
    assert (read_job(jobs) or {})["state"] == "not finished"
    assert not (jobs / "run.log").exists()


def test_a_unit_gets_only_the_settings_and_locale_of_the_agent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from guestagent.migrate.jobs import run_environment

    monkeypatch.setenv("GUESTAGENT_MIGRATE_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "not-for-the-unit")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    unit = run_environment(under_systemd=True)
    assert unit["GUESTAGENT_MIGRATE_ENDPOINT"] == "http://127.0.0.1:1" and "PATH" in unit
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" not in unit and "NOTIFY_SOCKET" not in unit
    child = run_environment(under_systemd=False)  # a child's environment, no file
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in child and "NOTIFY_SOCKET" not in child
