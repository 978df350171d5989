"""Test foundation: the network guard and the metadata emulator fixture.

Tests are hermetic: any connection to a non-loopback address (100.100.100.200 included)
fails the test loudly, whatever library makes it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"

# Shared real-service fixtures (moto server, ...); tests/ is on sys.path (rootdir conftest).
pytest_plugins = ["fixtures.moto", "fixtures.docker", "fixtures.cloud", "fixtures.agent",
                  "fixtures.nas"]


class NetworkEscape(AssertionError):
    """A test tried to reach beyond loopback."""


# A fixture that makes test hosts on this machine (network namespaces, see
# guestagent/localcloud/hosts.py) lists their subnets here, comma-separated; nothing else
# beyond loopback is ever allowed. Subprocesses read the same variable (guard/sitecustomize).
ALLOW_ENV = "TESTGUARD_ALLOW_CIDRS"


def _allowed_nets() -> list[Any]:
    nets = []
    for text in os.environ.get(ALLOW_ENV, "").split(","):
        if text.strip():
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
    return nets


def _loopback(address: Any) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths, netlink and friends stay on this machine
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or any(ip in net for net in _allowed_nets())


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            raise NetworkEscape(f"test tried to connect to {address!r}: only loopback is allowed")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            raise NetworkEscape(f"test tried to connect to {address!r}: only loopback is allowed")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    # Python subprocesses (the agent, its CLI) load the same guard through sitecustomize.
    guard = str(Path(__file__).parent / "guard")
    current = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", guard + (os.pathsep + current if current else ""))


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the machine's /etc/guestagent or inherits GUESTAGENT_* from the shell."""
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    for key in list(os.environ):
        if key.startswith("GUESTAGENT_"):
            monkeypatch.delenv(key)
    empty = tmp_path / "agent.toml"
    empty.touch()
    monkeypatch.setenv("GUESTAGENT_CONFIG", str(empty))


@pytest.fixture
def emulator() -> Iterator[Any]:
    """A running metadata emulator with the built-in scenario, on free loopback ports."""
    from guestagent.localcloud.emulator import Emulator

    with Emulator().start() as emu:
        yield emu


@pytest.fixture
def emulator_factory() -> Iterator[Any]:
    """Start emulators with a given scenario (object, or a name under tests/data/scenarios)."""
    from guestagent.localcloud.emulator import Emulator, load_scenario

    started: list[Any] = []

    def make(scenario: Any = None, **kwargs: Any) -> Any:
        if isinstance(scenario, str):
            scenario = load_scenario(DATA / "scenarios" / scenario)
        emu = Emulator(scenario, **kwargs).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()
