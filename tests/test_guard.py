"""The hermetic guard itself: leaving loopback fails loudly, in-process and in subprocesses."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from guestagent.metadata.client import MetadataClient


def test_in_process_connection_to_metadata_address_fails_loudly() -> None:
    with socket.socket() as s, pytest.raises(AssertionError, match="only loopback"):
        s.connect(("100.100.100.200", 80))


def test_default_client_never_reaches_the_real_service() -> None:
    client = MetadataClient()
    with pytest.raises(AssertionError, match=r"100\.100\.100\.200"):
        client.instance_id()


def test_subprocess_agent_is_guarded_too() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "guestagent.cli", "metadata", "get", "meta-data/instance-id"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode == 3
    assert "test guard" in out.stderr and "100.100.100.200" in out.stderr


def test_loopback_is_allowed() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname(), timeout=1) as conn:
            assert conn.getpeername() == srv.getsockname()



def test_a_subnet_named_by_a_fixture_is_allowed_and_nothing_else(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    from pathlib import Path

    # tests/conftest.py by path: another directory's conftest may own the name "conftest".
    spec = importlib.util.spec_from_file_location("guard_conftest",
                                                  Path(__file__).with_name("conftest.py"))
    assert spec is not None and spec.loader is not None
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    _loopback = guard._loopback

    monkeypatch.setenv("TESTGUARD_ALLOW_CIDRS", "10.213.250.0/30")
    for guarded in ("10.213.250.4", "100.100.100.200"):
        with socket.socket() as s, pytest.raises(AssertionError, match="only loopback"):
            s.connect((guarded, 22))
    assert _loopback(("10.213.250.1", 22)) and not _loopback(("10.213.250.4", 22))
    # The subprocess guard decides the same way (its check is called without connecting).
    code = ("import socket, sitecustomize as g\ns = socket.socket()\n"
            "g._check(s, ('10.213.250.2', 22))\nprint('allowed')\n"
            "g._check(s, ('10.213.250.9', 22))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.stdout.strip() == "allowed"
    assert "test guard" in out.stderr and "10.213.250.9" in out.stderr
