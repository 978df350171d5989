"""The supervisor in-process: dependency order, readiness, heartbeats, restart with backoff,
throttled errors, drain/stop in parallel within one budget."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from polling import wait_for

from guestagent.daemon.supervisor import Supervisor
from guestagent.service import Service
from guestagent.throttle import ErrorThrottle


class Recorder(Service):
    """Logs its run, becomes ready only after logging it, beats until stopped."""

    ready_on_start = False

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
        self.mark_ready()
        while not self.wait(stop, 0.05):
            pass
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


class Hangs(Service):
    """Beats until ``hang`` is set, then blocks without beating (a deadlock)."""

    name = "hangs"
    heartbeat_timeout = 0.3

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.release = threading.Event()

    def run(self, stop: threading.Event) -> None:
        while not self.wait(stop, 0.05):
            if self.hang.is_set():
                self.release.wait()  # ignores stop, never beats


def chain(log: list[str]) -> Supervisor:
    """a <- b <- c (c requires b requires a), added in that order."""
    sup = Supervisor()
    sup.add(Recorder("a", log))
    sup.add(Recorder("b", log), requires=["a"])
    sup.add(Recorder("c", log), requires=["b"])
    return sup


def test_start_in_dependency_order_drain_and_stop_in_reverse() -> None:
    log: list[str] = []
    sup = chain(log)
    sup.start()
    wait_for(lambda: len(log) == 3)
    assert log == ["run a", "run b", "run c"]
    log.clear()
    deadline = time.monotonic() + 5
    assert sup.drain(deadline) == []
    assert log == ["drain c", "drain b", "drain a"]
    log.clear()
    assert sup.stop(deadline) == []
    assert log == ["stop c", "stop b", "stop a"]


def test_a_service_waits_until_what_it_requires_is_ready() -> None:
    log: list[str] = []
    gate = threading.Event()

    class Slow(Recorder):
        def run(self, stop: threading.Event) -> None:
            gate.wait()
            super().run(stop)

    sup = Supervisor()
    sup.add(Slow("base", log))
    sup.add(Recorder("user", log), requires=["base"])
    sup.start()
    wait_for(lambda: {s["name"]: s["state"] for s in sup.snapshot()}["user"] == "waiting")
    assert log == [] and sup.ready_service("base") is None
    gate.set()
    wait_for(lambda: log == ["run base", "run user"])
    assert sup.ready_service("base") is sup.service("base")
    sup.stop(time.monotonic() + 5)


def test_requiring_a_service_that_is_not_there_is_refused() -> None:
    sup = Supervisor()
    with pytest.raises(ValueError, match="requires nope"):
        sup.add(Recorder("a", []), requires=["nope"])


def test_a_hung_service_is_stale_and_unhealthy_the_others_are_not() -> None:
    log: list[str] = []
    hangs = Hangs()
    sup = Supervisor()
    sup.add(Recorder("fine", log))
    sup.add(hangs)
    sup.start()
    wait_for(lambda: hangs.last_beat is not None and log)
    assert sup.stale() == {}
    hangs.hang.set()
    stale = wait_for(sup.stale)
    assert list(stale) == ["hangs"]
    row = {s["name"]: s for s in sup.snapshot()}
    assert not row["hangs"]["healthy"] and "no heartbeat" in row["hangs"]["last_error"]
    assert row["fine"]["healthy"]
    # Stopping does not wait on it past the budget; the healthy one is stopped anyway.
    assert sup.stop(time.monotonic() + 0.5) == ["hangs"]
    assert log[-1] == "stop fine"
    hangs.release.set()


def test_one_hung_drain_does_not_starve_the_others() -> None:
    log: list[str] = []
    release = threading.Event()

    class StuckDrain(Recorder):
        def drain(self, deadline: float) -> None:
            release.wait()

    sup = Supervisor()
    for name in ("x", "y"):
        sup.add(Recorder(name, log))
    sup.add(StuckDrain("stuck", log))
    sup.start()
    wait_for(lambda: len(log) == 3)
    assert sup.drain(time.monotonic() + 0.5) == ["stuck"]
    assert {"drain x", "drain y"} <= set(log)
    release.set()
    sup.stop(time.monotonic() + 5)


def test_failed_service_restarts_with_exponential_backoff() -> None:
    log: list[str] = []
    svc = Recorder("flaky", log, fail_times=3)
    sup = Supervisor(backoff=0.05, backoff_max=1.0, error_period=60)
    sup.add(svc)
    sup.start()
    wait_for(lambda: svc.runs == 4)
    gaps = [b - a for a, b in zip(svc.run_times, svc.run_times[1:], strict=False)]
    # Lower bounds only: the backoff waits at least this long (a slow machine waits more).
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
    snap = sup.snapshot()[0]
    assert snap["restarts"] == 3 and snap["state"] == "running"
    assert snap["last_error"] == "RuntimeError: boom"
    sup.stop(time.monotonic() + 2)


def test_backoff_is_capped() -> None:
    svc = Recorder("bad", [], fail_times=10**6)
    sup = Supervisor(backoff=0.01, backoff_max=0.03, error_period=60)
    sup.add(svc)
    sup.start()
    # Uncapped, the 20th restart would wait 0.01 * 2**19 s (an hour and a half).
    wait_for(lambda: svc.runs >= 20, timeout=30)
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
    assert t.suffix("x") is None
    now[0] = 11
    assert t.suffix("x") == " (2 similar since last logged)"


def test_oneshot_is_not_restarted_and_counts_as_ready_once_done() -> None:
    log: list[str] = []
    svc = Once()
    sup = Supervisor(backoff=0.01)
    sup.add(svc)
    sup.add(Recorder("after", log), requires=["once"])
    sup.start()
    wait_for(lambda: log == ["run after"])
    # Had it been restarted, the 0.01 s backoff would have run it again long before "after"
    # (which waits for it to be done) logged its start.
    assert svc.runs == 1 and sup.snapshot()[0]["state"] == "done" and sup.healthy()
    sup.stop(time.monotonic() + 2)


def test_frozen_supervisor_does_not_restart() -> None:
    svc = Recorder("bad", [], fail_times=10**6)
    sup = Supervisor(backoff=0.05)
    sup.freeze()
    sup.add(svc)
    sup.start()
    wait_for(lambda: sup.snapshot()[0]["state"] == "stopped")
    assert svc.runs == 1


def test_replace_keeps_position_and_requirements() -> None:
    log: list[str] = []
    sup = chain(log)
    sup.start()
    wait_for(lambda: len(log) == 3)
    new = Recorder("b", log)
    assert sup.replace(new, timeout=2)
    wait_for(lambda: new.runs == 1)
    assert sup.names == ["a", "b", "c"] and sup.service("b") is new
    assert sup.dependents("a") == ["b", "c"]
    log.clear()
    sup.stop(time.monotonic() + 5)
    assert log == ["stop c", "stop b", "stop a"]


def test_duplicate_names_refused() -> None:
    sup = Supervisor()
    sup.add(Recorder("a", []))
    with pytest.raises(ValueError):
        sup.add(Recorder("a", []))
