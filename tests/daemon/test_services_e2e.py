"""The daemon hosting the real capability services: credentials and first-boot user-data."""

from __future__ import annotations

import importlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import polling
import pytest
from fixtures.agent import subprocess_env

from guestagent.credentials.local import UnixHTTPConnection


def fetch_credentials(sock: Path) -> dict[str, Any]:
    conn = UnixHTTPConnection(str(sock), 5.0)
    try:
        conn.request("GET", "/v1/credentials/alibaba")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return dict(json.loads(body))
    finally:
        conn.close()


def wait_for(cond: Any, timeout: float = 10.0) -> Any:
    return polling.wait_for(cond, timeout, tolerate=(OSError, AssertionError))


# Only the user-data script runs: nothing else on this machine is changed.
USERDATA = {"enabled": True, "default_dns": False, "default_ntp": False,
            "defer_to_cloud_init": False}


def _has(module: str, attr: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def test_credentials_served_and_reported(agent_factory: Any, emulator: Any) -> None:
    agent = agent_factory(credentials={"enabled": True})
    sock = Path(agent.config["credentials"]["socket_path"])
    doc = wait_for(lambda: fetch_credentials(sock))
    assert doc["Code"] == "Success"
    assert doc["AccessKeyId"] == emulator.current_credentials()["AccessKeyId"]
    status = agent.status()
    creds = status["credentials"]
    assert creds["state"] == "ok" and creds["last_refresh"]
    assert doc["AccessKeySecret"] not in json.dumps(status)
    assert doc["AccessKeySecret"] not in agent.log()


def test_kill_9_then_restart_resumes_serving(agent_factory: Any) -> None:
    agent = agent_factory(credentials={"enabled": True})
    sock = Path(agent.config["credentials"]["socket_path"])
    wait_for(lambda: fetch_credentials(sock))
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(5)
    again = agent_factory(credentials={"enabled": True})
    assert wait_for(lambda: fetch_credentials(sock))["Code"] == "Success"
    assert again.status()["healthy"]


@pytest.mark.skipif(not _has("guestagent.userdata.service", "FirstBootService"),
                    reason="first-boot service (issue 5) not in this tree yet")
def test_kill_9_does_not_rerun_first_boot_work(agent_factory: Any, emulator: Any,
                                               tmp_path: Path) -> None:
    marker = tmp_path / "firstboot.count"
    emulator.set_user_data(f"#!/bin/sh\necho ran >> {marker}\n".encode())
    agent = agent_factory(userdata=USERDATA)
    wait_for(lambda: marker.exists())
    wait_for(lambda: agent.service("userdata")["state"] == "done")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait(5)
    again = agent_factory(userdata=USERDATA)
    wait_for(lambda: again.service("userdata")["state"] == "done")
    assert marker.read_text() == "ran\n"


@pytest.mark.skipif(not _has("guestagent.userdata.service", "FirstBootService"),
                    reason="first-boot service (issue 5) not in this tree yet")
def test_firstboot_unit_command_then_daemon(agent_factory: Any, emulator: Any,
                                            tmp_path: Path) -> None:
    import subprocess
    import sys

    marker = tmp_path / "firstboot.count"
    emulator.set_user_data(f"#!/bin/sh\necho ran >> {marker}\n".encode())
    agent = agent_factory(userdata=USERDATA, start=False)
    agent.write_config()
    argv = [sys.executable, "-m", "guestagent.cli", "run", "--once", "userdata",
            "--config", str(agent.config_path)]
    for _ in range(2):  # both first-boot stages at once; a rerun is a no-op
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env=subprocess_env())
        assert res.returncode == 0, res.stderr
    agent.start()
    wait_for(lambda: agent.service("userdata")["state"] == "done")
    assert marker.read_text() == "ran\n"
