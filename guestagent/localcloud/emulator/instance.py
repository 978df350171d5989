"""The emulated instance: state of the metadata service, its control methods, its servers.

Used in-process by test fixtures::

    with Emulator(load_scenario(...)).start() as emu:
        emu.add_fault("meta-data/ram/security-credentials/*", "status", status=500, count=3)
        ...

and by ``guestagent emulator serve``. Every control method is thread-safe.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, NamedTuple

from guestagent.localcloud.emulator import tree
from guestagent.localcloud.emulator.ca import Authority
from guestagent.localcloud.emulator.faults import FaultSet
from guestagent.localcloud.emulator.roles import Issuer, RoleCredentials, utc_text
from guestagent.localcloud.emulator.scenario import FaultSpec, Scenario, load_scenario
from guestagent.localcloud.emulator.server import VERSIONS, MetadataHandler, Server
from guestagent.localcloud.emulator.tokens import TokenStore

# Cap on requests_log so a long benchmark run does not grow memory without bound.
LOG_LIMIT = 100_000
PKCS7_CACHE_LIMIT = 64


class RequestRecord(NamedTuple):
    path: str
    method: str
    status: int  # 0 = no answer (reset, hang ended by stop)


class Emulator:
    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scenario = scenario if scenario is not None else load_scenario()
        self.host = host
        self.port = port
        self.control_port = control_port
        self._clock = clock
        self._lock = threading.RLock()
        self.authority = Authority(self.scenario.ca_cert_file, self.scenario.ca_key_file)
        self.ca_cert_pem: bytes = self.authority.cert_pem
        self.tokens = TokenStore()
        self.token_required = self.scenario.tokens_required
        self.faults = FaultSet()
        ram = self.scenario.ram
        self.roles = RoleCredentials(
            validity=ram.validity, overlap=ram.overlap, time_scale=ram.time_scale, clock=clock
        )
        self._role: str | None = None
        self._overrides: dict[str, str | None] = {}
        self._user_data = self.scenario.user_data
        self._spot: tuple[float, float] | None = None  # (notice at, release at), wall clock
        self._events: list[dict[str, str]] = []
        self._events_doc: bytes | None = None
        # Signed identity by (document, audience): signing costs a few ms.
        self._pkcs7: dict[tuple[str, str | None], bytes] = {}
        self.request_count = 0
        self.requests_log: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._stopping = threading.Event()
        self._servers: list[Server] = []
        self._threads: list[threading.Thread] = []
        self.tree = self._build_tree()
        if ram.role is not None:
            self.attach_role(ram.role)
        for fault in self.scenario.faults:
            self.faults.add(fault)
        for event in self.scenario.maintenance:
            self.add_maintenance_event(event.code, event.not_before_in, event_id=event.event_id)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> Emulator:
        if self._servers:
            return self
        from guestagent.localcloud.emulator.control import ControlHandler

        self._stopping.clear()
        metadata = Server((self.host, self.port), MetadataHandler, self)
        try:
            control = Server(("127.0.0.1", self.control_port), ControlHandler, self)
        except OSError:
            metadata.server_close()
            raise
        self._servers = [metadata, control]
        self.port = metadata.server_address[1]
        self.control_port = control.server_address[1]
        if self.scenario.spot.notice_in is not None and self._spot is None:
            self.schedule_termination(
                self.scenario.spot.notice_in, self.scenario.spot.release_after
            )
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"emulator-{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        servers, self._servers = self._servers, []
        # Shut both servers down at once: each waits up to one poll interval.
        waiters = [threading.Thread(target=server.shutdown) for server in servers]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
        for server in servers:
            server.close_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def pause(self, seconds: float) -> None:
        """Sleep for a latency fault, cut short by stop()."""
        self._stopping.wait(seconds)

    @property
    def url(self) -> str:
        return f"http://{self._url_host(self.host)}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @staticmethod
    def _url_host(host: str) -> str:
        if host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    # -- control ----------------------------------------------------------------------------

    def set_token_required(self, required: bool) -> None:
        self.token_required = required

    def revoke_tokens(self) -> None:
        """Make every issued token invalid (as if all had expired)."""
        self.tokens.revoke_all()

    def add_fault(
        self,
        path: str,
        kind: str,
        *,
        status: int = 500,
        latency: float = 0.0,
        count: int | None = None,
        method: str | None = None,
        body: str | None = None,
    ) -> str:
        """Add a fault rule (latency in seconds); returns its id. ValueError if invalid."""
        return self.faults.add(FaultSpec(path, kind, status, latency, count, method, body))

    def remove_fault(self, rule_id: str) -> bool:
        return self.faults.remove(rule_id)

    def clear_faults(self) -> None:
        self.faults.clear()

    def schedule_termination(self, in_seconds: float = 0.0, release_after: float = 300.0) -> None:
        """The notice appears ``in_seconds`` from now; the release time it gives is
        ``release_after`` seconds after the notice."""
        if in_seconds < 0 or release_after < 0:
            raise ValueError("in_seconds and release_after must be >= 0")
        notice = self._clock() + in_seconds
        self._spot = (notice, notice + release_after)

    def cancel_termination(self) -> None:
        self._spot = None

    def set_user_data(self, data: bytes | None) -> None:
        self._user_data = data

    def attach_role(self, name: str) -> None:
        if not name or "/" in name:
            raise ValueError(f"role: not a valid role name: {name!r}")
        with self._lock:
            self._role = name
            self.roles.attach(name)
            self._rebuild()

    def detach_role(self) -> None:
        with self._lock:
            self._role = None
            self.roles.attach(None)
            self._rebuild()

    @property
    def role(self) -> str | None:
        return self._role

    def rotate_credentials(self) -> None:
        self.roles.rotate()

    def issued_credentials(self) -> list[dict[str, str]]:
        """Every set issued so far, oldest first (AccessKeyId, AccessKeySecret,
        SecurityToken, Expiration, LastUpdated, Role)."""
        return self.roles.issued()

    def current_credentials(self) -> dict[str, str] | None:
        """The set the service hands out now, in its metadata format (None without a role)."""
        role = self._role
        doc = self.roles.document(role) if role else None
        return json.loads(doc) if doc else None

    def set_credential_issuer(self, fn: Issuer | None) -> None:
        """Mint future sets with ``fn() -> (key_id, secret, token)``; None = built-in."""
        self.roles.issuer = fn

    def set_time_scale(self, scale: float) -> None:
        """Shrink credential durations by ``scale``; a fresh set is issued at once."""
        self.roles.set_time_scale(scale)

    def add_maintenance_event(
        self, code: str, not_before_in: float = 0.0, *, event_id: str | None = None
    ) -> str:
        event_id = event_id or "e-" + secrets.token_hex(10)
        with self._lock:
            self._events.append(
                {
                    "Code": code,
                    "EventId": event_id,
                    "NotBefore": utc_text(self._clock() + not_before_in),
                    "EventStatus": "Scheduled",
                }
            )
            self._events_doc = json.dumps(self._events).encode()
        return event_id

    def clear_maintenance_events(self) -> None:
        with self._lock:
            self._events = []
            self._events_doc = None

    def set_value(self, path: str, value: str | None) -> None:
        """Override (or with None remove) a leaf, e.g. ``meta-data/dns-conf/nameservers``."""
        rel = tree.normalize(path)
        head, _, rest = rel.partition("/")
        if head in VERSIONS:
            rel = rest
        if not rel:
            raise ValueError("path: must name a leaf below the version")
        with self._lock:
            self._overrides[rel] = value
            self._rebuild()

    def set_instance_id(self, instance_id: str) -> None:
        """A new instance from the same image: instance-id and identity document change."""
        if not instance_id.startswith("i-"):
            raise ValueError(f"instance_id: must start with 'i-', got {instance_id!r}")
        with self._lock:
            instance = dataclasses.replace(self.scenario.instance, instance_id=instance_id)
            self.scenario = dataclasses.replace(self.scenario, instance=instance)
            self._overrides.pop("meta-data/instance-id", None)
            self._rebuild()

    def state(self) -> dict[str, Any]:
        """A JSON-able summary (no secrets) for the control API."""
        spot = self._spot
        return {
            "url": self.url,
            "instance_id": self.tree.identity["instance-id"],
            "token_required": self.token_required,
            "role": self._role,
            "time_scale": self.roles.time_scale,
            "credentials_issued": len(self.roles.issued()),
            "spot": None
            if spot is None
            else {"notice_at": utc_text(spot[0]), "release_at": utc_text(spot[1])},
            "user_data": self._user_data is not None,
            "maintenance_events": list(self._events),
            "faults": self.faults.describe(),
            "overrides": dict(self._overrides),
            "request_count": self.request_count,
        }

    # -- used by the handler ----------------------------------------------------------------

    def record(self, path: str, method: str, status: int) -> None:
        with self._log_lock:
            self.request_count += 1
            self.requests_log.append(RequestRecord(path, method, status))
            if len(self.requests_log) > LOG_LIMIT:
                del self.requests_log[: LOG_LIMIT // 2]

    def dynamic_leaf(self, name: str, rel: str, query: Mapping[str, list[str]]) -> bytes | None:
        if name == tree.CREDENTIALS:
            return self.roles.document(rel.rsplit("/", 1)[-1])
        if name == tree.SPOT:
            spot = self._spot
            if spot is None or self._clock() < spot[0]:
                return None
            return utc_text(spot[1]).encode()
        if name == tree.USER_DATA:
            return self._user_data
        if name == tree.MAINTENANCE:
            return self._events_doc
        if name == tree.PKCS7:
            audience = query.get("audience", [None])[-1]
            return self._signed_identity(audience)
        return None

    def _signed_identity(self, audience: str | None) -> bytes:
        current = self.tree
        key = (current.document, audience)
        cache = self._pkcs7
        signed = cache.get(key)
        if signed is None:
            signed = self.authority.sign(current.identity_json(audience).encode()).encode()
            if len(cache) >= PKCS7_CACHE_LIMIT:
                cache.clear()
            cache[key] = signed
        return signed

    def _build_tree(self) -> tree.Tree:
        return tree.Tree(
            self.scenario,
            role=self._role,
            overrides=self._overrides,
            vendor_data=self.scenario.vendor_data,
        )

    def _rebuild(self) -> None:
        self.tree = self._build_tree()
