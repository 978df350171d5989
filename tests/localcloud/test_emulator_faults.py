"""Fault injection (every kind, counts, matching) and the spot termination schedule."""

from __future__ import annotations

import http.client
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from _emulator_http import TTL, get, request

from guestagent.localcloud.emulator import Emulator

LEAF = "/latest/meta-data/instance-id"
SPOT = "/latest/meta-data/instance/spot/termination-time"


def test_status_with_count_then_fine(emulator: Any) -> None:
    emulator.add_fault("meta-data/instance-id", "status", status=500, count=3)
    assert [get(emulator.url, LEAF)[0] for _ in range(4)] == [500, 500, 500, 200]
    assert emulator.state()["faults"] == []
    assert [r.status for r in emulator.requests_log[-4:]] == [500, 500, 500, 200]


def test_status_body_and_matching(emulator: Any) -> None:
    emulator.add_fault("meta-data/network/*", "status", status=503, body="busy")
    assert get(emulator.url, "/latest/meta-data/network/interfaces/macs/") == (503, "busy")
    assert get(emulator.url, "/2016-01-01/meta-data/network/")[0] == 503
    assert get(emulator.url, LEAF)[0] == 200
    emulator.clear_faults()
    # Absolute patterns match the full path; method filters apply.
    emulator.add_fault("/2016-01-01/meta-data/instance-id", "status", status=502)
    assert get(emulator.url, "/2016-01-01/meta-data/instance-id")[0] == 502
    assert get(emulator.url, LEAF)[0] == 200
    emulator.add_fault("api/token", "status", status=500, method="PUT", count=1)
    assert request(emulator.url, "/latest/api/token", "PUT", {TTL: "60"})[0] == 500
    assert request(emulator.url, "/latest/api/token", "PUT", {TTL: "60"})[0] == 200


def test_latency(emulator: Any) -> None:
    emulator.add_fault("meta-data/instance-id", "latency", latency=0.3, count=1)
    start = time.monotonic()
    assert get(emulator.url, LEAF)[0] == 200
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    assert get(emulator.url, LEAF)[0] == 200
    assert time.monotonic() - start < 0.2


def test_reset(emulator: Any) -> None:
    emulator.add_fault("meta-data/instance-id", "reset", count=1)
    with pytest.raises(ConnectionResetError):
        get(emulator.url, LEAF)
    assert get(emulator.url, LEAF)[0] == 200


def test_truncate(emulator: Any) -> None:
    role = "EcsRamRoleDemo"
    path = f"/latest/meta-data/ram/security-credentials/{role}"
    emulator.add_fault(f"meta-data/ram/security-credentials/{role}", "truncate", count=1)
    with pytest.raises(http.client.IncompleteRead):
        get(emulator.url, path)
    assert get(emulator.url, path)[0] == 200


def test_body(emulator: Any) -> None:
    emulator.add_fault("dynamic/instance-identity/document", "body", body='{"zone-id": 5')
    assert get(emulator.url, "/latest/dynamic/instance-identity/document") == (200, '{"zone-id": 5')


def _hanging_request(emu: Any, result: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            result["answer"] = get(emu.url, LEAF, timeout=10)
        except (OSError, http.client.HTTPException) as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_hang_released_by_clear(emulator: Any) -> None:
    emulator.add_fault("meta-data/instance-id", "hang", count=1)
    result: dict[str, Any] = {}
    thread = _hanging_request(emulator, result)
    thread.join(0.4)
    assert thread.is_alive()  # no answer while the fault stands
    emulator.clear_faults()
    thread.join(2)
    assert result.get("answer", (0,))[0] == 200


def test_hang_does_not_block_stop() -> None:
    emu = Emulator().start()
    emu.add_fault("*", "hang")
    result: dict[str, Any] = {}
    thread = _hanging_request(emu, result)
    thread.join(0.3)
    assert thread.is_alive()
    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 2
    thread.join(2)
    assert not thread.is_alive() and "error" in result


def test_stop_closes_keep_alive_connections() -> None:
    emu = Emulator().start()
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    conn.request("GET", LEAF)
    assert conn.getresponse().read()
    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 2
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("GET", LEAF)
        conn.getresponse()
    conn.close()


def test_bad_rules_are_refused(emulator: Any) -> None:
    for kwargs in (
        {"kind": "explode"},
        {"kind": "status", "status": 99},
        {"kind": "latency", "latency": -1},
        {"kind": "status", "count": 0},
        {"kind": "status", "method": "POST"},
    ):
        with pytest.raises(ValueError):
            emulator.add_fault("meta-data/x", **kwargs)


def test_remove_one_rule(emulator: Any) -> None:
    rule = emulator.add_fault("meta-data/instance-id", "status", status=500)
    emulator.add_fault("meta-data/region-id", "status", status=500)
    assert emulator.remove_fault(rule)
    assert get(emulator.url, LEAF)[0] == 200
    assert get(emulator.url, "/latest/meta-data/region-id")[0] == 500


def _parse(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def test_spot_schedule(emulator: Any) -> None:
    assert get(emulator.url, SPOT)[0] == 404
    emulator.schedule_termination(in_seconds=0.3, release_after=120)
    assert get(emulator.url, SPOT)[0] == 404
    time.sleep(0.35)
    status, body = get(emulator.url, SPOT)
    assert status == 200
    assert abs(_parse(body) - (time.time() + 120)) < 2
    emulator.cancel_termination()
    assert get(emulator.url, SPOT)[0] == 404


def test_spot_from_scenario(emulator_factory: Any) -> None:
    now = [1_700_000_000.0]
    emu = emulator_factory("spot-soon.toml", clock=lambda: now[0])
    assert get(emu.url, SPOT)[0] == 404
    now[0] += 2
    assert get(emu.url, SPOT) == (200, "2023-11-14T22:13:32Z")  # notice + 10 s
    assert get(emu.url, "/latest/meta-data/instance-id")[1] == "i-bp1spotdemo0000000001"


def test_flaky_scenario(emulator_factory: Any) -> None:
    emu = emulator_factory("flaky.toml")
    path = "/latest/meta-data/ram/security-credentials/EcsRamRoleDemo"
    assert [get(emu.url, path)[0] for _ in range(4)] == [500, 500, 500, 200]
    assert get(emu.url, "/latest/maintenance/active-system-events")[0] == 200
