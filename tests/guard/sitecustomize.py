"""Loaded by every Python subprocess a test starts (the tests put this directory on
PYTHONPATH): the same loopback-only guard as the in-process one, so an agent process
started by a test can never reach 100.100.100.200 or anything else off this machine."""

import ipaddress
import os
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(sock: socket.socket, address: object) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
        ok = ip.is_loopback or any(ip in net for net in _allowed())
    except ValueError:
        ok = host == "localhost"
    if not ok:
        msg = f"test guard: connection to {address!r} refused (tests are loopback-only)"
        os.write(2, (msg + "\n").encode())
        raise ConnectionRefusedError(msg)


def _allowed() -> list[object]:
    # Test hosts (network namespaces) a fixture made and named explicitly; nothing else.
    raw = os.environ.get("TESTGUARD_ALLOW_CIDRS", "")
    return [ipaddress.ip_network(t.strip(), strict=False) for t in raw.split(",") if t.strip()]


def _connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    _real_connect(self, address)  # type: ignore[arg-type]


def _connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)  # type: ignore[arg-type]


socket.socket.connect = _connect  # type: ignore[method-assign]
socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
