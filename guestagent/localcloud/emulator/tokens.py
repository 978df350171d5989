"""Hardened-mode session tokens: issued by ``PUT /latest/api/token``, checked on reads."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

TTL_HEADER = "X-aliyun-ecs-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aliyun-ecs-metadata-token"
MAX_TTL = 21600


def parse_ttl(value: str | None) -> int | None:
    """The TTL a PUT asked for, or None when missing, non-integer or outside 1..21600."""
    if value is None:
        return None
    try:
        ttl = int(value.strip())
    except ValueError:
        return None
    return ttl if 1 <= ttl <= MAX_TTL else None


class TokenStore:
    """Tokens and their expiry; thread-safe. ``clock`` is monotonic seconds (tests inject)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._issued = 0

    def issue(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._expiry[token] = now + ttl
            self._issued += 1
            # Drop expired tokens now and then so a long run does not grow without bound.
            if self._issued % 256 == 0:
                self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        return token

    def valid(self, token: str) -> bool:
        expiry = self._expiry.get(token)
        return expiry is not None and self._clock() < expiry

    def revoke_all(self) -> None:
        with self._lock:
            self._expiry.clear()
