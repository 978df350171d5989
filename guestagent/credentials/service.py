"""The credential service as the daemon runs it: rotator + local server + files.

Other services reach it through the daemon's context as
:class:`~guestagent.credentials.consumers.CredentialAccess` (``requires=("credentials",)``):
``source`` for the instance's credentials, ``mint``/``remove`` for task-scoped endpoints.
"""

from __future__ import annotations

import logging
import pwd
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from guestagent.config import Settings
from guestagent.credentials.consumers import Consumer, Minted, Registry, Source, digest
from guestagent.credentials.credfiles import CredentialFiles, resolve_owner
from guestagent.credentials.http import Limits
from guestagent.credentials.rotation import DATE_TOLERANCE, Rotator, Snapshot
from guestagent.credentials.server import CredentialServer, resolve_group
from guestagent.credentials.settings import CredentialSettings
from guestagent.files import atomic_write
from guestagent.metadata.client import MetadataClient
from guestagent.metadata.models import RoleCredentials, format_time
from guestagent.service import Service

log = logging.getLogger(__name__)


CHECK_EVERY = 1.0  # how often run() looks at its threads (and beats)


class CredentialService(Service):
    name = "credentials"
    ready_on_start = False  # ready once the server listens

    def __init__(
        self, settings: Settings, client: MetadataClient, *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings.credentials
        self.client = client
        self.rotator = Rotator(self.settings, client.ram_role_names, client.ram_credentials,
                               wall=wall, service_clock=client.service_clock)
        self.files = CredentialFiles(self.settings)
        self.registry = Registry(host_consumer(self.settings, self.rotator))
        self.server: CredentialServer | None = None
        self._rotating: threading.Thread | None = None
        self._inner: threading.Event | None = None
        self._last_set: RoleCredentials | None = None
        self.last_refresh: datetime | None = None
        # Subscribed once for the life of the instance: a restart adds no second one.
        self.rotator.subscribe(self._published)

    def _published(self, snap: Snapshot) -> None:
        # A new credential set (not just a state change) is a refresh.
        if snap.credentials is not None and snap.credentials is not self._last_set:
            self._last_set = snap.credentials
            self.last_refresh = datetime.now(UTC)
        if self.files.enabled:
            self.files(snap)
        server = self.server
        if server is not None:
            server.published()

    # -- what other services use (CredentialAccess) -------------------------------------
    @property
    def source(self) -> Source:
        """The instance's rotating credentials (``.snapshot.credentials``)."""
        return self.rotator

    def mint(self, name: str, source: Source | None = None, *, uids: Iterable[int] = (),
             gids: Iterable[int] = (), with_path: bool = True) -> Minted:
        """A task-scoped endpoint (its own token and path); see :meth:`Registry.mint`."""
        return self.registry.mint(name, source or self.rotator, uids=uids, gids=gids,
                                  with_path=with_path)

    def remove(self, name: str) -> None:
        self.registry.remove(name)

    # -- running -------------------------------------------------------------------------
    def start(self, stop: threading.Event) -> CredentialServer:
        """Listen, then rotate in a thread until ``stop``; for callers that own the loop."""
        s = self.settings
        server = CredentialServer(
            self.registry,
            socket_path=s.socket_path,
            socket_mode=s.socket_mode,
            socket_gid=resolve_group(s.socket_group) if s.socket_group else None,
            tcp=(s.tcp_host, s.tcp_port) if s.tcp_enabled else None,
            request_wait=s.request_wait,
            limits=Limits(
                header_timeout=s.header_timeout,
                idle_timeout=s.idle_timeout,
                max_connections=s.max_connections,
                max_per_peer=s.max_connections_per_peer,
            ),
        )
        server.start()
        self.server = server
        self._rotating = threading.Thread(
            target=self.rotator.run, args=(stop,), name="credentials-rotator", daemon=True
        )
        self._rotating.start()
        return server

    def run(self, stop: threading.Event) -> None:
        # Threads of this run end with it (its own stop event), so a restart after an inner
        # thread died starts clean: one server, one rotator, no leftover waiter.
        inner = self._inner = threading.Event()
        try:
            self.start(inner)
            self.mark_ready()
            while not self.wait(stop, CHECK_EVERY):
                dead = self._dead_thread()
                if dead:
                    raise RuntimeError(f"the credential {dead} thread died")
        finally:
            self.close()

    def _dead_thread(self) -> str | None:
        if self._rotating is not None and not self._rotating.is_alive():
            return "rotator"
        thread = getattr(self.server, "_thread", None)
        if thread is not None and not thread.is_alive():
            return "server"
        return None

    def close(self) -> None:
        if self._inner is not None:
            self._inner.set()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._rotating is not None:
            # A refresh in flight is bounded by the client's timeout and retries.
            self._rotating.join(timeout=5.0)
            self._rotating = None

    def status(self) -> dict[str, Any]:
        snap = self.rotator.snapshot
        out: dict[str, Any] = {
            "state": snap.state,
            "role": snap.role,
            "generation": snap.generation,
            "consumers": len(self.registry),
        }
        if snap.credentials is not None:
            out["access_key_id"] = snap.credentials.masked_key_id()
            out["expiration"] = snap.credentials.expiration.isoformat()
        if self.last_refresh is not None:
            out["last_refresh"] = format_time(self.last_refresh)
        if snap.error:
            out["error"] = snap.error
        offset = snap.clock_offset(time.monotonic())
        if offset is not None and abs(offset) > DATE_TOLERANCE:
            out["clock_offset"] = round(offset)
        if self.server is not None:
            out["requests"] = self.server.requests
            out["refused"] = self.server.refused
            out["socket"] = str(self.settings.socket_path)
            if self.server.tcp_address:
                host, port = self.server.tcp_address
                out["tcp"] = f"http://{host}:{port}"
        return out

    def healthy(self) -> bool:
        # Healthy while the service can still serve, or while the fault is outside us
        # (no role attached is the user's choice, not our failure).
        # A set the host clock calls expired is useless to clients: unhealthy.
        snap = self.rotator.snapshot
        rotating = self._rotating is None or self._rotating.is_alive()
        return rotating and snap.state in ("ok", "pending", "absent") and not snap.host_expired()

    def problem(self) -> str | None:
        snap = self.rotator.snapshot
        if snap.host_expired():
            return f"credentials expired by the host clock: {snap.error or 'clock skew?'}"
        if snap.state in ("ok", "pending", "absent"):
            return None
        return f"credentials {snap.state}: {snap.error or 'no valid set'}"

    def summary(self) -> str:
        snap = self.rotator.snapshot
        text = f"last refresh {format_time(self.last_refresh) if self.last_refresh else 'never'}"
        if snap.credentials is not None:
            text += f", expires {snap.credentials.expiration.isoformat()}"
        return text


def host_consumer(settings: CredentialSettings, source: Rotator) -> Consumer:
    """The instance-wide endpoint, from the settings' allow-list and secrets."""
    uids = frozenset(_uid(u) for u in settings.allow_users)
    gids = frozenset(resolve_group(g) for g in settings.allow_groups)
    token_digest = None
    if settings.token_file is not None:
        token_digest = digest(load_or_create_token(settings.token_file, settings.token_owner))
    hint = (
        "ask the administrator to add the user, or a group of it, to "
        "credentials.allow_users / credentials.allow_groups"
    )
    return Consumer(
        name="host",
        source=source,
        uids=uids,
        gids=gids,
        token_digest=token_digest,
        capability=settings.path_secret or None,
        hint=hint,
    )


def load_or_create_token(path: Path, owner: str = "") -> str:
    """The endpoint token: read from its 0600 file, created with a random one if missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        uid, gid = resolve_owner(owner)
        token = secrets.token_urlsafe(32)
        # No trailing newline: the AWS Go SDK rejects a token file that has one.
        atomic_write(path, token, mode=0o600, uid=uid, gid=gid)
        log.info("created credential endpoint token file %s", path)
        return token
    if st.st_mode & 0o077:
        raise ValueError(f"{path}: token file must be mode 0600 (is {st.st_mode & 0o777:o})")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: token too short (want at least 16 characters)")
    return token


def _uid(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {name!r}") from None


__all__ = ["CredentialService", "host_consumer", "load_or_create_token"]

