"""The rotation state machine on a fake clock: windows, faults, detach, clock skew."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from guestagent.credentials.rotation import Rotator
from guestagent.credentials.settings import CredentialSettings
from guestagent.metadata.errors import ServiceUnavailable
from guestagent.metadata.models import RoleCredentials

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


class FakeService:
    """A metadata service on a controllable clock: 6 h sets, a new one 30 min before expiry."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.roles = ["app-role"]
        self.down = False
        self.issued: list[RoleCredentials] = []
        self.fetches = 0

    def list_roles(self) -> list[str]:
        if self.down:
            raise ServiceUnavailable("metadata service unreachable: connection refused")
        return list(self.roles)

    def fetch(self, role: str) -> RoleCredentials | None:
        self.fetches += 1
        if self.down:
            raise ServiceUnavailable("metadata service unreachable: connection refused")
        if role not in self.roles:
            return None
        now = self.clock.wall_true()
        cur = self.issued[-1] if self.issued else None
        if cur is None or now >= cur.expiration.timestamp() - 1800:
            self.issue(now)
        return self.issued[-1]

    def issue(self, now: float) -> None:
        n = len(self.issued)
        issued = datetime.fromtimestamp(int(now), UTC)
        self.issued.append(
            RoleCredentials(
                access_key_id=f"STS.KEY{n:04d}",
                access_key_secret=f"secret-{n}-xxxxxxxxxxxx",
                security_token=f"token-{n}-yyyyyyyyyyyyyyyy",
                expiration=issued + timedelta(hours=6),
                last_updated=issued,
            )
        )


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.skew = 0.0  # local wall clock minus true time

    def monotonic(self) -> float:
        return self.mono

    def wall_true(self) -> float:
        return T0 + (self.mono - 1000.0)

    def wall(self) -> float:
        return self.wall_true() + self.skew

    def advance(self, seconds: float) -> None:
        self.mono += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(clock: FakeClock) -> FakeService:
    return FakeService(clock)


def make(service: FakeService, clock: FakeClock, *, date: bool = False,
         **overrides: object) -> Rotator:
    """A rotator on the fake clock; ``date``: the service sends its (true) time."""
    settings = CredentialSettings(**overrides)  # type: ignore[arg-type]
    settings.validate()
    return Rotator(
        settings, service.list_roles, service.fetch,
        clock=clock.monotonic, wall=clock.wall, rng=lambda: 0.5,
        service_clock=clock.wall_true if date else (lambda: None),
    )


def run_for(rot: Rotator, clock: FakeClock, seconds: float) -> None:
    """Drive the rotator as its thread would, for ``seconds`` of fake time."""
    end = clock.mono + seconds
    while True:
        delay = rot.step()
        if clock.mono + delay > end:
            clock.mono = end
            return
        clock.advance(delay)


def test_first_fetch_serves_and_schedules_the_advisory_window(service, clock):
    rot = make(service, clock)
    assert rot.snapshot.state == "pending"
    # Before the first fetch a request waits for it (then 503 if it does not come).
    assert rot.snapshot.verdict(clock.mono) == "wait"
    assert rot.snapshot.refusal(clock.mono)[1] == "CredentialsPending"
    delay = rot.step()
    snap = rot.snapshot
    assert snap.state == "ok" and snap.role == "app-role"
    assert snap.verdict(clock.mono) == "serve"
    assert snap.expires_at == pytest.approx(clock.mono + 6 * HOUR)
    assert delay == pytest.approx(300)  # poll interval while fresh (jitter centred)
    assert b"STS.KEY0000" in snap.bodies["alibaba"] and b"SecretAccessKey" in snap.bodies["aws"]


def test_rotation_is_picked_up_when_the_service_offers_a_newer_set(service, clock):
    rot = make(service, clock)
    lags: dict[str, float] = {}

    def seen(snap):
        creds = snap.credentials
        if creds is not None and creds.access_key_id not in lags:
            lags[creds.access_key_id] = clock.wall_true() - creds.last_updated.timestamp()

    rot.subscribe(seen)
    run_for(rot, clock, 24 * HOUR)
    assert len(lags) == 5  # 0h, 5.5h, 11h, 16.5h, 22h
    # Each new set is picked up within one jittered refresh interval of appearing.
    assert max(lags.values()) <= 60 * 1.2 + 1
    assert rot.snapshot.verdict(clock.mono) == "serve"


def test_service_down_keeps_the_last_set_then_refuses_in_the_mandatory_window(service, clock):
    rot = make(service, clock)
    rot.step()
    service.down = True
    run_for(rot, clock, 6 * HOUR - 601 - 1)
    snap = rot.snapshot
    assert snap.verdict(clock.mono) == "serve"  # faults never hide a valid set
    assert "unreachable" in snap.error
    clock.advance(2)  # now inside the mandatory window
    assert rot.snapshot.verdict(clock.mono) == "wait"
    rot.step()
    assert rot.snapshot.state == "failing"
    status, _code, message = rot.snapshot.refusal(clock.mono)
    assert status == 503 and "could not be refreshed" in message
    clock.advance(600)
    assert rot.snapshot.verdict(clock.mono) == "refuse"  # never an expired set
    service.down = False
    rot.step()  # the service is back: one refresh and it serves again
    assert rot.snapshot.verdict(clock.mono) == "serve"
    assert rot.snapshot.credentials.access_key_id == "STS.KEY0001"


def test_failures_retry_at_the_retry_interval(service, clock):
    rot = make(service, clock, retry_interval=7.0)
    rot.step()
    service.down = True
    clock.advance(5.6 * HOUR)
    assert rot.step() == pytest.approx(7.0)


def test_detach_stops_serving_and_reattach_resumes(service, clock, caplog):
    rot = make(service, clock)
    rot.step()
    service.roles = []
    rot.step()
    snap = rot.snapshot
    assert snap.state == "absent" and snap.verdict(clock.mono) == "refuse"
    status, code, message = snap.refusal(clock.mono)
    assert (status, code) == (404, "RoleNotAttached")
    assert "no RAM role" in message or "no longer attached" in message
    service.roles = ["app-role"]
    rot.step()
    assert rot.snapshot.verdict(clock.mono) == "serve"


def test_renamed_role_is_followed_when_not_configured(service, clock):
    rot = make(service, clock)
    rot.step()
    service.roles = ["new-role"]
    rot.step()
    assert rot.snapshot.role == "new-role" and rot.snapshot.state == "ok"


def test_configured_role_renamed_stops_with_a_clear_error(service, clock):
    rot = make(service, clock, role="app-role")
    rot.step()
    service.roles = ["other"]
    rot.step()
    snap = rot.snapshot
    assert snap.state == "absent"
    assert "'app-role' is not attached" in snap.error


def test_clock_ahead_without_a_date_header_refuses_naming_the_skew(service, clock, caplog):
    clock.skew = 8 * HOUR  # the local clock says the set expired long ago
    rot = make(service, clock, retry_interval=5.0)
    with caplog.at_level(logging.WARNING):
        delay = rot.step()
    snap = rot.snapshot
    # Clients compare Expiration with the host clock: they would reject this set.
    assert snap.verdict(clock.mono) == "refuse" and snap.host_expired()
    status, code, message = snap.refusal(clock.mono)
    assert (status, code) == (503, "ClockSkew")
    assert "host clock" in message and "NTP" in message
    assert snap.state == "failing" and "NTP" in snap.error
    assert "not serving" in caplog.text
    assert delay == pytest.approx(5.0)  # refresh keeps trying
    fetches = service.fetches
    run_for(rot, clock, 60)
    assert service.fetches >= fetches + 10
    # NTP fixes the clock: served at once, no refresh needed.
    clock.skew = 0
    assert rot.snapshot.verdict(clock.mono) == "serve"
    rot.step()
    assert rot.snapshot.state == "ok" and not rot.snapshot.error


def test_clock_ahead_of_the_services_date_says_fix_ntp(service, clock):
    clock.skew = 8 * HOUR
    rot = make(service, clock, date=True)
    rot.step()
    status, code, message = rot.snapshot.refusal(clock.mono)
    assert (status, code) == (503, "ClockSkew")
    assert f"{int(8 * HOUR)}s ahead of the metadata service's clock" in message
    assert "chronyc" in message
    # The service's clock also tells the set's true age: fresh, so six hours on monotonic.
    assert rot.snapshot.expires_at - clock.mono == pytest.approx(6 * HOUR, abs=2)


def test_clock_jumping_ahead_after_a_fetch_stops_serving_at_once(service, clock):
    rot = make(service, clock, date=True)
    rot.step()
    assert rot.snapshot.verdict(clock.mono) == "serve"
    clock.advance(60)
    clock.skew = 7 * HOUR  # a bad NTP step: the held set now looks expired to clients
    snap = rot.snapshot
    assert snap.verdict(clock.mono) == "refuse" and snap.host_expired()
    _status, code, message = snap.refusal(clock.mono)
    assert code == "ClockSkew" and f"{int(7 * HOUR)}s ahead" in message


def test_stale_set_with_clocks_agreeing_is_the_services_fault(service, clock):
    rot = make(service, clock, date=True)
    now = clock.wall_true()
    issued = datetime.fromtimestamp(int(now) - 7 * 3600, UTC)
    stale = RoleCredentials("STS.OLD", "s" * 20, "t" * 20, issued + timedelta(hours=6), issued)
    real_fetch = rot._fetch
    rot._fetch = lambda role: stale  # type: ignore[method-assign]
    rot.step()
    snap = rot.snapshot
    assert snap.verdict(clock.mono) == "refuse"
    status, code, message = snap.refusal(clock.mono)
    assert (status, code) == (503, "CredentialsExpired")
    assert "stale" in message and "agrees" in message
    rot._fetch = real_fetch  # type: ignore[method-assign]
    rot.step()
    assert rot.snapshot.verdict(clock.mono) == "serve"
    # And a stale set offered later never replaces a set clients can still use.
    rot._fetch = lambda role: stale  # type: ignore[method-assign]
    rot.step()
    assert rot.snapshot.verdict(clock.mono) == "serve"
    assert rot.snapshot.credentials.access_key_id != "STS.OLD"


def test_clock_behind_is_served_and_reported(service, clock, caplog):
    clock.skew = -3 * HOUR
    rot = make(service, clock, date=True)
    with caplog.at_level(logging.WARNING):
        rot.step()
        rot.step()
    snap = rot.snapshot
    assert snap.verdict(clock.mono) == "serve"
    assert snap.clock_offset(clock.mono) == pytest.approx(3 * HOUR, abs=2)
    assert caplog.text.count("behind the metadata service") == 1


def test_clock_behind_is_bounded_by_observed_rotation(service, clock):
    clock.skew = -3 * HOUR
    rot = make(service, clock)
    rot.step()
    run_for(rot, clock, 5.5 * HOUR + 120)
    # The second set was observed appearing: its age is bounded by the last look.
    snap = rot.snapshot
    assert snap.credentials.access_key_id == "STS.KEY0001"
    true_left = snap.credentials.expiration.timestamp() - clock.wall_true()
    assert snap.expires_at - clock.mono <= true_left + 1


def test_a_set_too_close_to_expiry_is_never_served(service, clock):
    rot = make(service, clock)
    now = clock.wall_true()
    issued = datetime.fromtimestamp(int(now) - 6 * 3600 + 60, UTC)
    stale = RoleCredentials("STS.OLD", "s" * 20, "t" * 20, issued + timedelta(hours=6), issued)
    rot._fetch = lambda role: stale  # type: ignore[method-assign]
    rot.step()
    assert rot.snapshot.verdict(clock.mono) == "refuse"
    assert "safety margin" in rot.snapshot.refusal(clock.mono)[2]


def test_waiters_are_woken_by_every_attempt(service, clock):
    rot = make(service, clock)
    rot.step()
    gen = rot.snapshot.generation
    service.down = True
    clock.advance(6 * HOUR - 500)
    rot.step()
    assert rot.wait_newer(gen, 0.01).generation > gen


def test_settings_reject_inconsistent_windows():
    with pytest.raises(ValueError, match="mandatory_window"):
        CredentialSettings(mandatory_window=3000).validate()
    with pytest.raises(ValueError, match="socket_mode"):
        CredentialSettings(socket_mode=0o666).validate()
    with pytest.raises(ValueError, match="tcp_host"):
        CredentialSettings(tcp_enabled=True, tcp_host="0.0.0.0").validate()
