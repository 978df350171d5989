"""Peer identification for loopback TCP: the exact sock_diag lookup agrees with the table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from guestagent.credentials import peers


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                               (socket.AF_INET6, "::1")])
def test_diag_and_table_agree(family: int, host: str) -> None:
    with socket.socket(family) as srv:
        srv.bind((host, 0))
        srv.listen()
        with socket.socket(family) as cli:
            cli.connect(srv.getsockname()[:2])
            conn, _ = srv.accept()
            with conn:
                remote, local = conn.getpeername()[:2], conn.getsockname()[:2]
                assert peers._uid_from_diag(remote, local) == os.getuid()
                assert peers._uid_from_table(remote, local) == os.getuid()
                assert peers.tcp_peer(local, remote).uid == os.getuid()


def test_unknown_pair_is_not_identified() -> None:
    assert peers._uid_from_diag(("127.0.0.1", 1), ("127.0.0.1", 2)) is None


def test_other_users_socket_is_identified(test_users: dict[str, int]) -> None:
    """A client running as another uid is seen as that uid (what the allow-list checks)."""
    uid = test_users["ga-test-denied"]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        child = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
             "-c", f"import socket,time; s=socket.create_connection(('127.0.0.1',{port}));"
             " time.sleep(5)"],
        )
        try:
            conn, _ = srv.accept()
            with conn:
                start = time.perf_counter()
                peer = peers.tcp_peer(conn.getsockname()[:2], conn.getpeername()[:2])
                took = time.perf_counter() - start
            assert peer.uid == uid
            assert took < 0.05, f"peer lookup took {took * 1000:.1f} ms"
        finally:
            child.kill()
            child.wait()
