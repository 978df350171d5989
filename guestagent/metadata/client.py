"""The only code in guestagent that talks to the instance metadata service.

* hardened mode: a session token is PUT once, cached, renewed before it expires, dropped
  and fetched again on 401 (once per read, so a broken token can never loop);
* transport faults (refused, reset, timeout, truncated body) and 5xx are retried with full
  jitter backoff; 404 is an answer ("absent" → ``None``), never retried;
* static values are cached (the service is rate-limited); credentials, spot and maintenance
  answers never are;
* every typed accessor validates what it got and raises :class:`BadAnswer` naming the path.

Thread-safe: each thread keeps its own keep-alive connection; the token and the cache are
shared under a lock.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import re
import socket
import threading
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

from guestagent.metadata.errors import BadAnswer, MetadataError, ServiceUnavailable
from guestagent.metadata.models import (
    IdentityDocument,
    MaintenanceEvent,
    NetworkInterface,
    RoleCredentials,
    lines,
    parse_ip_list,
    parse_role_listing,
    parse_time,
)
from guestagent.metadata.settings import MetadataSettings

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
# What may go back in the token header: visible ASCII, bounded.
_TOKEN = re.compile(r"[!-~]{1,4096}")
TOKEN_TTL_HEADER = "X-aliyun-ecs-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aliyun-ecs-metadata-token"
# Paths whose answer changes during an instance's life: never served from the cache.
DYNAMIC_PREFIXES = (
    "meta-data/ram/security-credentials",
    "meta-data/instance/spot",
    "maintenance/",
    "dynamic/instance-identity/pkcs7",
    "user-data",
    "vendor-data",
)
# After the service refuses a token PUT, read token-less for this long before asking again.
TOKENLESS_RETRY_SECONDS = 60.0


# ``MetadataClient.list`` shadows the builtin inside the class body.
Lines = list[str]
Interfaces = list[NetworkInterface]
Events = list[MaintenanceEvent]


class _Transport(Exception):
    """A retryable failure below HTTP semantics (or a 5xx)."""


class MetadataClient:
    def __init__(self, settings: MetadataSettings | None = None) -> None:
        self.settings = settings or MetadataSettings()
        parts = urlsplit(self.settings.url)
        self._host = parts.hostname or "100.100.100.200"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._https = parts.scheme == "https"
        self._prefix = parts.path.rstrip("/")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._tokenless_until = 0.0
        self._cache: dict[str, tuple[float, bytes | None]] = {}
        # Outcome of the last real request (any caller): what health reports are made of.
        self.last_ok: float | None = None  # time.monotonic()
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MetadataClient:
        settings = MetadataSettings(url=url, **overrides)
        settings.validate()
        return cls(settings)

    def __repr__(self) -> str:
        return f"MetadataClient({self.settings.url!r})"

    # ---- raw access -------------------------------------------------------------------

    def get_bytes(self, path: str) -> bytes | None:
        """The answer at ``path`` (relative to the version root), or ``None`` on 404."""
        rel = _clean(path)
        if self._cacheable(rel):
            now = time.monotonic()
            with self._lock:
                hit = self._cache.get(rel)
            if hit is not None and hit[0] > now:
                return hit[1]
            value = self._read(rel)
            with self._lock:
                self._cache[rel] = (now + self.settings.cache_ttl, value)
            return value
        return self._read(rel)

    def get(self, path: str) -> str | None:
        data = self.get_bytes(path)
        return None if data is None else _decode(data, path)

    def get_fresh(self, path: str) -> str | None:
        """Like :meth:`get` but never from the cache (and not stored in it)."""
        data = self._read(_clean(path))
        return None if data is None else _decode(data, path)

    def list(self, path: str) -> Lines | None:
        """A directory's children, sub-directories keeping their trailing ``/``."""
        rel = _clean(path)
        text = self.get(rel if rel.endswith("/") or not rel else rel + "/")
        return None if text is None else lines(text)

    def service_clock(self) -> float | None:
        """The service's time now (epoch seconds), from this thread's last answer's ``Date``
        header plus the monotonic time since; None when it sent none. A second opinion on
        the host clock: credential expiry is judged against both."""
        seen: tuple[float, float] | None = getattr(self._local, "date", None)
        if seen is None:
            return None
        return seen[0] + (time.monotonic() - seen[1])

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- typed accessors ------------------------------------------------------------

    def _required(self, path: str) -> str:
        text = self.get(path)
        if text is None:
            raise BadAnswer(f"{path}: absent (404) but every instance has it")
        value = text.strip()
        if not value:
            raise BadAnswer(f"{path}: empty answer")
        return value

    def instance_id(self) -> str:
        return self._required("meta-data/instance-id")

    def region_id(self) -> str:
        return self._required("meta-data/region-id")

    def zone_id(self) -> str:
        return self._required("meta-data/zone-id")

    def hostname(self) -> str:
        return self._required("meta-data/hostname")

    def identity(self) -> IdentityDocument:
        path = "dynamic/instance-identity/document"
        text = self.get(path)
        if text is None:
            raise BadAnswer(f"{path}: absent (404)")
        return IdentityDocument.parse(text, path)

    def identity_pkcs7(self, audience: str | None = None) -> str:
        path = "dynamic/instance-identity/pkcs7"
        if audience is not None:
            path += "?audience=" + quote(audience, safe="")
        text = self.get_fresh(path)
        if text is None or not text.strip():
            raise BadAnswer(f"{path}: absent or empty")
        return text.strip()

    def verify_identity(
        self, ca_pem: bytes | None = None, audience: str | None = None
    ) -> IdentityDocument:
        """The identity document, after checking its pkcs7 signature chains to ``ca_pem``
        (default: the ``ca_cert`` setting)."""
        from guestagent.metadata.pkcs7 import verify_identity_signature

        if ca_pem is None:
            if self.settings.ca_cert is None:
                raise MetadataError("no CA certificate configured ([metadata] ca_cert)")
            try:
                ca_pem = self.settings.ca_cert.read_bytes()
            except OSError as exc:
                raise MetadataError(f"cannot read {self.settings.ca_cert}: {exc.strerror}") from exc
        text = self.get_fresh("dynamic/instance-identity/document")
        if text is None:
            raise BadAnswer("dynamic/instance-identity/document: absent (404)")
        signature = self.identity_pkcs7(audience)
        verify_identity_signature(text, signature, ca_pem, audience)
        return IdentityDocument.parse(text)

    def network_interfaces(self) -> Interfaces:
        base = "meta-data/network/interfaces/macs/"
        macs = self.list(base) or []
        out = []
        for entry in macs:
            mac = entry.rstrip("/")
            d = f"{base}{mac}/"

            def leaf(name: str, d: str = d) -> str:
                return (self.get(d + name) or "").strip()

            out.append(
                NetworkInterface(
                    mac=mac,
                    network_interface_id=leaf("network-interface-id"),
                    netmask=leaf("netmask"),
                    gateway=leaf("gateway"),
                    primary_ip_address=leaf("primary-ip-address"),
                    private_ipv4s=parse_ip_list(leaf("private-ipv4s") or "[]", d + "private-ipv4s"),
                    vpc_id=leaf("vpc-id"),
                    vswitch_id=leaf("vswitch-id"),
                )
            )
        return out

    def _multi(self, path: str) -> Lines:
        text = self.get(path)
        return [] if text is None else lines(text)

    def nameservers(self) -> Lines:
        return self._multi("meta-data/dns-conf/nameservers")

    def ntp_servers(self) -> Lines:
        return self._multi("meta-data/ntp-conf/ntp-servers")

    def source_address(self) -> Lines:
        return self._multi("meta-data/source-address")

    def public_keys(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for entry in self.list("meta-data/public-keys/") or []:
            key_id = entry.rstrip("/").split("=", 1)[0]
            text = self.get(f"meta-data/public-keys/{key_id}/openssh-key")
            if text and text.strip():
                keys[key_id] = text.strip()
        return keys

    def ram_role_names(self) -> Lines:
        path = "meta-data/ram/security-credentials/"
        text = self.get_fresh(path)
        return [] if text is None else parse_role_listing(text, path)

    def ram_credentials(self, role: str) -> RoleCredentials | None:
        if not role or "/" in role or any(ord(c) < 0x21 for c in role):
            raise ValueError(f"bad RAM role name {role!r}")
        path = f"meta-data/ram/security-credentials/{role}"
        text = self.get_fresh(path)
        return None if text is None else RoleCredentials.parse(text, path)

    def spot_termination_time(self) -> datetime | None:
        path = "meta-data/instance/spot/termination-time"
        text = self.get_fresh(path)
        if text is None or not text.strip():
            return None
        return parse_time(text.strip(), path)

    def user_data(self) -> bytes | None:
        return self._read("user-data")

    def vendor_data(self) -> bytes | None:
        return self._read("vendor-data")

    def maintenance_events(self) -> Events:
        text = self.get_fresh("maintenance/active-system-events")
        return [] if text is None else MaintenanceEvent.parse_list(text)

    # ---- HTTP -------------------------------------------------------------------------

    def _cacheable(self, rel: str) -> bool:
        return self.settings.cache_ttl > 0 and not rel.startswith(DYNAMIC_PREFIXES)

    def _read(self, rel: str) -> bytes | None:
        try:
            value = self._read_retrying(rel)
        except MetadataError as exc:
            self.last_error, self.last_error_at = str(exc), time.monotonic()
            raise
        self.last_ok, self.last_error = time.monotonic(), None
        return value

    def _read_retrying(self, rel: str) -> bytes | None:
        target = f"{self._prefix}/{self.settings.version}/{rel}"
        retried_token = False
        attempt = 0
        while True:
            token = self._current_token()
            headers = {TOKEN_HEADER: token} if token else {}
            try:
                status, body = self._request("GET", target, headers)
            except _Transport as exc:
                attempt = self._backoff(attempt, rel, str(exc))
                continue
            if status == 200:
                return body
            if status == 404:
                return None
            if status == 401 and not retried_token:
                # Expired or revoked token: drop it and try once more with a new one.
                log.info("metadata token rejected on %s; fetching a new one", rel)
                self._drop_token()
                retried_token = True
                continue
            if status == 403 and not token and not retried_token and self.settings.use_token:
                # Token-less read refused: the service now requires tokens.
                with self._lock:
                    self._tokenless_until = 0.0
                retried_token = True
                continue
            if status >= 500:
                attempt = self._backoff(attempt, rel, f"HTTP {status}")
                continue
            raise ServiceUnavailable(f"{rel}: metadata service answered HTTP {status}")

    def _backoff(self, attempt: int, rel: str, why: str) -> int:
        if attempt >= self.settings.retries:
            raise ServiceUnavailable(
                f"{rel}: metadata service at {self.settings.url} unavailable after "
                f"{attempt + 1} attempts ({why})"
            )
        cap = min(self.settings.backoff_max, self.settings.backoff_base * (2**attempt))
        delay = random.uniform(cap / 2, cap)  # noqa: S311 - jitter, not crypto
        log.debug("metadata %s failed (%s); retry in %.2fs", rel, why, delay)
        time.sleep(delay)
        return attempt + 1

    def _current_token(self) -> str | None:
        s = self.settings
        if not s.use_token:
            return None
        now = time.monotonic()
        with self._lock:
            if self._token and now < self._token_renew_at:
                return self._token
            if not self._token and now < self._tokenless_until:
                return None
        return self._fetch_token()

    def _fetch_token(self) -> str | None:
        s = self.settings
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                status, body = self._request(
                    "PUT", f"{self._prefix}{TOKEN_PATH}", {TOKEN_TTL_HEADER: str(s.token_ttl)}
                )
            except _Transport as exc:
                attempt = self._backoff(attempt, "api/token", str(exc))
                continue
            if status >= 500:
                attempt = self._backoff(attempt, "api/token", f"HTTP {status}")
                continue
            token = body.decode("ascii", "replace").strip() if status == 200 else ""
            if token and not _TOKEN.fullmatch(token):
                # Garbled (a proxy, a truncation): sent back as a header it would raise in
                # http.client; a bad answer, retried like a 5xx.
                attempt = self._backoff(attempt, "api/token", "the answer is not a token")
                continue
            break
        if status == 200 and token:
            # Renew well before expiry: at 80% of the TTL, and never in the last minute.
            life = min(s.token_ttl * 0.8, max(s.token_ttl - 60.0, s.token_ttl / 2))
            with self._lock:
                self._token = token
                self._token_renew_at = started + life
            return token
        why = f"token request refused (HTTP {status})"
        if s.require_token:
            raise ServiceUnavailable(f"api/token: {why} and [metadata] require_token is on")
        log.info("metadata %s; reading without a token", why)
        with self._lock:
            self._token = None
            self._tokenless_until = time.monotonic() + TOKENLESS_RETRY_SECONDS
        return None

    def _drop_token(self) -> None:
        with self._lock:
            self._token = None
            self._token_renew_at = 0.0
            self._tokenless_until = 0.0

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.settings.timeout)
            conn._create_connection = _connect  # type: ignore[attr-defined]
            self._local.conn = conn
        return conn

    def _request(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = self._connection()
        reused = conn.sock is not None
        try:
            conn.request(method, target, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.will_close:
                conn.close()
            self._local.date = _date(resp.getheader("Date"))
            return resp.status, body
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            stale = isinstance(exc, http.client.RemoteDisconnected | BrokenPipeError)
            if reused and stale:
                # The server closed an idle keep-alive connection: not a fault, reconnect.
                return self._request(method, target, headers)
            raise _Transport(_describe(exc)) from None


def _connect(address: tuple[str, int], timeout: float | None = None,
             source_address: tuple[str, int] | None = None) -> socket.socket:
    """``socket.create_connection`` given an ASCII host as bytes: getaddrinfo encodes a str
    host with the IDNA codec, which would load it and ``unicodedata`` (0.4 MB, for the life
    of the daemon) to resolve an IP literal."""
    host: str | bytes = address[0]
    with contextlib.suppress(UnicodeEncodeError):
        host = address[0].encode("ascii")
    return socket.create_connection((host, address[1]), timeout,  # type: ignore[arg-type]
                                    source_address)


def _date(header: str | None) -> tuple[float, float] | None:
    """(the service's epoch time, our monotonic time) from a ``Date`` header."""
    if not header:
        return None
    try:
        sent = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    if sent.tzinfo is None:
        return None
    # The header is truncated to the second: +0.5 s is the unbiased estimate.
    return sent.timestamp() + 0.5, time.monotonic()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.IncompleteRead):
        return "truncated answer"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def _clean(path: str) -> str:
    """Validate a service path given by a caller (or a CLI user)."""
    rel = path.lstrip("/")
    for version in ("latest/", "2016-01-01/"):
        if rel.startswith(version):
            rel = rel[len(version) :]
    if any(ord(c) < 0x21 or c in "\\#" for c in rel) or ".." in rel.split("/"):
        raise ValueError(f"bad metadata path {path!r}")
    return rel


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadAnswer(f"{path}: answer is not UTF-8 text") from None
