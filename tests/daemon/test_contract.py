"""The service contract as other capabilities use it: requiring a service, reaching it
through the context, and a restart that leaks nothing."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from guestagent.config import from_mapping
from guestagent.credentials.consumers import CredentialAccess
from guestagent.credentials.local import UnixHTTPConnection
from guestagent.credentials.service import CredentialService
from guestagent.daemon import registry
from guestagent.daemon.registry import Context, NotReady, ServiceSpec, build
from guestagent.daemon.supervisor import Supervisor
from guestagent.metadata.client import MetadataClient
from guestagent.service import Service


def fetch(sock: Path) -> dict[str, Any]:
    conn = UnixHTTPConnection(str(sock), 5.0)
    try:
        conn.request("GET", "/v1/credentials/alibaba")
        resp = conn.getresponse()
        assert resp.status == 200
        return dict(json.loads(resp.read()))
    finally:
        conn.close()


def threads(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive())


@pytest.fixture
def creds(emulator: Any, tmp_path: Path) -> Any:
    settings = from_mapping({
        "metadata": {"url": emulator.url, "timeout": 0.5, "retries": 1, "backoff_base": 0.02,
                     "backoff_max": 0.05},
        "credentials": {"socket_path": str(tmp_path / "credentials.sock")},
    })
    client = MetadataClient(settings.metadata)
    yield settings, client
    client.close()


class Consumer(Service):
    """What a task launcher does: requires credentials, reaches them through the context."""

    name = "consumer"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seen: list[str] = []

    def run(self, stop: threading.Event) -> None:
        access = self.ctx.service("credentials", CredentialAccess)
        minted = access.mint("task-1")
        self.seen.append(minted.path)
        snap = access.source.snapshot
        self.seen.append(snap.state)
        while not self.wait(stop, 0.1):
            pass
        access.remove("task-1")


def test_a_service_reaches_a_required_ready_service_through_the_context(creds: Any) -> None:
    settings, client = creds
    sup = Supervisor()
    ctx = Context(settings, client, lambda request: None, lookup=sup.ready_service)
    service = CredentialService(settings, client)
    consumer = Consumer(ctx)
    sup.add(service)
    sup.add(consumer, requires=["credentials"])
    sup.start()
    wait_for(lambda: len(consumer.seen) == 2)
    assert consumer.seen[0].startswith("/") and service.registry.names() == ["task-1"]
    sup.stop(time.monotonic() + 10)
    assert service.registry.names() == []


def test_the_context_refuses_what_is_not_ready_or_not_offered(creds: Any) -> None:
    settings, client = creds
    sup = Supervisor()
    ctx = Context(settings, client, lambda request: None, lookup=sup.ready_service)
    sup.add(CredentialService(settings, client))
    with pytest.raises(NotReady, match="not running or not ready"):
        ctx.service("credentials", CredentialAccess)  # added, not started
    sup.start()
    wait_for(lambda: sup.ready_service("credentials"))
    with pytest.raises(NotReady, match="does not offer Supervisor"):
        ctx.service("credentials", Supervisor)
    sup.stop(time.monotonic() + 10)


def test_build_leaves_out_a_service_whose_requirement_is_off(
    creds: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings, client = creds
    settings = from_mapping({"credentials": {"enabled": False},
                             "userdata": {"enabled": False}})
    monkeypatch.setitem(registry._SPECS, "consumer", ServiceSpec(
        "consumer", 50, Consumer, requires=("credentials",)))
    ctx = Context(settings, client, lambda request: None)
    with caplog.at_level(logging.WARNING, logger="guestagent.daemon.registry"):
        names = [svc.name for _, svc in build(ctx)]
    assert "consumer" not in names and "credentials" not in names
    assert "service consumer not started: it requires credentials" in caplog.text


def test_a_dead_inner_thread_restarts_the_service_without_leaks(
    creds: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, client = creds
    service = CredentialService(settings, client)
    subscribers = len(service.rotator._subscribers)
    sup = Supervisor(backoff=0.05)
    sup.add(service)
    sup.start()
    sock = settings.credentials.socket_path
    first = wait_for(lambda: fetch(sock), tolerate=(OSError, AssertionError))
    assert first["Code"] == "Success"
    assert threads("credentials-rotator") == 1

    real = service.rotator.step
    calls = {"n": 0}

    def dies_once() -> float:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("rotator bug")
        return real()

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # expected death
    monkeypatch.setattr(service.rotator, "step", dies_once)
    service.rotator.kick()
    wait_for(lambda: sup.snapshot()[0]["restarts"] == 1 and service.ready)
    assert sup.snapshot()[0]["last_error"] == "RuntimeError: the credential rotator thread died"
    assert wait_for(lambda: fetch(sock), tolerate=(OSError, AssertionError))["Code"] == "Success"
    # One of each, as before: nothing of the first run was left behind.
    wait_for(lambda: threads("credentials-stop") == 1)
    assert threads("credentials-rotator") == 1 and threads("credentials-server") == 1
    assert len(service.rotator._subscribers) == subscribers
    sup.stop(time.monotonic() + 10)
    wait_for(lambda: threads("credentials-") == 0)
