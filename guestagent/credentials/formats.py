"""The documents the local server answers with, in the shapes real clients parse.

- ``alibaba``: the metadata service's own JSON (``ALIBABA_CLOUD_CREDENTIALS_URI``, oss2's
  ``EcsRamRoleCredentialsProvider``): ``Code == "Success"`` and the strict time format.
- ``aws``: the container-credentials JSON (``AWS_CONTAINER_CREDENTIALS_FULL_URI``).
- ``ec2``: the EC2 instance-metadata role document, for AWS SDKs that only refresh through
  an EC2-style endpoint (``AWS_EC2_METADATA_SERVICE_ENDPOINT``; the Docker registry's s3
  driver). Its ``Expiration`` is :data:`EC2_EARLY` before the real one: such SDKs re-fetch
  only once the served expiry is (nearly) past, and must do so while the rotator already
  holds the next set — an early expiry can only make them ask sooner, never use a dead set.
- errors: ``{"code", "message"}`` (what AWS SDKs and the ECS agent use).
"""

from __future__ import annotations

import json
from datetime import timedelta

from guestagent.metadata.models import RoleCredentials, format_time

FORMATS = ("alibaba", "aws", "ec2")
EC2_EARLY = timedelta(minutes=15)


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


def ec2(creds: RoleCredentials) -> bytes:
    return _dump(
        {
            "Code": "Success",
            "LastUpdated": format_time(creds.last_updated),
            "Type": "AWS-HMAC",
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.access_key_secret,
            "Token": creds.security_token,
            "Expiration": format_time(creds.expiration - EC2_EARLY),
        }
    )


def render_all(creds: RoleCredentials) -> dict[str, bytes]:
    """Every format, serialised once per credential set."""
    return {"alibaba": alibaba(creds), "aws": aws(creds), "ec2": ec2(creds)}


def error(code: str, message: str) -> bytes:
    return _dump({"code": code, "message": message})


def _dump(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
