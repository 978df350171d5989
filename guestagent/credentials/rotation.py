"""Keep the RAM role's current STS set, refreshed before it runs out.

The rotator is a small state machine driven by :meth:`Rotator.step`: one look at the
metadata service, then the delay until the next look. Fetch functions and clocks are
injected so the whole schedule is unit-testable without a service or real time.

Time: the set's validity comes from the service's own ``Expiration - LastUpdated``; how
much of it is left is measured on the monotonic clock from the moment the set was fetched.
The set's age at that moment comes from the service's own clock (its ``Date`` header) when
it sent one, else from the host clock when that agrees with the service's times; when a
rotation is observed, the time since the previous look bounds that age.

The host clock matters in one more way: clients compare ``Expiration`` with it, so a set
that is expired (or inside the safety margin) *by the host clock* is useless to them
(boto3: "refreshed credentials are still expired"). Such a set is never served: requests
get 503 naming the skew, health is unhealthy, refresh keeps trying, and serving resumes the
moment the clock is right. The ``Date`` header says which side is wrong:

- host clock ahead of the service's (``ClockSkew``): fix the host's time (NTP);
- host and service agree, set already expired (``CredentialsExpired``): the service handed
  out a stale set; we keep asking for a fresh one;
- host clock behind: sets are served (they are valid, and clients accept them), but
  clients that cache a set until its ``Expiration`` by the host clock may use it after it
  really expired; the skew is reported in health and logged once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from guestagent.credentials import formats
from guestagent.credentials.settings import CredentialSettings
from guestagent.metadata.errors import MetadataError
from guestagent.metadata.models import RoleCredentials, format_time

log = logging.getLogger(__name__)

State = Literal["pending", "ok", "absent", "failing"]
Verdict = Literal["serve", "wait", "refuse"]

# A wall clock this far before LastUpdated is considered wrong (the service's second
# resolution and a little drift are fine).
CLOCK_TOLERANCE = 60.0
# Host and service clocks (``Date`` header: whole seconds, plus latency) this far apart
# disagree.
DATE_TOLERANCE = 5.0
NTP_HINT = "fix the host's time (NTP: check `chronyc tracking` or `timedatectl status`)"
NO_ROLE_HINT = "attach a RAM role to the instance (ECS console or AttachInstanceRamRole)"


@dataclass(frozen=True)
class Snapshot:
    """What the server hands out, published whole so readers never see a half-update.

    Times are ``clock()`` (monotonic) values. ``bodies`` holds every response format
    pre-serialised, so serving a request is one lookup.
    """

    generation: int
    state: State
    role: str = ""
    credentials: RoleCredentials | None = None
    expires_at: float = 0.0
    usable_until: float = 0.0
    serve_until: float = 0.0
    error: str = ""
    bodies: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    # Host-clock view: serve only while wall() < host_deadline (Expiration - safety margin).
    host_deadline: float = 0.0
    wall: Callable[[], float] = field(default=time.time, repr=False, compare=False)
    # The service's clock (its Date header) minus clock(), as of the last answer; the
    # service's time now is clock() + service_base (None: it sent no Date).
    service_base: float | None = None
    # The service offered this set already expired (or nearly) by the host clock.
    offered_stale: bool = False

    def verdict(self, now: float) -> Verdict:
        """``serve`` now; ``wait`` for a refresh (mandatory window, or the first fetch
        after a start: clients queued across a restart get an answer, not a 503); or
        ``refuse``."""
        if self.credentials is None:
            return "wait" if self.state == "pending" else "refuse"
        if now >= self.serve_until:
            return "refuse"
        if self.wall() >= self.host_deadline:
            return "refuse"  # clients would reject it: see the module docstring
        return "serve" if now < self.usable_until else "wait"

    def host_expired(self) -> bool:
        """The set is expired, or inside the safety margin, by the host clock."""
        return self.credentials is not None and self.wall() >= self.host_deadline

    def clock_offset(self, now: float) -> float | None:
        """Seconds the service's clock is ahead of the host's (negative: host ahead)."""
        return None if self.service_base is None else now + self.service_base - self.wall()

    def refusal(self, now: float) -> tuple[int, str, str]:
        """HTTP status, code and one-line message for a request that cannot be served."""
        offset = self.clock_offset(now)
        host_ahead = offset is not None and -offset > DATE_TOLERANCE
        # A set that expired while refreshes failed is not a clock problem.
        clock_fault = host_ahead or self.offered_stale or now < self.serve_until
        if self.host_expired() and clock_fault:
            assert self.credentials is not None
            return clock_refusal(self.credentials, self.wall(), self.clock_offset(now),
                                 self.host_deadline)
        if self.state == "absent":
            return 404, "RoleNotAttached", self.error
        if self.credentials is None:
            if self.state == "pending":
                return 503, "CredentialsPending", "no credentials fetched yet; retry shortly"
            return 503, "CredentialsUnavailable", f"no credentials yet: {self.error}"
        left = max(0, int(self.expires_at - now))
        why = self.error or "no newer set offered yet"
        return (
            503,
            "CredentialsUnavailable",
            f"the role's credentials expire in {left}s and could not be refreshed: {why}",
        )


def clock_refusal(
    creds: RoleCredentials, wall: float, offset: float | None, deadline: float
) -> tuple[int, str, str]:
    """503 for a set the host clock calls expired: which clock is wrong, and what to do."""
    expiration = format_time(creds.expiration)
    host = format_time(datetime.fromtimestamp(wall, UTC))
    margin = int(creds.expiration.timestamp() - deadline)
    head = (f"the role's credentials expire {expiration} but the host clock reads {host} "
            f"(expired or within the {margin}s safety margin), so clients would reject them")
    if offset is not None and -offset > DATE_TOLERANCE:
        return 503, "ClockSkew", (
            f"{head}: the host clock is {int(-offset)}s ahead of the metadata service's clock "
            f"(its Date header); {NTP_HINT}; serving resumes once the clock is right"
        )
    if offset is not None and abs(offset) <= DATE_TOLERANCE:
        return 503, "CredentialsExpired", (
            f"{head}: the host clock agrees with the metadata service's, so the service "
            "offered a stale set; asking it again until it offers a fresh one"
        )
    return 503, "ClockSkew", (
        f"{head}: if the host clock is wrong, {NTP_HINT}; otherwise the metadata service "
        "offered a stale set; asking it again"
    )


class Rotator:
    """Fetch, schedule and publish the role's credentials (one thread calls ``step``/``run``)."""

    def __init__(
        self,
        settings: CredentialSettings,
        list_roles: Callable[[], list[str]],
        fetch: Callable[[str], RoleCredentials | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        service_clock: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._list_roles = list_roles
        self._fetch = fetch
        self._clock = clock
        self._wall = wall
        self._service_clock = service_clock
        self._offset: float | None = None  # at the last answer
        self._service_base: float | None = None
        self._rng = rng
        self._role = settings.role
        self._snapshot = Snapshot(generation=0, state="pending", role=settings.role, wall=wall)
        self._subscribers: list[Callable[[Snapshot], None]] = []
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._last_ok: float | None = None  # clock() of the last fetch that returned a set
        self._last_attempt: float | None = None
        self._clock_warned = False
        self._failures = 0
        self.refreshes = 0

    # -- reading ---------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` after every publish (from the rotator's thread)."""
        self._subscribers.append(callback)

    def kick(self) -> None:
        """Ask for a refresh now (a request is waiting in the mandatory window)."""
        self._wake.set()

    def wait_newer(self, generation: int, timeout: float) -> Snapshot:
        """Block until a snapshot newer than ``generation`` is published, or ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._snapshot.generation > generation, timeout)
            return self._snapshot

    # -- driving ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop``; a :meth:`kick` brings the next step forward (rate-limited)."""
        def relay() -> None:
            stop.wait()
            self._wake.set()

        waker = threading.Thread(target=relay, name="credentials-stop", daemon=True)
        waker.start()
        delay = 0.0
        while not stop.is_set():
            due = self._clock() + delay
            while not stop.is_set():
                left = due - self._clock()
                if left <= 0:
                    break
                if self._wake.wait(left):
                    self._wake.clear()
                    # A kick may bring the step forward, but not hammer the service.
                    floor = (self._last_attempt or 0.0) + min(1.0, self.settings.retry_interval)
                    due = min(due, max(floor, self._clock()))
            if stop.is_set():
                break
            delay = self.step()

    def step(self) -> float:
        """Look at the service once, publish what changed, return seconds until the next look."""
        now = self._clock()
        self._last_attempt = now
        self.refreshes += 1
        try:
            role, creds = self._lookup()
        except MetadataError as exc:
            return self._failed(str(exc), now)
        if creds is None:
            return self._absent(role, now)
        try:
            return self._got(role, creds, now)
        except ValueError as exc:
            return self._failed(str(exc), now)

    # -- internals -------------------------------------------------------------------

    def _lookup(self) -> tuple[str, RoleCredentials | None]:
        configured = self.settings.role
        if configured:
            return configured, self._fetch(configured)
        if self._role:
            creds = self._fetch(self._role)
            if creds is not None:
                return self._role, creds
            # The role we used went away: detached, or renamed (then another is listed).
        roles = sorted(self._list_roles())
        if not roles:
            return "", None
        if len(roles) > 1:
            log.warning("several RAM roles listed (%s); using %s", ", ".join(roles), roles[0])
        if roles[0] != self._role:
            if self._role:
                log.warning("RAM role changed from %s to %s", self._role, roles[0])
            self._role = roles[0]
        return self._role, self._fetch(self._role)

    def _got(self, role: str, creds: RoleCredentials, now: float) -> float:
        s = self.settings
        current = self._snapshot
        same = (
            current.credentials is not None
            and current.role == role
            and current.credentials.access_key_id == creds.access_key_id
            and current.credentials.expiration == creds.expiration
        )
        service_now = self._service_clock()
        self._offset = None if service_now is None else service_now - self._wall()
        self._service_base = None if service_now is None else service_now - now
        expires_at = current.expires_at if same else now + self._remaining(creds, now, current)
        self._last_ok = now
        self._failures = 0
        left = expires_at - now
        host_deadline = creds.expiration.timestamp() - s.safety_margin
        if self._wall() >= host_deadline:
            return self._host_expired(role, creds, expires_at, host_deadline=host_deadline,
                                      same=same)
        if left <= s.safety_margin:
            raise ValueError(
                f"the service offers a set expiring in {max(0, int(left))}s "
                f"(Expiration {format_time(creds.expiration)}), too close to use"
            )
        self._note_skew()
        # Past the mandatory mark the set is only served because the service just vouched
        # that nothing newer exists; otherwise a refresh must happen first.
        usable = expires_at - s.mandatory_window
        if left <= s.mandatory_window:
            usable = expires_at - s.safety_margin
            log.warning("RAM role %s: no newer credentials offered %ds before expiry", role, left)
        if (same and current.state == "ok" and usable == current.usable_until
                and not _offset_changed(current.service_base, self._service_base)):
            return self._next_delay(left)
        if not same:
            log.info(
                "RAM role %s: new credentials %s, expire %s (in %ds)",
                role,
                creds.masked_key_id(),
                format_time(creds.expiration),
                int(left),
            )
        elif current.state != "ok":
            log.info("RAM role %s: credentials refreshed again", role)
        self._publish(
            state="ok",
            role=role,
            credentials=creds,
            expires_at=expires_at,
            usable_until=usable,
            serve_until=expires_at - s.safety_margin,
            bodies=current.bodies if same else formats.render_all(creds),
            host_deadline=host_deadline,
        )
        return self._next_delay(left)

    def _host_expired(self, role: str, creds: RoleCredentials, expires_at: float, *,
                      host_deadline: float, same: bool) -> float:
        """A set the host clock calls expired: hold it (served again once the clock is
        right), refuse it meanwhile, and keep asking for a fresh one."""
        s = self.settings
        _status, _code, why = clock_refusal(creds, self._wall(), self._offset, host_deadline)
        current = self._snapshot
        now = self._clock()
        if not same and current.verdict(now) == "serve":
            # A stale set must not replace one clients can still use.
            return self._failed(why, now)
        if current.state != "failing" or current.error != why or not same:
            log.warning("RAM role %s: not serving %s: %s", role, creds.masked_key_id(), why)
            self._publish(
                state="failing",
                role=role,
                credentials=creds,
                expires_at=expires_at,
                usable_until=expires_at - s.mandatory_window,
                serve_until=expires_at - s.safety_margin,
                error=why,
                bodies=current.bodies if same else formats.render_all(creds),
                host_deadline=host_deadline,
                offered_stale=True,
            )
        else:
            self._notify_waiters()
        return self._jittered(s.retry_interval)

    def _note_skew(self) -> None:
        offset = self._offset
        if offset is None or offset <= CLOCK_TOLERANCE or self._clock_warned:
            return
        self._clock_warned = True
        log.warning(
            "the host clock is %ds behind the metadata service's (its Date header): clients "
            "may keep using a set after it really expired; %s", int(offset), NTP_HINT,
        )

    def _remaining(self, creds: RoleCredentials, now: float, previous: Snapshot) -> float:
        """Seconds of validity left on ``creds``, fetched at ``now`` (see module docstring)."""
        issued = creds.last_updated.timestamp()
        expires = creds.expiration.timestamp()
        validity = expires - issued
        if validity <= 0:
            raise ValueError(
                f"the service's Expiration {format_time(creds.expiration)} is not after "
                f"LastUpdated {format_time(creds.last_updated)}"
            )
        wall = self._wall()
        if self._offset is not None and abs(self._offset) > DATE_TOLERANCE:
            # The host clock is off: the service's own clock (Date, whole seconds) against
            # its own LastUpdated. When the two agree the host clock is the finer one.
            age = min(max(wall + self._offset - issued, 0.0), validity)
        elif issued - CLOCK_TOLERANCE <= wall <= expires:
            age = min(max(wall - issued, 0.0), validity)
        else:
            if not self._clock_warned:
                log.warning(
                    "local clock is %+ds off the metadata service's times; "
                    "working from the service's Expiration and monotonic time",
                    int(wall - issued),
                )
                self._clock_warned = True
            # The service offers a newer set `advisory_window` before expiry at the latest,
            # so a set it serves is at most this old; refreshing soon then narrows it down.
            age = max(0.0, validity - self.settings.advisory_window)
        if previous.credentials is not None and self._last_ok is not None:
            # It was not offered at our previous look, so it is younger than that look.
            age = min(age, max(0.0, now - self._last_ok))
        return validity - age

    def _next_delay(self, left: float) -> float:
        s = self.settings
        if left > s.advisory_window:
            base = min(s.poll_interval, left - s.advisory_window)
        elif left > s.mandatory_window:
            base = s.refresh_interval
        else:
            base = s.retry_interval
        delay = self._jittered(base)
        if left > s.mandatory_window:
            # Be awake when the mandatory window opens, jitter or not.
            delay = min(delay, left - s.mandatory_window)
        return max(delay, 0.0)

    def _jittered(self, base: float) -> float:
        return base * (1.0 + self.settings.jitter * (2.0 * self._rng() - 1.0))

    def _failed(self, why: str, now: float) -> float:
        self._failures += 1
        current = self._snapshot
        if self._failures == 1 or current.error != why:
            # Logged once per distinct error, not once per retry.
            log.warning("credential refresh failed (keeping the last good set if valid): %s", why)
        usable = current.credentials is not None and now < current.usable_until
        state: State = "ok" if usable and not current.host_expired() else "failing"
        if state != current.state or why != current.error:
            self._publish(
                state=state,
                role=current.role,
                credentials=current.credentials,
                expires_at=current.expires_at,
                usable_until=current.usable_until,
                serve_until=current.serve_until,
                error=why,
                bodies=current.bodies,
                host_deadline=current.host_deadline,
                offered_stale=current.offered_stale,
            )
        else:
            self._notify_waiters()
        delay = self._jittered(self.settings.retry_interval)
        if current.credentials is not None and now < current.usable_until:
            delay = min(delay, current.usable_until - now)
        return max(delay, 0.0)

    def _absent(self, role: str, now: float) -> float:
        if self.settings.role:
            why = f"RAM role {role!r} is not attached to this instance; {NO_ROLE_HINT}"
        elif role:
            why = f"RAM role {role!r} is no longer attached; {NO_ROLE_HINT}"
        else:
            why = f"no RAM role is attached to this instance; {NO_ROLE_HINT}"
        current = self._snapshot
        if current.state != "absent" or current.error != why:
            log.warning("credentials stopped: %s", why)
            self._last_ok = None
            self._publish(state="absent", role=role, error=why)
        else:
            self._notify_waiters()
        return self._jittered(self.settings.retry_interval)

    def _publish(self, **fields: object) -> None:
        with self._cond:
            fields.setdefault("service_base", self._service_base)
            snap = Snapshot(generation=self._snapshot.generation + 1, wall=self._wall,
                            **fields)  # type: ignore[arg-type]
            self._snapshot = snap
            self._cond.notify_all()
        for callback in list(self._subscribers):
            try:
                callback(snap)
            except Exception:
                log.exception("credential subscriber %r failed", callback)

    def _notify_waiters(self) -> None:
        # An attempt finished without changing anything: republish so waiting requests
        # stop waiting and decide (serve or 503) now.
        current = self._snapshot
        self._publish(
            state=current.state,
            role=current.role,
            credentials=current.credentials,
            expires_at=current.expires_at,
            usable_until=current.usable_until,
            serve_until=current.serve_until,
            error=current.error,
            bodies=current.bodies,
            host_deadline=current.host_deadline,
            offered_stale=current.offered_stale,
        )


def _offset_changed(before: float | None, after: float | None) -> bool:
    if before is None or after is None:
        return before is not after
    return abs(before - after) > DATE_TOLERANCE
