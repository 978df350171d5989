"""A client that repeats its request byte for byte on one keep-alive connection (what SDKs
polling for credentials do) meets every check the first request met: a removed consumer,
a lapsed session token or a new credential set shows on that same connection."""

from __future__ import annotations

import json
import socket
from typing import Any

from polling import wait_for


class Raw:
    """One TCP connection to the server, requests sent as exact bytes."""

    def __init__(self, running: Any) -> None:
        self.sock = socket.create_connection(running.tcp, timeout=10)
        self.buf = b""

    def call(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return int(head.split(b" ", 2)[1]), rest[:length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        return chunk

    def close(self) -> None:
        self.sock.close()


def test_removed_consumer_is_refused_on_the_connection_it_used(credential_service: Any) -> None:
    running = credential_service(scaled=False)
    minted = running.service.mint("task-keepalive", with_path=False)
    conn = Raw(running)
    try:
        request = ("GET", "/v1/credentials/aws", {"Authorization": minted.token})
        assert conn.call(*request)[0] == 200
        assert conn.call(*request)[0] == 200  # the repeat is served as well
        running.service.remove("task-keepalive")
        status, body = conn.call(*request)
        assert status == 401 and b"AccessKeyId" not in body
    finally:
        conn.close()


def test_lapsed_session_token_is_refused_on_the_connection_it_used(
    credential_service: Any,
) -> None:
    running = credential_service(scaled=False)
    conn = Raw(running)
    try:
        status, session = conn.call("PUT", "/latest/api/token",
                                    {"X-aws-ec2-metadata-token-ttl-seconds": "1"})
        assert status == 200
        role = running.service.rotator.snapshot.role
        request = ("GET", f"/latest/meta-data/iam/security-credentials/{role}",
                   {"X-aws-ec2-metadata-token": session.decode()})
        assert conn.call(*request)[0] == 200
        # Repeated on the same connection until the token's second is over.
        wait_for(lambda: conn.call(*request)[0] == 401, timeout=30)
        assert conn.call(*request)[0] == 401
    finally:
        conn.close()


def test_a_new_credential_set_reaches_a_polling_connection(credential_service: Any) -> None:
    running = credential_service()  # time-scaled: a set lives seconds
    conn = Raw(running)
    try:
        request = ("GET", "/v1/credentials/aws", {"Authorization": running.token})

        def key() -> str:
            status, body = conn.call(*request)
            assert status == 200
            return str(json.loads(body)["AccessKeyId"])

        first = key()
        wait_for(lambda: key() != first, timeout=60, step=0.2)
    finally:
        conn.close()
