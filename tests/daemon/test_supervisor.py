"""The supervisor in-process: order, restart with backoff, throttled errors, drain/stop."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from polling import wait_for

from guestagent.daemon.service import Service
from guestagent.daemon.supervisor import ErrorThrottle, Supervisor


class Recorder(Service):
    def __init__(self, name: str, log: list[str], fail_times: int = 0) -> None:
        self.name = name
        self.log = log
        self.fail_times = fail_times
        self.runs = 0
        self.run_times: list[float] = []

    def run(self, stop: threading.Event) -> None:
        self.runs += 1
        self.run_times.append(time.monotonic())
        self.log.append(f"run {self.name}")
        if self.runs <= self.fail_times:
            raise RuntimeError("boom")
        stop.wait()
        self.log.append(f"stop {self.name}")

    def drain(self, deadline: float) -> None:
        self.log.append(f"drain {self.name}")


class Once(Service):
    name = "once"
    oneshot = True

    def __init__(self) -> None:
        self.runs = 0

    def run(self, stop: threading.Event) -> None:
        self.runs += 1


def test_start_order_then_reverse_drain_and_stop() -> None:
    log: list[str] = []
    sup = Supervisor()
    for name in ("a", "b", "c"):
        sup.add(Recorder(name, log))
    sup.start()
    wait_for(lambda: len(log) == 3)
    assert sorted(log) == ["run a", "run b", "run c"]
    log.clear()
    deadline = time.monotonic() + 5
    sup.drain(deadline)
    assert log == ["drain c", "drain b", "drain a"]
    log.clear()
    assert sup.stop(deadline) == []
    assert log == ["stop c", "stop b", "stop a"]


def test_failed_service_restarts_with_exponential_backoff() -> None:
    log: list[str] = []
    svc = Recorder("flaky", log, fail_times=3)
    sup = Supervisor(backoff=0.05, backoff_max=1.0, error_period=60)
    sup.add(svc)
    sup.start()
    wait_for(lambda: svc.runs == 4)
    gaps = [b - a for a, b in zip(svc.run_times, svc.run_times[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    assert gaps[2] > gaps[0] * 2
    snap = sup.snapshot()[0]
    assert snap["restarts"] == 3 and snap["state"] == "running"
    assert snap["last_error"] == "RuntimeError: boom"
    sup.stop(time.monotonic() + 2)


def test_backoff_is_capped() -> None:
    svc = Recorder("bad", [], fail_times=10**6)
    sup = Supervisor(backoff=0.01, backoff_max=0.03, error_period=60)
    sup.add(svc)
    sup.start()
    wait_for(lambda: svc.runs >= 8)
    last = svc.run_times[-1] - svc.run_times[-2]
    assert last < 0.3
    assert not sup.healthy()
    sup.stop(time.monotonic() + 2)


def test_same_error_logged_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    svc = Recorder("bad", [], fail_times=10**6)
    sup = Supervisor(backoff=0.005, backoff_max=0.005, error_period=60)
    sup.add(svc)
    with caplog.at_level(logging.ERROR, logger="guestagent.daemon.supervisor"):
        sup.start()
        wait_for(lambda: svc.runs >= 10)
        sup.stop(time.monotonic() + 2)
    assert len([r for r in caplog.records if "service bad failed" in r.getMessage()]) == 1


def test_throttle_reports_suppressed_count() -> None:
    now = [0.0]
    t = ErrorThrottle(10, clock=lambda: now[0])
    assert t.check("x") == (True, 0)
    assert t.check("x") == (False, 0)
    assert t.check("y") == (True, 0)
    assert t.check("x") == (False, 0)
    now[0] = 11
    assert t.check("x") == (True, 2)


def test_oneshot_is_not_restarted() -> None:
    svc = Once()
    sup = Supervisor(backoff=0.01)
    sup.add(svc)
    sup.start()
    wait_for(lambda: sup.snapshot()[0]["state"] == "done")
    time.sleep(0.05)
    assert svc.runs == 1 and sup.healthy()


def test_frozen_supervisor_does_not_restart() -> None:
    svc = Recorder("bad", [], fail_times=10**6)
    sup = Supervisor(backoff=0.05)
    sup.freeze()
    sup.add(svc)
    sup.start()
    wait_for(lambda: sup.snapshot()[0]["state"] == "stopped")
    assert svc.runs == 1


def test_replace_keeps_position() -> None:
    log: list[str] = []
    sup = Supervisor()
    sup.add(Recorder("a", log))
    sup.add(Recorder("b", log))
    sup.start()
    wait_for(lambda: len(log) == 2)
    new = Recorder("a", log)
    assert sup.replace(new, timeout=2)
    wait_for(lambda: new.runs == 1)
    assert sup.names == ["a", "b"] and sup.service("a") is new
    sup.stop(time.monotonic() + 2)


def test_duplicate_names_refused() -> None:
    sup = Supervisor()
    sup.add(Recorder("a", []))
    with pytest.raises(ValueError):
        sup.add(Recorder("a", []))
