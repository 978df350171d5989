"""EC2-style instance-metadata routes, for AWS SDKs that refresh only through them.

The Docker registry's s3 driver (aws-sdk-go 1.44) ignores container-credential variables;
its chain ends at the EC2 role provider, which it points at
``AWS_EC2_METADATA_SERVICE_ENDPOINT``. Served under a consumer's capability path (that
path is the secret: those SDKs cannot send our ``Authorization`` header):

- ``PUT /latest/api/token``                          a session token (IMDSv2 handshake)
- ``GET /latest/meta-data/iam/security-credentials/`` the role name
- ``GET /latest/meta-data/iam/security-credentials/<role>`` the ``ec2`` document
"""

from __future__ import annotations

import secrets

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


def new_token() -> bytes:
    # Not checked afterwards: the capability path already authenticated the caller.
    return secrets.token_urlsafe(32).encode()


def role_of(rest: bytes) -> bytes | None:
    """The role a document request names (``b""`` for the listing), None if not ours."""
    if not rest.startswith(ROLES):
        return None
    return rest[len(ROLES):]
