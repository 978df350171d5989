"""Repeated keys in the JSON we are sent (a job, a control request, a daemon socket
request) are refused by name, before the request does anything."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from guestagent import jsondoc
from guestagent.jsonsocket import JsonServer


def test_loads_names_the_repeated_key_at_any_depth() -> None:
    assert jsondoc.loads('{"a": {"b": 1}, "c": [{"b": 2}]}') == {"a": {"b": 1}, "c": [{"b": 2}]}
    with pytest.raises(jsondoc.DuplicateKey) as info:
        jsondoc.loads('{"a": [{"x": 1, "x": 2}]}')
    assert info.value.key == "x"
    assert str(info.value) == "key 'x' appears twice in one object: keep one"


def test_daemon_socket_refuses_a_repeated_key_without_calling_the_handler(
        tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        calls.append(request)
        return {"ok": True}

    server = JsonServer(tmp_path / "s.sock", handler, name="test").start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(str(tmp_path / "s.sock"))
        sock.sendall(b'{"command": "run", "job": "a", "job": "b"}\n')
        answer = sock.makefile("rb").readline()
        sock.close()
    finally:
        server.close()
    assert b"bad request: key 'job' appears twice" in answer
    assert calls == []
