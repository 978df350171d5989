"""The local server's HTTP limits, as a misbehaving client meets them: head size however the
bytes arrive, proxies refused, header and idle timeouts, connection caps."""

from __future__ import annotations

import json
import socket

import pytest


def raw(svc, data: bytes | list[bytes], via: str = "tcp", timeout: float = 10.0) -> bytes:
    """Send ``data`` (one write, or several) and read until the server closes."""
    if via == "tcp":
        sock = socket.create_connection(svc.tcp, timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(str(svc.socket_path))
    with sock:
        for chunk in [data] if isinstance(data, bytes) else data:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # refused mid-way: the answer is already waiting
        out = b""
        while True:
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                return out
            if not got:
                return out
            out += got


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def request(head_extra: bytes = b"", path: bytes = b"/v1/health") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + head_extra + \
        b"Connection: close\r\n\r\n"


@pytest.mark.parametrize("via", ["tcp", "unix"])
@pytest.mark.parametrize("arrival", ["one read", "small pieces"])
def test_head_limit_holds_however_the_bytes_arrive(credential_service, via, arrival):
    svc = credential_service(scaled=False)
    big = request(b"X-Pad: " + b"a" * 100_000 + b"\r\n")
    chunks = big if arrival == "one read" else [big[i:i + 1000] for i in range(0, len(big), 1000)]
    reply = raw(svc, chunks, via=via)
    assert status_of(reply) == 431, reply[:200]
    assert body_of(reply)["code"] == "HeaderTooLarge"
    assert b"SecretAccessKey" not in reply
    # A head just under the limit is fine.
    ok = request(b"X-Pad: " + b"a" * 7000 + b"\r\n")
    assert status_of(raw(svc, ok, via=via)) == 200


@pytest.mark.parametrize("header", [b"Forwarded: for=10.0.0.1", b"X-Forwarded-For: 10.0.0.1",
                                    b"X-Real-IP: 10.0.0.1", b"forwarded: for=\"[::1]\""])
def test_proxy_headers_are_refused(credential_service, header):
    svc = credential_service(scaled=False)
    for via in ("tcp", "unix"):
        reply = raw(svc, request(header + b"\r\n"), via=via)
        assert status_of(reply) == 403
        doc = body_of(reply)
        assert doc["code"] == "Forbidden" and "proxy" in doc["message"]
        assert "AccessKeyId" not in doc


def test_half_sent_head_is_timed_out_with_408(credential_service):
    svc = credential_service(scaled=False, header_timeout=0.3)
    for via in ("tcp", "unix"):
        # Never finishes its head: the server answers 408 and closes (raw() returns).
        reply = raw(svc, b"GET /v1/credentials/aws HTTP/1.1\r\nHost: x\r\n", via=via)
        assert status_of(reply) == 408 and body_of(reply)["code"] == "RequestTimeout"


def test_silent_and_idle_keep_alive_connections_are_closed(credential_service):
    svc = credential_service(scaled=False, header_timeout=0.3, idle_timeout=0.5)
    # Connects and says nothing: closed without an answer.
    assert raw(svc, b"") == b""
    # One request on a keep-alive connection, then silence: closed after idle_timeout.
    keep = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    for via in ("tcp", "unix"):
        reply = raw(svc, keep, via=via)
        assert status_of(reply) == 200 and reply.count(b"HTTP/1.1") == 1


def _open(svc, via: str) -> socket.socket:
    if via == "tcp":
        return socket.create_connection(svc.tcp, timeout=10)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(svc.socket_path))
    return sock


def _ask(sock: socket.socket) -> int:
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        got = sock.recv(65536)
        if not got:
            break
        reply += got
    return status_of(reply) if reply else 0


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_connections_per_peer_are_capped(credential_service, via):
    svc = credential_service(scaled=False, max_connections_per_peer=3, max_connections=50)
    held = [_open(svc, via) for _ in range(3)]
    try:
        assert [_ask(s) for s in held] == [200] * 3
        extra = _open(svc, via)
        with extra:
            assert _ask(extra) == 503
        held.pop().close()  # one closes: a new one is admitted again
        polling_ok = False
        for _ in range(200):
            fresh = _open(svc, via)
            with fresh:
                if _ask(fresh) == 200:
                    polling_ok = True
                    break
        assert polling_ok
    finally:
        for s in held:
            s.close()


def test_total_connections_are_capped(credential_service):
    svc = credential_service(scaled=False, max_connections_per_peer=4, max_connections=4)
    held = [_open(svc, via) for via in ("tcp", "unix", "tcp", "unix")]
    try:
        assert [_ask(s) for s in held] == [200] * 4
        with _open(svc, "unix") as extra:
            extra.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = extra.recv(65536)
        assert status_of(reply) == 503 and b"TooManyConnections" in reply
    finally:
        for s in held:
            s.close()
