"""Metadata faults never make a client see an error or an expired set while the last set is
valid; past the mandatory window a clear 503; the service back, credentials back."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from guestagent.metadata.models import parse_time

RAM = "meta-data/ram/security-credentials/*"


class Sampler:
    """Ask the server continuously (both listeners) and keep every answer."""

    def __init__(self, svc) -> None:
        self.svc = svc
        self.answers: list[tuple[int, dict, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            via = "unix" if n % 2 else "tcp"
            n += 1
            status, doc = self.svc.get("/v1/credentials/aws", via=via)
            self.answers.append((status, doc, time.time()))
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def check_never_expired(self) -> None:
        for status, doc, at in self.answers:
            if status == 200:
                expires = parse_time(doc["Expiration"], "served").timestamp()
                # Expiration has 1 s resolution (truncated): the set is valid until >= it.
                assert expires > at - 0.001 + 0.1, (doc["AccessKeyId"], expires, at)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("status", {"status": 500}),
        ("status", {"status": 503}),
        ("reset", {}),
        ("hang", {}),
        ("truncate", {}),
        ("body", {"body": "{not json"}),
        ("status", {"status": 401}),
    ],
    ids=["500", "503", "reset", "hang", "truncate", "bad-json", "401"],
)
def test_faults_during_refresh_keep_serving_the_valid_set(credential_service, emulator, kind,
                                                         extra):
    # Unscaled validity (6 h): the fault, not the clock, is what is tested here.
    svc = credential_service(scaled=False, poll_interval=0.1, retry_interval=0.1)
    before = svc.served_key()
    emulator.add_fault(RAM, kind, **extra)
    emulator.rotate_credentials()  # a newer set is on offer, behind the fault
    with Sampler(svc) as sampler:
        time.sleep(1.2)
    statuses = {s for s, _d, _t in sampler.answers}
    assert statuses == {200}, sampler.answers[-1]
    assert {d["AccessKeyId"] for _s, d, _t in sampler.answers} == {before}
    assert "error" in svc.get("/v1/health")[1]  # the fault is visible to operators
    emulator.clear_faults()
    newest = emulator.issued_credentials()[-1]["AccessKeyId"]
    svc.wait_for(lambda: svc.served_key() == newest, timeout=3)


def test_token_expiry_is_survived(credential_service, emulator):
    emulator.set_token_required(True)
    svc = credential_service(scaled=False, poll_interval=0.1)
    with Sampler(svc) as sampler:
        for _ in range(3):
            emulator.revoke_tokens()
            emulator.rotate_credentials()
            newest = emulator.issued_credentials()[-1]["AccessKeyId"]
            svc.wait_for(lambda k=newest: svc.served_key() == k, timeout=3)
    assert {s for s, _d, _t in sampler.answers} == {200}


def test_rotation_through_the_advisory_window_with_a_5xx_burst(credential_service, emulator):
    svc = credential_service()  # sets live 12 s, the next appears 1 s before expiry
    first = svc.served_key()
    expires = parse_time(emulator.current_credentials()["Expiration"], "e").timestamp()
    with Sampler(svc) as sampler:
        # A burst right when the new set appears; shorter than the gap to the mandatory window.
        time.sleep(max(0.0, expires - 1.2 - time.time()))
        emulator.add_fault(RAM, "status", status=500, count=3)
        svc.wait_for(lambda: svc.served_key() not in (None, first), timeout=5)
        time.sleep(0.3)
    assert {s for s, _d, _t in sampler.answers} == {200}
    sampler.check_never_expired()


def test_service_down_past_the_mandatory_window_gives_503_then_recovers(credential_service,
                                                                       emulator):
    svc = credential_service()
    expires = parse_time(emulator.current_credentials()["Expiration"], "e").timestamp()
    emulator.add_fault(RAM, "status", status=500)
    emulator.add_fault("/latest/api/token", "reset")
    with Sampler(svc) as sampler:
        time.sleep(max(0.0, expires + 0.5 - time.time()))
        status, doc = svc.get("/v1/credentials/aws")
        assert status == 503 and doc["code"] == "CredentialsUnavailable"
        assert "could not be refreshed" in doc["message"]
        status, doc = svc.get("/v1/credentials/alibaba", via="tcp")
        assert status == 503
        assert svc.get("/v1/health")[0] == 503
        emulator.clear_faults()
        t0 = time.monotonic()
        svc.wait_for(lambda: svc.served_key() is not None, timeout=3)
        back_in = time.monotonic() - t0
    sampler.check_never_expired()
    statuses = [s for s, _d, _t in sampler.answers]
    assert 503 in statuses
    assert set(statuses) <= {200, 503}
    # Within one refresh (retry_interval 0.1 s + a metadata round trip).
    assert back_in < 1.0


def test_detach_stops_serving_and_reattach_resumes(credential_service, emulator):
    svc = credential_service(scaled=False, retry_interval=0.1, poll_interval=0.1)
    emulator.detach_role()
    svc.wait_for(lambda: svc.get("/v1/credentials/aws")[0] == 404, timeout=3)
    _status, doc = svc.get("/v1/credentials/alibaba", via="tcp")
    assert doc["code"] == "RoleNotAttached" and "attach a RAM role" in doc["message"]
    emulator.attach_role("OtherRole")  # renamed: followed, since no role is configured
    svc.wait_for(lambda: svc.served_key() is not None, timeout=3)
    assert svc.get("/v1/health")[1]["role"] == "OtherRole"


def test_configured_role_renamed_is_a_clear_error(credential_service, emulator):
    svc = credential_service(scaled=False, role="EcsRamRoleDemo", retry_interval=0.1,
                             poll_interval=0.1)
    emulator.detach_role()
    emulator.attach_role("Renamed")
    svc.wait_for(lambda: svc.get("/v1/credentials/aws")[0] == 404, timeout=3)
    doc = svc.get("/v1/credentials/aws")[1]
    assert "'EcsRamRoleDemo' is not attached" in doc["message"]
    emulator.detach_role()
    emulator.attach_role("EcsRamRoleDemo")
    svc.wait_for(lambda: svc.served_key() is not None, timeout=3)


def test_no_role_at_start_then_attached(credential_service, emulator):
    emulator.detach_role()
    svc = credential_service(scaled=False, retry_interval=0.1, wait_ok=False)
    svc.wait_for(lambda: svc.service.rotator.snapshot.state == "absent", timeout=3)
    assert svc.get("/v1/credentials/aws")[0] == 404
    emulator.attach_role("Late")
    svc.wait_for(lambda: svc.served_key() is not None, timeout=3)
    assert datetime.now(UTC) < parse_time(svc.get("/v1/credentials/aws")[1]["Expiration"], "e")


def test_host_clock_ahead_is_refused_naming_the_skew_then_served_once_fixed(
        credential_service, emulator):
    skew = [8 * 3600.0]  # the host clock says every set the service hands out has expired
    svc = credential_service(scaled=False, retry_interval=0.1, wait_ok=False,
                             wall=lambda: time.time() + skew[0])
    svc.wait_for(lambda: svc.service.rotator.snapshot.host_expired(), timeout=5)
    for via, fmt in (("unix", "aws"), ("tcp", "alibaba")):
        status, doc = svc.get(f"/v1/credentials/{fmt}", via=via)
        assert status == 503 and doc["code"] == "ClockSkew", doc
        # Names the skew against the service's own clock (its Date header) and the fix.
        assert "ahead of the metadata service's clock" in doc["message"]
        assert "NTP" in doc["message"] and "AccessKeyId" not in doc
    status, health = svc.get("/v1/health")
    assert status == 503 and health["clock_offset"] <= -8 * 3600 + 10
    assert not svc.service.healthy()
    fetched = svc.service.rotator.refreshes
    svc.wait_for(lambda: svc.service.rotator.refreshes >= fetched + 3)  # keeps trying
    skew[0] = 0.0  # NTP steps the clock back
    assert svc.get("/v1/credentials/aws")[0] == 200  # at once, no refresh needed
    svc.wait_for(svc.service.healthy)
    assert "clock_offset" not in svc.get("/v1/health")[1]


def test_role_listing_that_is_not_a_name_is_a_bad_answer_never_shown(credential_service,
                                                                      emulator, caplog):
    import json as jsonlib
    import logging

    leak = "LeakedSecretValue0123456789"
    body = jsonlib.dumps({"AccessKeyId": "STS.x", "AccessKeySecret": leak}, indent=2)
    emulator.add_fault("meta-data/ram/security-credentials/", "body", body=body)
    with caplog.at_level(logging.DEBUG):
        svc = credential_service(scaled=False, retry_interval=0.1, wait_ok=False)
        svc.wait_for(lambda: "role listing" in svc.service.rotator.snapshot.error, timeout=5)
        status, health = svc.get("/v1/health")
        assert status == 503 and health["role"] == ""
        assert "not a RAM role listing (a JSON document" in health["error"]
        status, doc = svc.get("/v1/credentials/aws")
        assert status == 503 and leak not in jsonlib.dumps(doc)
        assert leak not in jsonlib.dumps(svc.service.status())
    assert leak not in caplog.text and "AccessKeySecret" not in caplog.text
    emulator.clear_faults()
    svc.wait_for(lambda: svc.served_key() is not None, timeout=5)
