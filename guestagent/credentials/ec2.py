"""EC2-style instance-metadata routes, for AWS SDKs that refresh only through them.

The Docker registry's s3 driver (aws-sdk-go 1.44) ignores container-credential variables;
its chain ends at the EC2 role provider, which it points at
``AWS_EC2_METADATA_SERVICE_ENDPOINT``. Those SDKs cannot send our ``Authorization``
header, and aws-sdk-go 1.44 keeps only the scheme and host of that endpoint (it drops a
capability path). So, as IMDSv2 does: a GET must carry a session token from a PUT (a
request forged through a local web app cannot PUT with a header), unless it came under a
consumer's capability path (the path is then the secret):

- ``PUT /latest/api/token``                          a session token (IMDSv2 handshake)
- ``GET /latest/meta-data/iam/security-credentials/`` the role name
- ``GET /latest/meta-data/iam/security-credentials/<role>`` the ``ec2`` document
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

PREFIX = b"/latest/"
TOKEN = b"/latest/api/token"
ROLES = b"/latest/meta-data/iam/security-credentials/"
TTL_HEADER = b"x-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL = 21600


def token_ttl(headers: dict[bytes, bytes]) -> int | None:
    """The TTL a token PUT asks for, or None when absent or out of 1..21600."""
    raw = headers.get(TTL_HEADER, b"")
    if not raw.strip().isdigit():
        return None
    ttl = int(raw)
    return ttl if 1 <= ttl <= MAX_TTL else None


SESSION_HEADER = b"x-aws-ec2-metadata-token"


class SessionTokens:
    """IMDSv2 session tokens issued by ``PUT /latest/api/token``, each valid for its TTL.
    Bounded: the oldest are forgotten first (their holders simply PUT again)."""

    LIMIT = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[bytes, float] = {}  # digest -> clock() when it lapses

    def issue(self, ttl: int) -> bytes:
        now = self._clock()
        if len(self._expiry) >= self.LIMIT:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
            while len(self._expiry) >= self.LIMIT:
                self._expiry.pop(next(iter(self._expiry)))
        token = secrets.token_urlsafe(32).encode()
        self._expiry[hashlib.sha256(token).digest()] = now + ttl
        return token

    def valid(self, headers: dict[bytes, bytes]) -> bool:
        return self.check(headers) is not None

    def check(self, headers: dict[bytes, bytes]) -> bytes | None:
        """The digest of the request's session token while that token is valid, else None."""
        presented = headers.get(SESSION_HEADER)
        if not presented:
            return None
        key = hashlib.sha256(presented.strip()).digest()
        return key if self.holds(key) else None

    def holds(self, key: bytes) -> bool:
        """The token with this digest is still valid (issued, not lapsed, not forgotten)."""
        lapses = self._expiry.get(key)
        return lapses is not None and self._clock() < lapses


def role_of(rest: bytes) -> bytes | None:
    """The role a document request names (``b""`` for the listing), None if not ours."""
    if not rest.startswith(ROLES):
        return None
    return rest[len(ROLES):]
