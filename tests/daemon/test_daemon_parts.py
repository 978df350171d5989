"""sd_notify, the lock and the control socket, in-process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from guestagent.daemon import control
from guestagent.daemon.lock import AlreadyRunning, DaemonLock
from guestagent.daemon.notify import Notifier


def test_notify_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    assert n.enabled and n.ready("up")
    assert srv.recv(100) == b"READY=1\nSTATUS=up"
    n.watchdog()
    assert srv.recv(100) == b"WATCHDOG=1"
    n.close()
    srv.close()


def test_notify_abstract_socket() -> None:
    name = f"guestagent-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert n.stopping()
    assert srv.recv(100) == b"STOPPING=1"
    srv.close()


def test_notify_without_systemd_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_interval is None


def test_watchdog_interval_is_half_and_pid_checked() -> None:
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval is None


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    first = DaemonLock(tmp_path / "state", tmp_path / "run")
    first.acquire()
    second = DaemonLock(tmp_path / "state", tmp_path / "run")
    with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    assert not (tmp_path / "run" / "guestagent.pid").exists()


def test_control_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with pytest.raises(control.ControlError, match="no guestagent daemon"):
        control.ask(path, "status")

    def handler(req: dict[str, object]) -> dict[str, object]:
        if req["command"] == "status":
            return {"healthy": True}
        raise ValueError("unknown command")

    srv = control.ControlServer(path, handler)
    srv.start()
    try:
        assert control.ask(path, "status") == {"healthy": True}
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        with pytest.raises(control.ControlError, match="unknown command"):
            control.ask(path, "nope")
    finally:
        srv.close()
    assert not path.exists()
