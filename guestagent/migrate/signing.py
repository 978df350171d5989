"""Alibaba Cloud RPC request signing (signature version 1.0, HMAC-SHA1).

The parameters are sorted, each name and value percent-encoded (RFC 3986, ``~`` kept,
space as ``%20``), joined with ``&``; the string to sign is ``METHOD&%2F&<encoded query>``
and the key is the AccessKey secret followed by ``&``. The local cloud's endpoint checks
requests with the same functions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

API_VERSION = "2014-05-26"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def percent_encode(text: str) -> str:
    return quote(text, safe="~")


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}"
                    for k, v in sorted(params.items()))


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(canonical_query(params))}"


def signature(secret: str, method: str, params: Mapping[str, str]) -> str:
    mac = hmac.new((secret + "&").encode(), string_to_sign(method, params).encode(),
                   hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def signed_params(action: str, access_id: str, secret: str, params: Mapping[str, str],
                  *, method: str = "POST", now: datetime | None = None) -> dict[str, str]:
    """The full parameter set of a signed request (``Signature`` included)."""
    moment = now or datetime.now(UTC)
    common = {
        "Action": action, "Format": "JSON", "Version": API_VERSION,
        "AccessKeyId": access_id, "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0", "SignatureNonce": uuid.uuid4().hex,
        "Timestamp": moment.strftime(TIMESTAMP_FORMAT),
    }
    merged = {**common, **params}
    merged["Signature"] = signature(secret, method, merged)
    return merged


def verify(secret: str, method: str, params: Mapping[str, str]) -> bool:
    given = params.get("Signature", "")
    rest = {k: v for k, v in params.items() if k != "Signature"}
    return hmac.compare_digest(given, signature(secret, method, rest))
