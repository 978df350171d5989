"""A submit beside a daemon whose tasks service is not listening yet waits for it: running
the job in the foreground would put two schedulers on one store (seen in CI when the
service started late under load)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from guestagent import config
from guestagent.daemon.lock import DaemonLock
from guestagent.flocks import daemon_holder
from guestagent.tasks import service
from guestagent.tasks.errors import TaskError
from guestagent.tasks.handoff import HandoffServer


def settings_in(tmp_path: Path) -> Any:
    return config.from_mapping({"daemon": {"state_dir": str(tmp_path / "state"),
                                           "run_dir": str(tmp_path / "run")}})


def test_the_lock_holder_is_read_without_taking_the_lock(tmp_path: Path) -> None:
    assert daemon_holder(tmp_path) is None
    lock = DaemonLock(tmp_path, tmp_path)
    lock.acquire()
    try:
        assert daemon_holder(tmp_path) == os.getpid()
    finally:
        lock.release()
    assert daemon_holder(tmp_path) is None


def test_no_daemon_means_the_foreground(tmp_path: Path) -> None:
    assert service.hand_to_daemon(settings_in(tmp_path), "job-1", False) is False


def test_a_daemon_not_listening_yet_is_waited_for(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_in(tmp_path)
    lock = DaemonLock(settings.daemon.state_dir, settings.daemon.run_dir)
    lock.acquire()
    polled = threading.Event()
    real_sleep = time.sleep

    class Clock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            polled.set()  # the submit found no socket and is waiting
            real_sleep(seconds)

    monkeypatch.setattr(service, "time", Clock)
    asked: list[dict[str, Any]] = []

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        asked.append(request)
        return {"job": request["job"]}

    servers: list[Any] = []

    def start_late() -> None:
        assert polled.wait(60)
        servers.append(HandoffServer(settings.daemon.run_dir / service.SOCKET_NAME,
                                     handle).start())

    late = threading.Thread(target=start_late)
    late.start()
    try:
        assert service.hand_to_daemon(settings, "job-1", False) is True
    finally:
        late.join()
        for server in servers:
            server.close()
        lock.release()
    assert asked == [{"command": "run", "job": "job-1", "resume": False}]


def test_a_daemon_that_never_listens_is_named(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_in(tmp_path)
    monkeypatch.setattr(service, "HANDOFF_WAIT", 0.5)
    lock = DaemonLock(settings.daemon.state_dir, settings.daemon.run_dir)
    lock.acquire()
    try:
        with pytest.raises(TaskError) as info:
            service.hand_to_daemon(settings, "job-1", False)
    finally:
        lock.release()
    assert f"the daemon (pid {os.getpid()}) runs but its tasks service has not answered" in str(
        info.value)
