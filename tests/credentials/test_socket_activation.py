"""Socket activation: the listeners systemd holds (units/guestagent.socket) are served, and
stay bound while the agent is down, so a client queues instead of reaching someone else."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from guestagent.credentials.settings import CredentialSettings

UNITS = Path(__file__).resolve().parents[2] / "units"

# What systemd does for a socket-activated service: the listeners as fds 3, 4, ... and
# LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES naming them, then exec.
LAUNCH = r"""
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                  LISTEN_FDNAMES=":".join(["credentials"] * len(fds)))
os.execvp(sys.executable, [sys.executable, "-m", "guestagent", "credentials", "serve"])
"""


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_socket_unit_holds_the_default_listeners() -> None:
    text = (UNITS / "guestagent.socket").read_text()
    listens = [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("ListenStream=")]
    defaults = CredentialSettings()
    assert listens == [str(defaults.socket_path), f"{defaults.tcp_host}:{defaults.tcp_port}"]
    assert defaults.tcp_enabled and defaults.tcp_port < 1024  # privileged: root only
    assert "FileDescriptorName=credentials" in text
    service = _unit("guestagent.service")
    assert service["Service"]["Sockets"] == "guestagent.socket"
    # Wants, not Requires: a failed socket unit must not keep the whole agent down.
    assert "guestagent.socket" in service["Unit"]["Wants"]
    assert "guestagent.socket" in service["Unit"]["After"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_socket_and_service_units_verify(tmp_path: Path) -> None:
    exe = shutil.which("guestagent") or sys.executable
    for name in ("guestagent.socket", "guestagent.service", "guestagent-firstboot-local.service"):
        (tmp_path / name).write_text(
            (UNITS / name).read_text().replace("/usr/local/bin/guestagent", exe))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "guestagent.socket"),
                          str(tmp_path / "guestagent.service")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "guestagent" not in res.stderr, res.stderr


def _ask(path: Path | None, tcp: tuple[str, int] | None, request: bytes) -> bytes:
    if path is not None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(str(path))
    else:
        assert tcp is not None
        sock = socket.create_connection(tcp, timeout=30)
    with sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_inherited_listeners_are_served_and_held_across_a_restart(emulator, tmp_path):
    from polling import wait_for

    run = tmp_path / "run"
    run.mkdir()
    path = run / "credentials.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen(16)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    port = tcp.getsockname()[1]
    config = tmp_path / "agent.toml"
    config.write_text(f'[metadata]\nurl = "{emulator.url}"\n[credentials]\n'
                      f'socket_path = "{path}"\ntcp_port = {port}\n')
    env = {**os.environ, "GUESTAGENT_CONFIG": str(config)}
    fds = f"{unix.fileno()},{tcp.fileno()}"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, fds], env=env,
                                pass_fds=(unix.fileno(), tcp.fileno()),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    first = start()
    try:
        wait_for(lambda: b" 200 " in _ask(path, None, health), timeout=60, tolerate=(OSError,))
        token = (run / "credentials.token").read_text().strip()
        aws = (b"GET /v1/credentials/aws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: " + token.encode() + b"\r\n\r\n")
        assert b"SecretAccessKey" in _ask(None, ("127.0.0.1", port), aws)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        # The agent is down: the port and the socket file stay held, nobody can take them.
        assert path.exists()
        with socket.socket() as thief, pytest.raises(OSError):
            thief.bind(("127.0.0.1", port))
        # A client connecting now queues, and is answered by the next agent.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=60)
        waiting.sendall(aws)
        second = start()
        try:
            with waiting:
                reply = b""
                while chunk := waiting.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and b"SecretAccessKey" in reply
            # A stop leaves systemd's socket file in place (it is not ours to remove).
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, second.stderr.read() if second.stderr else ""
            assert path.exists()
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()
        unix.close()
        tcp.close()
