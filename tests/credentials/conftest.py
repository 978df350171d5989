"""Fixtures of the credential tests: a running CredentialService against the emulator with
time-scaled windows, HTTP helpers for both listeners, and throwaway users."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.cloud import SCALE, SCALED  # sets live 12 s, windows to match

from guestagent.config import Settings, from_mapping
from guestagent.credentials.local import UnixHTTPConnection
from guestagent.credentials.service import CredentialService
from guestagent.metadata.client import MetadataClient


class Running:
    """A started service plus what tests need to talk to it."""

    def __init__(self, service: CredentialService, settings: Settings, stop: threading.Event):
        self.service = service
        self.settings = settings
        self.stop = stop
        self.socket_path = settings.credentials.socket_path

    @property
    def tcp(self) -> tuple[str, int]:
        assert self.service.server is not None and self.service.server.tcp_address
        host, port = self.service.server.tcp_address
        return host, port

    @property
    def tcp_url(self) -> str:
        return "http://{}:{}".format(*self.tcp)

    @property
    def token(self) -> str:
        return self.service.token_file.read_text().strip()

    def get(self, path: str, *, via: str = "unix", headers: dict[str, str] | None = None,
            auth: bool = True) -> tuple[int, dict[str, Any]]:
        """GET over a listener; on TCP with the endpoint's token unless ``auth=False``."""
        conn = unix_connection(self.socket_path) if via == "unix" else \
            http.client.HTTPConnection(*self.tcp, timeout=10)
        headers = dict(headers or {})
        if via == "tcp" and auth and "Authorization" not in headers:
            headers["Authorization"] = self.token
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s: {self.service.status()}")
            time.sleep(0.02)

    def served_key(self, via: str = "unix") -> str | None:
        status, doc = self.get("/v1/credentials/aws", via=via)
        return doc.get("AccessKeyId") if status == 200 else None


def unix_connection(path: Path) -> http.client.HTTPConnection:
    return UnixHTTPConnection(str(path), 10.0)


@pytest.fixture
def credential_service(emulator: Any, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start a CredentialService against the emulator; keyword args override settings."""
    started: list[Running] = []
    clients: list[MetadataClient] = []

    def start(*, scaled: bool = True, metadata: dict[str, Any] | None = None,
              wait_ok: bool = True, wall: Callable[[], float] = time.time,
              **overrides: Any) -> Running:
        creds: dict[str, Any] = {
            "socket_path": str(tmp_path / "run" / "credentials.sock"),
            "tcp_enabled": True,
            "tcp_port": 0,
        }
        if scaled:
            emulator.set_time_scale(SCALE)
            creds.update(SCALED)
        creds.update({k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
        meta = {"url": emulator.url, "timeout": 0.5, "retries": 1, "backoff_base": 0.02,
                "backoff_max": 0.05}
        meta.update(metadata or {})
        settings = from_mapping({"metadata": meta, "credentials": creds})
        client = MetadataClient(settings.metadata)
        clients.append(client)
        service = CredentialService(settings, client, wall=wall)
        stop = threading.Event()
        service.start(stop)
        running = Running(service, settings, stop)
        started.append(running)
        if wait_ok:
            running.wait_for(lambda: service.rotator.snapshot.state == "ok")
        return running

    yield start
    for running in started:
        running.stop.set()
        running.service.close()
    for client in clients:
        client.close()


def _ensure_user(name: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)
        return pwd.getpwnam(name).pw_uid


@pytest.fixture(scope="session")
def test_users() -> dict[str, int]:
    """Throwaway system users: one the tests allow, one they never allow."""
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create test users")
    return {name: _ensure_user(name) for name in ("ga-test-allowed", "ga-test-denied")}
