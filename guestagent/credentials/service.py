"""The credential service as the daemon runs it: rotator + local server + files.

Other services reach it through the daemon's context as
:class:`~guestagent.credentials.consumers.CredentialAccess` (``requires=("credentials",)``):
``source`` for the instance's credentials, ``mint``/``remove`` for task-scoped endpoints.
"""

from __future__ import annotations

import contextlib
import logging
import pwd
import re
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
from guestagent.credentials.listeners import Access
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
        self.access = socket_access(self.settings)
        self.token_file = token_path(self.settings)
        self.registry = Registry(host_consumer(self.settings, self.rotator, self.access))
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
             gids: Iterable[int] = (), addresses: Iterable[str] = (),
             with_path: bool = True, path_unless_token: bool = False) -> Minted:
        """A task-scoped endpoint (its own token and path); see :meth:`Registry.mint`."""
        return self.registry.mint(name, source or self.rotator, uids=uids, gids=gids,
                                  addresses=addresses, with_path=with_path,
                                  path_unless_token=path_unless_token)

    def restore(self, name: str, source: Source | None = None, *, token_digest: bytes,
                path_digest: bytes, uids: Iterable[int] = (), gids: Iterable[int] = (),
                addresses: Iterable[str] = (), path_unless_token: bool = False) -> Consumer:
        """A task-scoped endpoint minted before an agent restart, by digests; see
        :meth:`Registry.restore`."""
        return self.registry.restore(name, source or self.rotator, token_digest=token_digest,
                                     path_digest=path_digest, uids=uids, gids=gids,
                                     addresses=addresses, path_unless_token=path_unless_token)

    def remove(self, name: str) -> None:
        self.registry.remove(name)

    # -- running -------------------------------------------------------------------------
    def start(self, stop: threading.Event) -> CredentialServer:
        """Listen, then rotate in a thread until ``stop``; for callers that own the loop."""
        s = self.settings
        server = CredentialServer(
            self.registry,
            socket_path=s.socket_path,
            access=self.access,
            tcp=(s.tcp_host, s.tcp_port) if s.tcp_enabled else None,
            request_wait=s.request_wait,
            limits=Limits(
                header_timeout=s.header_timeout,
                idle_timeout=s.idle_timeout,
                max_connections=s.max_connections,
                max_per_peer=s.max_connections_per_peer,
            ),
        )
        server.token_file = str(self.token_file)
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
            if self.server.tcp_error:
                out["tcp_error"] = self.server.tcp_error
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
        listening = self.server is None or not self.server.tcp_error
        return (rotating and listening and snap.state in ("ok", "pending", "absent")
                and not snap.host_expired())

    def problem(self) -> str | None:
        snap = self.rotator.snapshot
        if self.server is not None and self.server.tcp_error:
            return f"credential TCP listener: {self.server.tcp_error}"
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


def socket_access(settings: CredentialSettings) -> Access:
    """Who may open the Unix socket: its mode and group, plus the allow-list (ACL)."""
    return Access(
        mode=settings.socket_mode,
        gid=resolve_group(settings.socket_group) if settings.socket_group else None,
        uids=frozenset(_uid(u) for u in settings.allow_users),
        gids=frozenset(resolve_group(g) for g in settings.allow_groups),
    )


def token_path(settings: CredentialSettings) -> Path:
    """The host endpoint's token file: configured, or beside the socket."""
    return settings.token_path


def host_consumer(
    settings: CredentialSettings, source: Rotator, access: Access | None = None
) -> Consumer:
    """The instance-wide endpoint: the allow-list; on TCP, a token (AWS SDKs send it) and a
    capability path (the Alibaba SDKs and oss2 cannot send a header)."""
    access = access or socket_access(settings)
    # The token file is readable by whoever may open the socket, and nobody else.
    token_access = Access(mode=0o640 if access.gid is not None else 0o600, gid=access.gid,
                          uids=access.uids,
                          gids=access.gids, perm=0o4)
    token = load_or_create_token(token_path(settings), settings.token_owner, token_access)
    hint = (
        "ask the administrator to add the user, or a group of it, to "
        "credentials.allow_users / credentials.allow_groups"
    )
    return Consumer(
        name="host",
        source=source,
        uids=access.uids,
        gids=access.gids,
        token_digest=digest(token),
        capability=settings.path_secret or load_or_create_path_secret(settings.socket_path),
        hint=hint,
        path_suffices=True,
    )


def load_or_create_token(path: Path, owner: str = "", access: Access | None = None) -> str:
    """The endpoint token: read from its file, created with a random one if missing.
    Readable by ``owner`` and ``access`` (the socket's allow-list), never by others."""
    try:
        st = path.stat()
    except FileNotFoundError:
        uid, gid = resolve_owner(owner)
        token = secrets.token_urlsafe(32)
        # No trailing newline: the AWS Go SDK rejects a token file that has one.
        atomic_write(path, token, mode=0o600, uid=uid, gid=gid)
        if access is not None:
            access.apply(path)
        log.info("created credential endpoint token file %s", path)
        return token
    if st.st_mode & 0o007:
        raise ValueError(f"{path}: token file must not be readable by others "
                         f"(mode {st.st_mode & 0o777:o}); chmod o-rwx it")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: token too short (want at least 16 characters)")
    if access is not None:
        access.apply(path)  # the allow-list may have changed since it was made
    return token


def load_or_create_path_secret(socket_path: Path) -> str:
    """The host endpoint's capability path, kept (0600) beside the socket so that it
    survives daemon restarts; a reboot makes a new one (set ``path_secret`` to pin it)."""
    path = socket_path.parent / "credentials.path"
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{16,}", text):
            return text
        log.warning("%s: not a capability path; making a new one", path)
    secret = secrets.token_urlsafe(24)
    atomic_write(path, secret, mode=0o600)
    return secret


def _uid(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {name!r}") from None


__all__ = ["CredentialService", "host_consumer", "load_or_create_token"]

