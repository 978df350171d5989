"""Small services the end-to-end tests plug into the real daemon via
``daemon.extra_services = ["daemon_probes:first", ...]``. Each appends what happens to it to
``$PROBE_DIR/events.log`` so tests can assert on the order of start, drain and stop."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from guestagent.service import Service


def _log(name: str, event: str) -> None:
    path = Path(os.environ["PROBE_DIR"]) / "events.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(f"{name} {event} {time.time():.3f}\n")


class Probe(Service):
    def __init__(self, name: str, ctx: Any, requires: tuple[str, ...] = ()) -> None:
        self.name = name
        self.ctx = ctx
        self.requires = requires

    def run(self, stop: threading.Event) -> None:
        _log(self.name, "run")
        while not self.wait(stop, 1.0):
            pass
        _log(self.name, "stop")

    def drain(self, deadline: float) -> None:
        _log(self.name, f"drain draining={self.ctx.draining.is_set()}")
        delay = float(os.environ.get(f"PROBE_{self.name.upper()}_DRAIN", "0"))
        if delay:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            _log(self.name, "drained")

    def status(self) -> dict[str, Any]:
        return {"probe": True}


class Broken(Service):
    """Fails on every run: exercises restart backoff and error throttling."""

    name = "broken"

    def run(self, stop: threading.Event) -> None:
        _log(self.name, "run")
        raise RuntimeError("the probe is broken on purpose")


class Flaky(Service):
    """Fails its first two runs, then runs fine."""

    name = "flaky"
    runs = 0

    def run(self, stop: threading.Event) -> None:
        Flaky.runs += 1
        _log(self.name, f"run {Flaky.runs}")
        if Flaky.runs <= 2:
            raise RuntimeError(f"flaky failure {Flaky.runs}")
        stop.wait()


class Hang(Service):
    """Beats until ``$PROBE_DIR/hang`` appears, then deadlocks (blocks without beating)."""

    name = "hang"
    heartbeat_timeout = 1.0

    def run(self, stop: threading.Event) -> None:
        _log(self.name, "run")
        trigger = Path(os.environ["PROBE_DIR"]) / "hang"
        while not self.wait(stop, 0.1):
            if trigger.exists():
                _log(self.name, "hung")
                threading.Event().wait()


def hang(ctx: Any) -> Service:
    return Hang()


def first(ctx: Any) -> Service:
    return Probe("first", ctx)


def second(ctx: Any) -> Service:
    """Requires "first": starts after it is ready, drains and stops before it."""
    return Probe("second", ctx, requires=("first",))


def broken(ctx: Any) -> Service:
    return Broken()


def flaky(ctx: Any) -> Service:
    return Flaky()


def disabled(ctx: Any) -> None:
    return None


def events(probe_dir: Path) -> list[tuple[str, str]]:
    """(service, event) pairs in the order they happened."""
    path = probe_dir / "events.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        name, rest = line.split(" ", 1)
        out.append((name, rest.rsplit(" ", 1)[0]))
    return out
