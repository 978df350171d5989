"""The local credential server: routes, who may read what, and the listeners.

The event loop runs in its own thread; each connection is a protocol object
(:mod:`guestagent.credentials.http`: parsing, limits) that asks :meth:`CredentialServer.handle`
for an answer. Answers are pre-serialised per snapshot (rebuilt only when the rotator
publishes a new one). Peers are identified once per connection: ``SO_PEERCRED`` on the
Unix socket, a netlink sock_diag lookup on loopback TCP.

Routes (after an optional capability prefix ``/<secret>``):

- ``GET /v1/credentials/alibaba`` the metadata service's JSON (ALIBABA_CLOUD_CREDENTIALS_URI, oss2)
- ``GET /v1/credentials/aws``     container-credentials JSON (AWS_CONTAINER_CREDENTIALS_FULL_URI)
- ``GET /v1/health``              state without secrets (no token needed)
- ``GET /v1/endpoints``           where each format is served (Unix socket only)
- ``/latest/...``                  EC2-style role credentials (see :mod:`.ec2`): under a
                                   capability path, or with an IMDSv2 session token

On TCP the host endpoint wants its token, or its capability path (``path_suffices``); on
the Unix socket ``SO_PEERCRED`` alone decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from guestagent.credentials import ec2
from guestagent.credentials.consumers import Consumer, Registry
from guestagent.credentials.http import (
    Connection,
    Connections,
    Limits,
    Request,
    error_response,
    response,
)
from guestagent.credentials.listeners import Access, Listeners, open_listeners
from guestagent.credentials.peers import Peer, is_loopback
from guestagent.credentials.rotation import DATE_TOLERANCE, Snapshot

log = logging.getLogger(__name__)

_ROUTES = {b"/v1/credentials/alibaba": "alibaba", b"/v1/credentials/aws": "aws"}
_HEALTH = b"/v1/health"
_ENDPOINTS = b"/v1/endpoints"
_PROXY_HEADERS = {
    b"x-forwarded-for": "X-Forwarded-For",
    b"forwarded": "Forwarded",
    b"x-real-ip": "X-Real-IP",
}


class _Rendered:
    """Full 200 responses of one snapshot, built once per (snapshot, format, close)."""

    __slots__ = ("cache", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.cache: dict[tuple[str, bool], bytes] = {}

    def get(self, fmt: str, close: bool) -> bytes:
        key = (fmt, close)
        out = self.cache.get(key)
        if out is None:
            out = self.cache[key] = response(200, self.snapshot.bodies[fmt], close=close)
        return out


class Grant(NamedTuple):
    """A request for credentials that passed every check its head and peer decide."""

    consumer: Consumer
    fmt: str
    close: bool
    generation: int  # the registry's when granted: adding or removing a consumer voids it
    session: bytes | None  # digest of the EC2 session token that let it in


class CredentialServer:
    """Serve a :class:`Registry` over a Unix socket and optionally loopback TCP.

    The event loop runs in its own thread; :meth:`start` returns once listening.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        socket_path: Path | None,
        access: Access | None = None,
        tcp: tuple[str, int] | None = None,
        inherit: bool = True,
        request_wait: float = 2.0,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tcp is not None and not is_loopback(tcp[0]):
            raise ValueError(f"credential TCP listener must be on loopback, not {tcp[0]}")
        self.registry = registry
        self.socket_path = socket_path
        self.access = access or Access()
        self.tcp = tcp
        self.inherit = inherit
        self.request_wait = request_wait
        self.clock = clock
        self.tcp_address: tuple[str, int] | None = None
        self.tcp_error = ""
        self.token_file = ""  # where TCP clients read the host endpoint's token
        self.sessions = ec2.SessionTokens(clock)  # IMDSv2-style, for the EC2 routes
        self._verified: tuple[Consumer, bytes] | None = None  # the last token that verified
        self.requests = 0
        self.refused = 0
        self.connections = Connections(limits or Limits())
        self.listeners = Listeners()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: dict[int, asyncio.base_events.Server] = {}  # by listening fd
        self._rendered: dict[int, _Rendered] = {}  # id(source) -> responses of its snapshot
        self._published: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> CredentialServer:
        self.listeners = open_listeners(self.socket_path, self.access, self.tcp,
                                        inherit=self.inherit)
        self.tcp_error = self.listeners.tcp_error
        self._thread = threading.Thread(target=self._serve, name="credentials-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.listeners.close()
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        # Only a socket file we created goes away; systemd's stays bound for the next start.
        self.listeners.close()

    def add_listener(self, sock: socket.socket, *, loopback_only: bool = True) -> None:
        """Serve on one more listening socket (thread-safe), e.g. a task launcher's address
        on a container bridge. With ``loopback_only=False`` peers that are not on loopback
        are answered too; they have no uid, so only a consumer minted for their address
        (``Registry.mint(..., addresses=...)``) lets them in. The caller keeps ``sock``."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("credential server is not running")
        kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
        dup = sock.dup()
        dup.setblocking(False)
        future = asyncio.run_coroutine_threadsafe(self._serve_on(dup, kind, loopback_only), loop)
        future.result(timeout=10)

    def remove_listener(self, sock: socket.socket) -> None:
        """Stop serving a socket given to :meth:`add_listener` (open connections finish)."""
        loop = self._loop
        if loop is None:
            return
        name = sock.getsockname()

        def close() -> None:
            for fd, srv in list(self._servers.items()):
                if any(s.getsockname() == name for s in srv.sockets):
                    srv.close()
                    del self._servers[fd]

        loop.call_soon_threadsafe(close)

    def published(self) -> None:
        """A source published a snapshot (any thread): wake requests waiting for it."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_published)

    def _on_published(self) -> None:
        if self._published is not None:
            self._published.set()
            self._published = asyncio.Event()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._published = asyncio.Event()
            loop.run_until_complete(self._listen())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for srv in self._servers.values():
                srv.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _listen(self) -> None:
        # asyncio closes the sockets it serves: it gets duplicates, the originals stay with
        # self.listeners (closed by stop(), never when an add_listener socket goes).
        unix, tcp = self.listeners.unix, self.listeners.tcp
        if unix is not None:
            await self._serve_on(unix.dup(), "unix", True)
            log.info("credential server listening on %s", self.listeners.unix_path)
        if tcp is not None:
            await self._serve_on(tcp.dup(), "tcp", True)
            self.tcp_address = tcp.getsockname()[:2]
            log.info("credential server listening on http://%s:%s", *self.tcp_address)

    async def _serve_on(self, sock: socket.socket, kind: str, loopback_only: bool) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)

        def factory() -> Connection:
            return Connection(self, self.connections, kind, loopback_only=loopback_only)

        if kind == "unix":
            srv = await loop.create_unix_server(factory, sock=sock)
        else:
            srv = await loop.create_server(factory, sock=sock)
        self._servers[sock.fileno()] = srv

    # -- requests ----------------------------------------------------------------------

    def rendered(self, consumer: Consumer) -> _Rendered:
        snap = consumer.source.snapshot
        key = id(consumer.source)
        cached = self._rendered.get(key)
        if cached is None or cached.snapshot is not snap:
            cached = self._rendered[key] = _Rendered(snap)
        return cached

    def handle(self, peer: Peer, req: Request) -> bytes | Snapshot:
        """The response bytes, or the snapshot to wait past (mandatory window)."""
        return self.answer(peer, req)[0]

    def answer(self, peer: Peer, req: Request) -> tuple[bytes | Snapshot, Grant | None]:
        """As :meth:`handle`, plus the grant a connection may :meth:`replay` when its
        client sends the very same head again (None: no credentials were served)."""
        self.requests += 1
        decided = self._decide(peer, req)
        if isinstance(decided, Grant):
            return self._answer(decided.consumer, decided.fmt, decided.close), decided
        return decided, None

    def replay(self, grant: Grant) -> bytes | Snapshot | None:
        """Answer a head identical to the one ``grant`` came from, on the same connection
        (so from the same peer): everything that head and peer decided still holds unless
        a consumer was added or removed since, or the session token lapsed (then None: decide
        again). What changes over time (the snapshot, its windows) is checked as always."""
        if grant.generation != self.registry.generation:
            return None
        if grant.session is not None and not self.sessions.holds(grant.session):
            return None
        self.requests += 1
        return self._answer(grant.consumer, grant.fmt, grant.close)

    def _decide(self, peer: Peer, req: Request) -> bytes | Grant:
        method, target, headers, close = req
        if b"x-forwarded-for" in headers or b"forwarded" in headers or b"x-real-ip" in headers:
            # A proxy relayed this request: the peer we identified is not the client.
            proxied = next(h for h in _PROXY_HEADERS if h in headers)
            return self._refuse(
                peer, 403, "Forbidden",
                f"requests carrying {_PROXY_HEADERS[proxied]} are refused (relayed by a proxy)",
                close,
            )
        path = target.split(b"?", 1)[0]
        auth = headers.get(b"authorization")
        consumer, rest, by_path = self.registry.resolve(path, auth)
        if consumer is None:
            return self._refuse(peer, 404, "NotFound", "no such endpoint", close)
        if not consumer.permits(peer):
            why = (
                f"uid {peer.uid} may not read the instance's credentials; {consumer.hint}"
                if peer.uid is not None
                else f"cannot identify the client process ({peer.why})"
            )
            return self._refuse(peer, 403, "Forbidden", why, close)
        if rest == _HEALTH:
            return self._health(consumer, close)
        if rest == _ENDPOINTS and peer.address == "unix" and consumer is self.registry.default:
            return self._endpoints(close)
        if rest.startswith(ec2.PREFIX):
            return self._ec2(consumer, by_path, req, rest)
        fmt = _ROUTES.get(rest)
        if fmt is None:
            return error_response(
                404, "NotFound", "no such path; use /v1/credentials/alibaba, /v1/credentials/aws "
                "or /v1/health", close=close,
            )
        if method != b"GET":
            return error_response(405, "MethodNotAllowed", "only GET is served", close=close)
        if not self._authenticated(consumer, by_path, peer, auth):
            return self._refuse(
                peer, 401, "Unauthorized", "missing or wrong Authorization token; send the "
                "content of the endpoint's token file", close,
            )
        return Grant(consumer, fmt, close, self.registry.generation, None)

    def _authenticated(self, consumer: Consumer, by_path: bool, peer: Peer,
                       auth: bytes | None) -> bool:
        if by_path and (consumer.path_suffices or (consumer.path_unless_token and auth is None)):
            return True
        if consumer is self.registry.default and not by_path and peer.address == "unix":
            return True  # SO_PEERCRED names the process exactly: no request forgery here
        # Clients send the same token on every request: once it verified, a constant-time
        # comparison with it saves hashing each time.
        last = self._verified
        if (auth is not None and last is not None and last[0] is consumer
                and hmac.compare_digest(auth, last[1])):
            return True
        if consumer.token_ok(auth):
            if auth is not None:
                self._verified = (consumer, auth)
            return True
        return False

    def _endpoints(self, close: bool) -> bytes:
        """Where each client format is served, for ``guestagent credentials env``
        (over the Unix socket only: it names the capability path)."""
        doc: dict[str, str] = {"socket": str(self.listeners.unix_path or "")}
        if self.tcp_address is not None:
            host, port = self.tcp_address
            base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
            cap = self.registry.default.capability
            if cap:
                doc["alibaba"] = f"{base}/{cap}/v1/credentials/alibaba"
            doc["aws"] = f"{base}/v1/credentials/aws"
            if self.token_file:
                doc["token_file"] = self.token_file
        return response(200, json.dumps(doc).encode(), close=close)

    def _answer(self, consumer: Consumer, fmt: str, close: bool) -> bytes | Snapshot:
        rendered = self.rendered(consumer)
        snap = rendered.snapshot
        verdict = snap.verdict(self.clock())
        if verdict == "serve":
            return rendered.get(fmt, close)
        if verdict == "wait":
            consumer.source.kick()
            return snap
        if snap.host_expired():
            consumer.source.kick()  # a fresh set, or a corrected clock, ends this
        return self._unavailable(snap, close)

    def _ec2(self, consumer: Consumer, by_path: bool, req: Request,
             rest: bytes) -> bytes | Grant:
        method, headers, close = req.method, req.headers, req.close
        session = None if rest == ec2.TOKEN or by_path else self.sessions.check(headers)
        if rest != ec2.TOKEN and not by_path and session is None:
            return error_response(401, "Unauthorized", "EC2-style reads need a session token: "
                                  "PUT /latest/api/token first (or use a capability path)",
                                  close=close)
        if rest == ec2.TOKEN:
            if method != b"PUT":
                return error_response(405, "MethodNotAllowed", "PUT a token", close=close)
            ttl = ec2.token_ttl(headers)
            if ttl is None:
                return error_response(400, "BadRequest", "X-aws-ec2-metadata-token-ttl-seconds"
                                      " must be 1..21600", close=close)
            return response(200, self.sessions.issue(ttl), close=close,
                            extra=b"X-Aws-Ec2-Metadata-Token-Ttl-Seconds: %d\r\n" % ttl)
        role = ec2.role_of(rest)
        if role is None or method != b"GET":
            return error_response(404, "NotFound", "no such EC2-style path", close=close)
        snap = consumer.source.snapshot
        name = (snap.role or "guestagent").encode()
        if role == b"":
            return response(200, name, close=close)
        if role != name:
            return error_response(404, "NotFound", "no such role", close=close)
        return Grant(consumer, "ec2", close, self.registry.generation, session)

    async def wait_and_handle(self, req: Request, snap: Snapshot) -> bytes:
        """Mandatory window: wait for the rotator's next word, then serve or refuse."""
        _method, target, headers, close = req
        deadline = self.clock() + self.request_wait
        path = target.split(b"?", 1)[0]
        consumer, rest, _by_path = self.registry.resolve(path, headers.get(b"authorization"))
        assert consumer is not None  # handle() resolved it before asking to wait
        fmt = _ROUTES.get(rest) or ("ec2" if ec2.role_of(rest) else "aws")
        while True:
            left = deadline - self.clock()
            current = consumer.source.snapshot
            if current.generation > snap.generation or left <= 0:
                break
            event = self._published
            assert event is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.25))
        rendered = self.rendered(consumer)
        if rendered.snapshot.verdict(self.clock()) == "serve":
            return rendered.get(fmt, close)
        return self._unavailable(rendered.snapshot, close)

    def _unavailable(self, snap: Snapshot, close: bool) -> bytes:
        status, code, message = snap.refusal(self.clock())
        return error_response(status, code, message, close=close)

    def _health(self, consumer: Consumer, close: bool) -> bytes:
        snap = consumer.source.snapshot
        now = self.clock()
        ok = snap.verdict(now) == "serve"
        doc: dict[str, Any] = {"status": snap.state if not ok else "ok", "role": snap.role}
        if snap.credentials is not None:
            doc["expires_in"] = max(0, int(snap.expires_at - now))
        if snap.error:
            doc["error"] = snap.error
        elif not ok and snap.credentials is not None:
            doc["error"] = snap.refusal(now)[2]
        offset = snap.clock_offset(now)
        if offset is not None and abs(offset) > DATE_TOLERANCE:
            doc["clock_offset"] = round(offset)  # service clock minus host clock, seconds
        body = json.dumps(doc, separators=(",", ":")).encode()
        return response(200 if ok else 503, body, close=close)

    def _refuse(self, peer: Peer, status: int, code: str, message: str, close: bool) -> bytes:
        self.refused += 1
        log.info("refused credential request from %s: %s", peer.describe(), message)
        return error_response(status, code, message, close=close)


def resolve_group(name: str) -> int:
    """A group name or numeric gid, as settings give it."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {name!r}") from None
