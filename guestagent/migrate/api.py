"""Signed calls to the ECS API the migration needs.

Every call is a signed RPC request (see :mod:`signing`); an error answer becomes an
:class:`ApiError` whose code maps to the guide's keyword. The secret is used to sign and is
never logged, put in a URL we log, or shown in ``repr``.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

from guestagent.migrate import signing
from guestagent.migrate.errors import ApiError, MigrateError

log = logging.getLogger(__name__)


@dataclass
class EcsClient:
    endpoint: str
    access_id: str
    secret: str = field(repr=False)
    region: str = ""
    timeout: float = 30.0
    # Server clock minus ours, from the last answer's Date header (seconds).
    clock_offset: float | None = None

    attempts: int = 4
    backoff: float = 1.0

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        """One action; a dropped connection or a 5xx is tried again (every action we send
        is idempotent: creations carry a ClientToken), each time freshly signed."""
        for attempt in range(1, self.attempts + 1):
            try:
                return self._call_once(action, params)
            except MigrateError as exc:
                if not exc.retryable or attempt == self.attempts:
                    raise
                log.warning("%s: %s (attempt %s/%s)", action, exc, attempt, self.attempts)
                time.sleep(self.backoff * attempt)
        raise AssertionError("unreachable")

    def _call_once(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        flat = {k: str(v) for k, v in params.items() if v is not None}
        if self.region:
            flat.setdefault("RegionId", self.region)
        body = urlencode(signing.signed_params(action, self.access_id, self.secret, flat))
        request = urllib.request.Request(
            self.endpoint + "/", data=body.encode(), method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "User-Agent": "guestagent-migrate"})
        log.debug("ECS %s %s", action, sorted(flat))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                self._note_clock(resp.headers.get("Date"))
                return self._decode(action, resp.read(), resp.status)
        except urllib.error.HTTPError as exc:
            self._note_clock(exc.headers.get("Date") if exc.headers else None)
            payload = self._decode(action, exc.read(), exc.code)
            raise ApiError(action, str(payload.get("Code", f"HTTP{exc.code}")),
                           str(payload.get("Message", exc.reason)),
                           str(payload.get("RequestId", "")), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MigrateError(f"{action}: cannot reach the ECS API at {self.endpoint}: "
                               f"{reason}", retryable=True) from None

    def _decode(self, action: str, raw: bytes, status: int) -> dict[str, Any]:
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise MigrateError(f"{action}: the ECS API answered HTTP {status} with a body "
                               "that is not JSON", retryable=status >= 500) from None
        if not isinstance(data, dict):
            raise MigrateError(f"{action}: the ECS API answered with a non-object")
        return data

    def _note_clock(self, date: str | None) -> None:
        if not date:
            return
        try:
            server = parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return
        self.clock_offset = (server - datetime.now(UTC)).total_seconds()
