"""The documents the local server answers with, in the shapes real clients parse.

- ``alibaba``: the metadata service's own JSON (``ALIBABA_CLOUD_CREDENTIALS_URI``, oss2's
  ``EcsRamRoleCredentialsProvider``): ``Code == "Success"`` and the strict time format.
- ``aws``: the container-credentials JSON (``AWS_CONTAINER_CREDENTIALS_FULL_URI``).
- errors: ``{"code", "message"}`` (what AWS SDKs and the ECS agent use).
"""

from __future__ import annotations

import json

from guestagent.metadata.models import RoleCredentials, format_time

FORMATS = ("alibaba", "aws")


def alibaba(creds: RoleCredentials) -> bytes:
    return _dump(creds.to_metadata_json())


def aws(creds: RoleCredentials) -> bytes:
    return _dump(
        {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.access_key_secret,
            "Token": creds.security_token,
            "Expiration": format_time(creds.expiration),
        }
    )


def render_all(creds: RoleCredentials) -> dict[str, bytes]:
    """Every format, serialised once per credential set."""
    return {"alibaba": alibaba(creds), "aws": aws(creds)}


def error(code: str, message: str) -> bytes:
    return _dump({"code": code, "message": message})


def _dump(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
