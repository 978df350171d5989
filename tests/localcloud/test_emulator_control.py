"""The control API, scenario loading and validation, and ``guestagent emulator serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _emulator_http import control, get, request

from guestagent.localcloud.emulator import Emulator, ScenarioError, load_scenario

DATA = Path(__file__).parents[1] / "data" / "scenarios"
ROOT = Path(__file__).parents[2]
LEAF = "/latest/meta-data/instance-id"


def test_state_and_credentials(emulator: Any) -> None:
    status, state = control(emulator, "GET", "/state")
    assert status == 200 and state["role"] == "EcsRamRoleDemo"
    assert state["token_required"] is False and state["spot"] is None
    status, creds = control(emulator, "GET", "/credentials")
    assert status == 200
    assert creds["credentials"] == emulator.issued_credentials()
    secret = creds["credentials"][0]["AccessKeySecret"]
    assert secret not in json.dumps(state)
    status, pem = request(emulator.control_url, "/ca.pem")
    assert status == 200 and pem == emulator.ca_cert_pem


def test_faults_over_control(emulator: Any) -> None:
    status, body = control(
        emulator,
        "POST",
        "/faults",
        {"path": "meta-data/instance-id", "kind": "status", "status": 500, "count": 2},
    )
    assert status == 200 and body["id"]
    assert [get(emulator.url, LEAF)[0] for _ in range(3)] == [500, 500, 200]
    control(emulator, "POST", "/faults", {"path": "*", "kind": "latency", "latency": 0.01})
    rule = control(
        emulator, "POST", "/faults", {"path": "meta-data/region-id", "kind": "body", "body": "x"}
    )[1]["id"]
    assert len(control(emulator, "GET", "/state")[1]["faults"]) == 2
    assert control(emulator, "DELETE", f"/faults/{rule}")[0] == 200
    assert control(emulator, "DELETE", f"/faults/{rule}")[0] == 404
    assert control(emulator, "DELETE", "/faults")[0] == 200
    assert control(emulator, "GET", "/state")[1]["faults"] == []


def test_other_endpoints(emulator: Any) -> None:
    url = emulator.url
    assert control(emulator, "POST", "/token", {"required": True})[0] == 200
    assert get(url, LEAF)[0] == 403
    control(emulator, "POST", "/token", {"required": False})

    control(emulator, "POST", "/spot", {"in_seconds": 0, "release_after": 60})
    assert get(url, "/latest/meta-data/instance/spot/termination-time")[0] == 200
    control(emulator, "DELETE", "/spot")
    assert get(url, "/latest/meta-data/instance/spot/termination-time")[0] == 404

    assert control(emulator, "PUT", "/user-data", raw=b"\x1f\x8b binary")[0] == 200
    assert request(url, "/latest/user-data") == (200, b"\x1f\x8b binary")
    control(emulator, "DELETE", "/user-data")
    assert get(url, "/latest/user-data")[0] == 404

    before = emulator.issued_credentials()
    control(emulator, "POST", "/role/rotate")
    assert len(emulator.issued_credentials()) == len(before) + 1
    control(emulator, "POST", "/time-scale", {"scale": 3600})
    assert emulator.roles.time_scale == 3600
    control(emulator, "DELETE", "/role")
    assert get(url, "/latest/meta-data/ram/security-credentials/")[0] == 404
    control(emulator, "POST", "/role", {"name": "Builder"})
    assert get(url, "/latest/meta-data/ram/security-credentials/") == (200, "Builder")

    event = control(
        emulator,
        "POST",
        "/maintenance",
        {"code": "SystemMaintenance.Redeploy", "not_before_in": 60},
    )[1]["id"]
    assert event in get(url, "/latest/maintenance/active-system-events")[1]
    control(emulator, "DELETE", "/maintenance")
    assert get(url, "/latest/maintenance/active-system-events")[0] == 404

    control(emulator, "PUT", "/value", {"path": "meta-data/hostname", "value": "web-1"})
    assert get(url, "/latest/meta-data/hostname") == (200, "web-1")
    control(emulator, "PUT", "/value", {"path": "meta-data/hostname", "value": None})
    assert get(url, "/latest/meta-data/hostname")[0] == 404
    control(emulator, "POST", "/instance-id", {"id": "i-bp1control0000000001"})
    assert get(url, LEAF) == (200, "i-bp1control0000000001")


@pytest.mark.parametrize(
    ("method", "path", "payload", "raw", "code"),
    [
        ("POST", "/faults", None, b"{not json", "BadJson"),
        ("POST", "/faults", None, b"[1, 2]", "BadJson"),
        ("POST", "/faults", {"path": "x", "kind": "status", "colour": "red"}, None, "UnknownField"),
        ("POST", "/faults", {"kind": "status"}, None, "MissingField"),
        ("POST", "/faults", {"path": "x", "kind": "status", "status": "500"}, None, "InvalidField"),
        ("POST", "/faults", {"path": "x", "kind": "nope"}, None, "InvalidValue"),
        ("POST", "/token", {"required": 1}, None, "InvalidField"),
        ("POST", "/spot", {"in_seconds": True}, None, "InvalidField"),
        ("POST", "/spot", {"in_seconds": -1}, None, "InvalidValue"),
        ("POST", "/time-scale", {"scale": 0}, None, "InvalidValue"),
        ("POST", "/instance-id", {"id": "web-1"}, None, "InvalidValue"),
        ("DELETE", "/faults", None, b"garbage", "BadJson"),
        # accepted, they broke the spot timer and the clock (termination-time, /state died)
        ("POST", "/spot", None, b'{"in_seconds": 0, "release_after": 1e999}', "BadJson"),
        ("POST", "/spot", None, b'{"in_seconds": NaN}', "BadJson"),
        ("POST", "/time-scale", None, b'{"scale": Infinity}', "BadJson"),
    ],
)
def test_control_errors(
    emulator: Any, method: str, path: str, payload: Any, raw: bytes | None, code: str
) -> None:
    status, body = control(emulator, method, path, payload, raw=raw)
    assert status == 400 and body["code"] == code and body["message"]


def test_a_repeated_key_in_a_control_body_is_refused_and_changes_nothing(
        emulator: Any) -> None:
    assert control(emulator, "GET", "/state")[1]["spot"] is None
    status, body = control(emulator, "POST", "/spot", None,
                           raw=b'{"in_seconds": 600, "in_seconds": 0}')
    assert status == 400 and body["code"] == "BadJson"
    assert "key 'in_seconds' appears twice" in body["message"]
    assert control(emulator, "GET", "/state")[1]["spot"] is None  # no notice was set


def test_unknown_endpoint(emulator: Any) -> None:
    status, body = control(emulator, "GET", "/nope")
    assert status == 404 and body["code"] == "NotFound"


def test_control_port_is_loopback_only() -> None:
    with Emulator(host="0.0.0.0").start() as emu:
        assert emu.url == f"http://127.0.0.1:{emu.port}"
        assert emu._servers[1].server_address[0] == "127.0.0.1"
        assert get(emu.url, LEAF)[0] == 200


# -- scenarios ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["hardened.toml", "fast-rotation.toml", "spot-soon.toml", "flaky.toml", "single-nic.yaml"],
)
def test_example_scenarios_load(name: str) -> None:
    scenario = load_scenario(DATA / name)
    assert scenario.instance.instance_id.startswith("i-")


def test_yaml_scenario(emulator_factory: Any) -> None:
    emu = emulator_factory("single-nic.yaml")
    assert get(emu.url, "/latest/meta-data/disks/")[0] == 404
    assert get(emu.url, "/latest/meta-data/eipv4")[0] == 404
    mac = "00:16:3e:00:00:01"
    assert get(emu.url, "/latest/meta-data/network/interfaces/macs/") == (200, f"{mac}/")
    assert get(emu.url, f"/latest/meta-data/network/interfaces/macs/{mac}/private-ipv4s") == (
        200,
        '["192.168.0.20"]',
    )


def _bad(tmp_path: Path, text: str, name: str = "s.toml") -> str:
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    message = str(info.value)
    assert "\n" not in message and str(file) in message
    return message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[instance]\ncolour = 'red'\n", "instance.colour: unknown key"),
        ("surprise = 1\n", "surprise: unknown key"),
        ("[instance]\ninstance_id = 5\n", "instance.instance_id: must be a string"),
        ("[instance]\ninstance_id = 'web-1'\n", "instance.instance_id: must start with 'i-'"),
        ("[ram]\ntime_scale = 0\n", "ram.time_scale: must be > 0"),
        # accepted (a clock at infinite speed) or a traceback
        ("[ram]\ntime_scale = inf\n", "ram.time_scale: must be a finite number, got inf"),
        ("[ram]\nvalidity = nan\n", "ram.validity: must be a finite number, got nan"),
        ("[spot]\nrelease_after = 1e999\n", "spot.release_after: must be a finite number"),
        ("[ram]\noverlap = 30000\n", "ram.overlap: must be shorter than validity"),
        ("[tokens]\nrequired = 'yes'\n", "tokens.required: must be true or false"),
        ("[spot]\nnotice_in = -1\n", "spot.notice_in: must be >= 0"),
        ("[[faults]]\npath = 'x'\nkind = 'boom'\n", "faults[0].kind: must be one of"),
        ("[[faults]]\nkind = 'status'\n", "faults[0].path: missing"),
        ("[[faults]]\npath = 'x'\nkind = 'status'\nstatus = 42\n", "faults[0].status: must be"),
        ("[[maintenance]]\nnot_before_in = 5\n", "maintenance[0].code: missing"),
        ("[network]\ninterfaces = []\n", "network.interfaces: at least one"),
        ("user_data_file = 'nope.sh'\n", "user_data_file: cannot read"),
        ("user_data = 'a'\nuser_data_file = 'b'\n", "user_data_file: give user_data or"),
        ("[ca]\ncert_file = 'ca.pem'\n", "ca.key_file: both files are needed"),
        ("[instance\n", "not valid TOML"),
    ],
)
def test_scenario_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _bad(tmp_path, text)


def test_scenario_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_scenario(tmp_path / "absent.toml")
    assert "top level must be a mapping" in _bad(tmp_path, "- 1\n", "s.yaml")
    assert "nested too deeply" in _bad(tmp_path, "a = " + "[" * 3000 + "]" * 3000 + "\n")


def test_a_repeated_key_in_a_scenario_is_refused_in_one_line(tmp_path: Path) -> None:
    # YAML kept the last value silently (TOML already refused it).
    message = _bad(tmp_path, "instance:\n  instance_id: i-a\n  instance_id: i-b\n", "s.yaml")
    assert message.endswith("s.yaml: not valid YAML at line 3: key 'instance_id' appears "
                            "twice in one mapping: keep one")
    assert "\n" not in message
    assert "Cannot overwrite a value" in _bad(tmp_path, "[instance]\nx = 1\nx = 2\n")  # TOML


def test_user_data_file_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "boot.sh").write_bytes(b"#!/bin/sh\ntrue\n")
    (tmp_path / "s.toml").write_text("user_data_file = 'boot.sh'\n[tokens]\nrequired = true\n")
    scenario = load_scenario(tmp_path / "s.toml", overrides={"ram": {"role": ""}})
    assert scenario.user_data == b"#!/bin/sh\ntrue\n"
    assert scenario.tokens_required and scenario.ram.role is None


# -- the CLI -----------------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "guestagent.cli", "emulator", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve(sig: int) -> None:
    proc = _serve("--port", "0", "--scenario", str(DATA / "hardened.toml"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "metadata" and line[2] == "control", line
        url, control_url = line[1], line[3]
        assert url.startswith("http://127.0.0.1:") and control_url.startswith("http://127.0.0.1:")
        assert get(url, LEAF)[0] == 403  # hardened scenario
        assert request(control_url, "/state")[0] == 200
        start = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 3
    finally:
        proc.kill()
        proc.wait()


def test_cli_bad_scenario_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[ram]\ntime_scale = -2\n")
    proc = _serve("--scenario", str(bad))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "ram.time_scale" in err and "Traceback" not in err


def test_cli_port_in_use_is_one_line(emulator: Any) -> None:
    proc = _serve("--port", str(emulator.port))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "cannot listen" in err


def test_module_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "guestagent.localcloud.emulator.cli", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=20,
        check=False,
    )
    assert out.returncode == 2 and "--port: must be 0..65535" in out.stderr
