"""Where the S3 keys of a transfer come from: always the agent's credential service.

- In the daemon: the credential service's :class:`~guestagent.credentials.consumers.Source`
  (:class:`SourceKeys`), read at every request, so a rotation is picked up at once.
- From the CLI: the local credential server's Unix socket (:class:`SocketKeys`), fetched
  again well before the set expires.

No key is ever written to disk or passed in argv; :class:`Keys` hides its secrets from
``repr``. A transfer that meets a refused key asks its provider for a fresh set once
(:meth:`KeyProvider.refresh`) before it reports a 403.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from guestagent.storage.errors import StorageError, Unavailable

# Re-read a set once this much of the validity it had when fetched is gone (at the latest
# this long before it expires): a request is never signed with a set near its end.
REFRESH_FRACTION = 0.5
REFRESH_LEAD = 300.0


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret: str = field(repr=False)
    token: str = field(default="", repr=False)
    expiration: float = 0.0  # wall-clock epoch seconds; 0: does not expire


class KeyProvider(Protocol):
    def current(self) -> Keys:
        """The set to sign the next request with."""

    def refresh(self) -> Keys:
        """A set newer than the one just refused, if the service has one."""


class StaticKeys:
    """Fixed keys held in memory (tests, benchmarks against a local stand-in)."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys

    def current(self) -> Keys:
        return self._keys

    def refresh(self) -> Keys:
        return self._keys


class SourceKeys:
    """The daemon's credential Source (a ``Rotator``): ``snapshot.credentials`` per request."""

    def __init__(self, source: Any, wait: float = 2.0) -> None:
        self._source = source
        self._wait = wait

    def current(self) -> Keys:
        snap = self._source.snapshot
        creds = snap.credentials
        if creds is None:
            raise Unavailable(
                f"no RAM role credentials available ({snap.state}): {snap.error or 'pending'}"
            )
        return Keys(
            creds.access_key_id,
            creds.access_key_secret,
            creds.security_token,
            creds.expiration.timestamp(),
        )

    def refresh(self) -> Keys:
        before = self._source.snapshot.generation
        self._source.kick()
        deadline = time.monotonic() + self._wait
        while self._source.snapshot.generation == before and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.current()


class SocketKeys:
    """The local credential server over its Unix socket (the CLI's way to its keys)."""

    def __init__(
        self,
        socket_path: Path,
        *,
        prefix: str = "",
        token: Callable[[], str | None] = lambda: None,
        timeout: float = 5.0,
        patience: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = socket_path
        self.patience = patience
        self._prefix = prefix
        self._token = token
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Keys | None = None
        self._refresh_at = 0.0

    def current(self) -> Keys:
        with self._lock:
            if self._keys is None or self._clock() >= self._refresh_at:
                self._fetch_patiently()
            assert self._keys is not None
            return self._keys

    def refresh(self) -> Keys:
        with self._lock:
            self._fetch_patiently()
            assert self._keys is not None
            return self._keys

    def _fetch_patiently(self) -> None:
        """Fetch; while the server is busy rotating (503) or restarting, keep a cached set
        that is still valid, else retry for up to ``patience`` seconds."""
        deadline = time.monotonic() + self.patience
        delay = 0.05
        while True:
            try:
                self._fetch()
                return
            except Unavailable:
                if not self._path.exists():
                    raise  # no agent here at all: say so at once
                if self._keys is not None and self._clock() < self._keys.expiration - 1.0:
                    self._refresh_at = self._clock() + min(1.0, delay)
                    return
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    def _fetch(self) -> None:
        from guestagent.credentials.local import LocalError, UnixHTTPConnection, local_get
        from guestagent.metadata.errors import MetadataError
        from guestagent.metadata.models import parse_time

        conn = UnixHTTPConnection(str(self._path), self._timeout)
        try:
            doc = local_get(conn, self._prefix + "/v1/credentials/alibaba", self._token())
        except LocalError as exc:
            hint = (
                "is the agent running? (guestagent run, or guestagent credentials serve)"
                if exc.status == 0 else "see guestagent credentials check"
            )
            raise Unavailable(f"credentials from {self._path}: {exc}; {hint}") from None
        try:
            expiration = parse_time(str(doc["Expiration"]), "Expiration").timestamp()
            keys = Keys(
                str(doc["AccessKeyId"]), str(doc["AccessKeySecret"]),
                str(doc.get("SecurityToken", "")), expiration,
            )
        except (KeyError, ValueError, MetadataError) as exc:
            raise StorageError(f"credentials from {self._path}: malformed answer ({exc})") from None
        now = self._clock()
        left = max(0.0, expiration - now)
        self._refresh_at = now + min(left * REFRESH_FRACTION, max(0.0, left - REFRESH_LEAD))
        self._keys = keys


def from_settings(settings: Any) -> SocketKeys:
    """The CLI's provider: the socket, path secret and token file of ``[credentials]``."""
    cs = settings.credentials
    prefix = f"/{cs.path_secret}" if cs.path_secret else ""
    token_file: Path | None = cs.token_file

    def token() -> str | None:
        if token_file is None:
            return None
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            raise Unavailable(
                f"{token_file}: cannot read the credential token: {exc.strerror}"
            ) from None

    return SocketKeys(cs.socket_path, prefix=prefix, token=token)


def describe(keys: Keys) -> str:
    """A loggable description of a set: the masked key id only."""
    from guestagent.metadata.models import mask

    return json.dumps({"AccessKeyId": mask(keys.access_key_id)})
