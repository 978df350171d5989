"""STS credentials of the attached RAM role, rotating as the real service does.

A set is valid ``validity`` seconds; a new one appears ``overlap`` seconds before the current
one expires, and both stay valid until the old one's Expiration. Timestamps are wall-clock
UTC so real SDKs comparing Expiration with their own clock behave; ``time_scale`` only
shrinks the durations (validity/time_scale, overlap/time_scale).
"""

from __future__ import annotations

import json
import math
import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Issuer = Callable[[], tuple[str, str, str]]

_ALNUM = string.ascii_letters + string.digits


def utc_text(when: float) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``, the service's only time format (second resolution)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _random(alphabet: str, size: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(size))


def mint() -> tuple[str, str, str]:
    """A key id, secret and security token shaped like Alibaba STS ones."""
    key_id = "STS.NT" + _random(_ALNUM, 22)
    secret = _random(_ALNUM, 44)
    token = "CAIS" + secrets.token_urlsafe(240)
    return key_id, secret, token


@dataclass(frozen=True)
class CredentialSet:
    role: str
    access_key_id: str
    access_key_secret: str
    security_token: str
    issued_at: float
    expires_at: float

    def __repr__(self) -> str:  # secrets never in repr
        return f"CredentialSet(role={self.role!r}, access_key_id={self.access_key_id!r}, ...)"

    def document(self) -> bytes:
        return json.dumps(
            {
                "AccessKeyId": self.access_key_id,
                "AccessKeySecret": self.access_key_secret,
                "SecurityToken": self.security_token,
                "Expiration": utc_text(self.expires_at),
                "LastUpdated": utc_text(self.issued_at),
                "Code": "Success",
            },
            indent=2,
        ).encode()

    def export(self) -> dict[str, str]:
        return {
            "Role": self.role,
            "AccessKeyId": self.access_key_id,
            "AccessKeySecret": self.access_key_secret,
            "SecurityToken": self.security_token,
            "Expiration": utc_text(self.expires_at),
            "LastUpdated": utc_text(self.issued_at),
        }


class RoleCredentials:
    """The role's current set, rotated lazily when read; every issued set is kept for export."""

    def __init__(
        self,
        *,
        validity: float = 21600.0,
        overlap: float = 1800.0,
        time_scale: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.validity = validity
        self.overlap = overlap
        self.time_scale = time_scale
        self.issuer: Issuer | None = None
        self.role: str | None = None
        self._current: CredentialSet | None = None
        self._document = b""
        self._issued: list[CredentialSet] = []

    def attach(self, role: str | None) -> None:
        with self._lock:
            self.role = role
            self._current = None
            if role is not None:
                self._issue(self._clock())

    def set_time_scale(self, scale: float) -> None:
        if scale <= 0:
            raise ValueError(f"time_scale: must be > 0, got {scale}")
        with self._lock:
            self.time_scale = scale
            # The current set was made with the old durations: start a fresh one.
            if self.role is not None:
                self._issue(self._clock())

    def rotate(self) -> None:
        with self._lock:
            if self.role is not None:
                self._issue(self._clock())

    def document(self, role: str) -> bytes | None:
        """The metadata JSON for ``role``, or None when that role is not attached."""
        now = self._clock()
        current = self._current
        if current is not None and role == self.role and now < self._rotate_at(current):
            return self._document  # fast path, no lock
        with self._lock:
            if self.role is None or role != self.role:
                return None
            if self._current is None or now >= self._rotate_at(self._current):
                self._issue(now)
            return self._document

    def issued(self) -> list[dict[str, str]]:
        self.tick()
        with self._lock:
            return [s.export() for s in self._issued]

    def valid(self) -> list[CredentialSet]:
        """Sets whose Expiration is still ahead (two of them during an overlap)."""
        self.tick()
        now = self._clock()
        with self._lock:
            return [s for s in self._issued if s.expires_at > now]

    def tick(self) -> None:
        if self.role is not None:
            self.document(self.role)

    def _rotate_at(self, current: CredentialSet) -> float:
        return current.expires_at - self.overlap / self.time_scale

    def _issue(self, now: float) -> None:
        assert self.role is not None
        key_id, secret, token = (self.issuer or mint)()
        current = CredentialSet(
            role=self.role,
            access_key_id=key_id,
            access_key_secret=secret,
            security_token=token,
            # Whole seconds, as published: a client working from the Expiration text then
            # sees the very moment the set stops being valid, not up to 1 s later.
            issued_at=float(math.floor(now)),
            expires_at=float(math.floor(now + self.validity / self.time_scale)),
        )
        self._issued.append(current)
        self._document = current.document()
        self._current = current
