"""AWS Signature Version 4 for S3 requests (what OSS's S3-compatible API verifies).

Payloads are sent as ``UNSIGNED-PAYLOAD`` with a ``Content-MD5`` the server checks, so a
part is hashed once (MD5), not twice (MD5 and SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

from guestagent.storage.keys import Keys

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_cache_lock = threading.Lock()
_key_cache: dict[tuple[str, str, str], bytes] = {}


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, day: str, region: str, service: str = "s3") -> bytes:
    """The derived key for one day, region and service (cached: four HMACs saved per call)."""
    # Cache by a digest of the secret so the cache key itself holds no secret.
    ident = (hashlib.sha256(secret.encode()).hexdigest(), day, region)
    with _cache_lock:
        found = _key_cache.get(ident)
    if found is not None:
        return found
    k = _hmac(("AWS4" + secret).encode(), day)
    k = _hmac(k, region)
    k = _hmac(k, service)
    k = _hmac(k, "aws4_request")
    with _cache_lock:
        if len(_key_cache) > 64:
            _key_cache.clear()
        _key_cache[ident] = k
    return k


def canonical_query(query: Mapping[str, str]) -> str:
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


def sign(
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: dict[str, str],
    *,
    keys: Keys,
    region: str,
    payload_hash: str = UNSIGNED,
    now: datetime | None = None,
) -> None:
    """Add ``x-amz-date``, ``x-amz-content-sha256``, the token and ``Authorization``.

    ``path`` is already URI-encoded; ``headers`` must hold ``host``. Every header passed
    in is signed (callers pass only what the server must see unchanged).
    """
    moment = now or datetime.now(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers["x-amz-date"] = amz_date
    headers["x-amz-content-sha256"] = payload_hash
    if keys.token:
        headers["x-amz-security-token"] = keys.token
    lowered = sorted((k.lower(), " ".join(str(v).split())) for k, v in headers.items())
    signed = ";".join(k for k, _ in lowered)
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query(query),
            "".join(f"{k}:{v}\n" for k, v in lowered),
            signed,
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signature = hmac.new(
        signing_key(keys.secret, day, region), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    headers["Authorization"] = (
        f"{ALGORITHM} Credential={keys.access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
