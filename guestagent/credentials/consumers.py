"""Who may fetch credentials, and from which source.

A :class:`Consumer` is one endpoint: the processes allowed to use it (uids/gids; root
always), its secrets (an ``Authorization`` token and/or a capability path prefix) and the
credential source it serves. The host endpoint is the default consumer; a later task
launcher mints one scoped consumer per task or container with :meth:`Registry.mint`
(its own token, its own path, its own allowed uids and source) and removes it afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from guestagent.credentials.peers import Peer
from guestagent.credentials.rotation import Snapshot


class Source(Protocol):
    """Where a consumer's credentials come from (a :class:`Rotator` or a task's own)."""

    @property
    def snapshot(self) -> Snapshot: ...

    def kick(self) -> None: ...


def digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


@dataclass(frozen=True)
class Consumer:
    name: str
    source: Source = field(repr=False, compare=False)
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    # Only digests are kept, so a dump of the registry reveals no secret.
    token_digest: bytes | None = field(default=None, repr=False)
    capability: str | None = field(default=None, repr=False)
    hint: str = ""  # how to be allowed, for the 403 message
    # The capability path alone authenticates (clients that cannot send a header: the
    # Alibaba SDKs, oss2); otherwise the path selects and the token authenticates.
    path_suffices: bool = False
    # Peers with no uid (not on loopback: a container on a bridge) allowed by address.
    addresses: frozenset[str] = frozenset()
    # A task's endpoint: the path alone authenticates a request that carries no token (the
    # Alibaba clients behind the task relay), but a token it carries must be this one's —
    # so one instance's token never reads another's endpoint.
    path_unless_token: bool = False
    # Re-registered after an agent restart (see :meth:`Registry.restore`): only the
    # digest of the capability path is known, never the path itself.
    capability_digest: bytes | None = field(default=None, repr=False)

    def permits(self, peer: Peer) -> bool:
        if peer.uid is None:
            return bool(self.addresses) and peer.address.rsplit(":", 1)[0] in self.addresses
        if peer.uid == 0 or peer.uid in self.uids:
            return True
        return (peer.gid is not None and peer.gid in self.gids) or bool(peer.groups & self.gids)

    def token_ok(self, presented: bytes | None) -> bool:
        if self.token_digest is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(digest(bearer(presented)), self.token_digest)


def bearer(value: bytes) -> bytes:
    """``Authorization`` as AWS SDKs send it (the bare token) or as ``Bearer <token>``."""
    value = value.strip()
    if value[:7].lower() == b"bearer ":
        return value[7:].strip()
    return value


def _scoped(
    name: str, source: Source, uids: Iterable[int], gids: Iterable[int],
    addresses: Iterable[str], *, path_unless_token: bool, token_digest: bytes,
    capability: str | None = None, capability_digest: bytes | None = None,
) -> Consumer:
    """A task-scoped consumer: minted (its path known) or restored (only its digest)."""
    return Consumer(
        name=name,
        source=source,
        uids=frozenset(uids),
        gids=frozenset(gids),
        addresses=frozenset(addresses),
        token_digest=token_digest,
        capability=capability,
        capability_digest=capability_digest,
        hint=f"scoped endpoint {name!r}",
        path_unless_token=path_unless_token,
    )


@dataclass(frozen=True)
class Minted:
    """The secrets of a freshly minted consumer: hand them to the task, keep them nowhere."""

    consumer: Consumer
    token: str = field(repr=False)
    path: str = field(repr=False)  # prefix to put before /v1/credentials/...


class Registry:
    """Consumers by capability path and by token digest; lookups are lock-free reads."""

    def __init__(self, default: Consumer) -> None:
        self.default = default
        self._lock = threading.Lock()
        self._by_capability: dict[str, Consumer] = {}
        self._by_token: dict[bytes, Consumer] = {}
        self._named: dict[str, Consumer] = {}
        self._by_capability_digest: dict[bytes, Consumer] = {}
        # Bumped by every add and remove (after the swap): what the server decided for a
        # request under an older generation is decided again.
        self.generation = 0
        if default.capability:
            self._by_capability[default.capability] = default

    def __len__(self) -> int:
        return len(self._named) + 1

    def add(self, consumer: Consumer) -> None:
        if (not consumer.capability and consumer.capability_digest is None
                and consumer.token_digest is None):
            raise ValueError(f"consumer {consumer.name!r}: needs a token or a capability path")
        with self._lock:
            if consumer.name in self._named:
                raise ValueError(f"consumer {consumer.name!r} already exists")
            by_cap = dict(self._by_capability)
            by_tok = dict(self._by_token)
            by_digest = dict(self._by_capability_digest)
            if consumer.capability:
                by_cap[consumer.capability] = consumer
            elif consumer.capability_digest is not None:
                by_digest[consumer.capability_digest] = consumer
            elif consumer.token_digest is not None:
                by_tok[consumer.token_digest] = consumer
            # Swap whole dicts so the server's reads never need the lock.
            self._by_capability, self._by_token = by_cap, by_tok
            self._by_capability_digest = by_digest
            self._named = {**self._named, consumer.name: consumer}
            self.generation += 1

    def mint(
        self,
        name: str,
        source: Source,
        *,
        uids: Iterable[int] = (),
        gids: Iterable[int] = (),
        addresses: Iterable[str] = (),
        with_path: bool = True,
        path_unless_token: bool = False,
    ) -> Minted:
        """A new scoped consumer with a random token (and path); returns its secrets once."""
        token = secrets.token_urlsafe(32)
        path = secrets.token_urlsafe(24) if with_path else ""
        consumer = _scoped(name, source, uids, gids, addresses,
                           path_unless_token=path_unless_token and bool(path),
                           token_digest=digest(token), capability=path or None)
        self.add(consumer)
        return Minted(consumer, token, f"/{path}" if path else "")

    def restore(
        self,
        name: str,
        source: Source,
        *,
        token_digest: bytes,
        path_digest: bytes,
        uids: Iterable[int] = (),
        gids: Iterable[int] = (),
        addresses: Iterable[str] = (),
        path_unless_token: bool = False,
    ) -> Consumer:
        """Register again, after an agent restart, a consumer minted before it, from the
        digests of its token and path (:func:`digest`; kept by whoever minted it — never
        the secrets): the token and URL its holder still has work again."""
        consumer = _scoped(name, source, uids, gids, addresses,
                           path_unless_token=path_unless_token,
                           token_digest=token_digest, capability_digest=path_digest)
        self.add(consumer)
        return consumer

    def remove(self, name: str) -> None:
        with self._lock:
            consumer = self._named.get(name)
            if consumer is None:
                return
            self._by_capability = {
                k: v for k, v in self._by_capability.items() if v is not consumer
            }
            self._by_token = {k: v for k, v in self._by_token.items() if v is not consumer}
            self._by_capability_digest = {
                k: v for k, v in self._by_capability_digest.items() if v is not consumer
            }
            self._named = {k: v for k, v in self._named.items() if k != name}
            self.generation += 1

    def names(self) -> list[str]:
        return sorted(self._named)

    def resolve(
        self, path: bytes, authorization: bytes | None
    ) -> tuple[Consumer | None, bytes, bool]:
        """The consumer a request addresses, the path left after its capability prefix,
        and whether that prefix was used.

        None when the request names no reachable endpoint (the host endpoint has only a
        capability path, no token, and the request did not use it).
        """
        if len(path) > 1:
            end = path.find(b"/", 1)
            first = path[1:end] if end > 0 else path[1:]
            consumer = self._by_capability.get(first.decode("latin-1"))
            if consumer is None and self._by_capability_digest:
                consumer = self._by_capability_digest.get(digest(first))
            if consumer is not None:
                return consumer, path[end:] if end > 0 else b"/", True
        if authorization is not None and self._by_token:
            consumer = self._by_token.get(digest(bearer(authorization)))
            if consumer is not None:
                return consumer, path, False
        if self.default.capability and self.default.token_digest is None:
            return None, path, False
        return self.default, path, False


@runtime_checkable
class CredentialAccess(Protocol):
    """What the credential service offers other services through the daemon's context
    (``ctx.service("credentials", CredentialAccess)`` with ``requires=("credentials",)``)."""

    @property
    def source(self) -> Source: ...

    def mint(self, name: str, source: Source | None = None, *, uids: Iterable[int] = (),
             gids: Iterable[int] = (), addresses: Iterable[str] = (),
             with_path: bool = True, path_unless_token: bool = False) -> Minted: ...

    def restore(self, name: str, source: Source | None = None, *, token_digest: bytes,
                path_digest: bytes, uids: Iterable[int] = (), gids: Iterable[int] = (),
                addresses: Iterable[str] = (), path_unless_token: bool = False) -> Consumer:
        ...

    def remove(self, name: str) -> None: ...
