"""The EC2-style route the Docker registry's AWS SDK refreshes through."""

from __future__ import annotations

import http.client
import json
from datetime import timedelta
from typing import Any

from guestagent.credentials.formats import EC2_EARLY
from guestagent.metadata.models import parse_time


def _call(running: Any, method: str, path: str, headers: dict[str, str] | None = None
          ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*running.tcp, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_ec2_shape_under_a_capability_path(credential_service: Any) -> None:
    running = credential_service(scaled=False)
    minted = running.service.registry.mint("registry", running.service.rotator)
    base = minted.path

    status, headers, body = _call(running, "PUT", f"{base}/latest/api/token",
                                  {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert status == 200 and body
    assert headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"

    status, _, role = _call(running, "GET", f"{base}/latest/meta-data/iam/security-credentials/")
    assert status == 200 and role.decode() == running.service.rotator.snapshot.role

    status, _, body = _call(running, "GET",
                            f"{base}/latest/meta-data/iam/security-credentials/{role.decode()}")
    doc = json.loads(body)
    creds = running.service.rotator.snapshot.credentials
    assert status == 200 and doc["Code"] == "Success"
    assert doc["AccessKeyId"] == creds.access_key_id
    assert doc["SecretAccessKey"] == creds.access_key_secret and doc["Token"]
    # Served early, so the SDK re-fetches while the set it holds is still valid.
    assert parse_time(doc["Expiration"], "Expiration") == creds.expiration - EC2_EARLY
    assert timedelta(minutes=5) < EC2_EARLY  # beyond aws-sdk-go's own 5-minute window


def test_ec2_route_refusals(credential_service: Any, tmp_path: Any) -> None:
    running = credential_service(scaled=False, token_file=tmp_path / "token")
    minted = running.service.registry.mint("registry", running.service.rotator)
    base = minted.path
    for ttl in ("0", "21601", "x", ""):
        status, _, body = _call(running, "PUT", f"{base}/latest/api/token",
                                {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        assert status == 400, ttl
        assert json.loads(body)["code"] == "BadRequest"
    assert _call(running, "GET", f"{base}/latest/api/token")[0] == 405
    assert _call(running, "GET",
                 f"{base}/latest/meta-data/iam/security-credentials/other-role")[0] == 404
    # Outside a capability path (aws-sdk-go drops it), IMDSv2 rules: no session token, no
    # answer (a request forged through a local web app cannot PUT with a header) ...
    roles = "/latest/meta-data/iam/security-credentials/"
    assert _call(running, "GET", roles)[0] == 401
    assert _call(running, "GET", roles, {"X-aws-ec2-metadata-token": "made-up"})[0] == 401
    # ... and with one from a PUT, the role and its document.
    status, _, session = _call(running, "PUT", "/latest/api/token",
                               {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    status, _, role = _call(running, "GET", roles, {"X-aws-ec2-metadata-token": session.decode()})
    assert status == 200 and role.decode() == running.service.rotator.snapshot.role
    status, _, body = _call(running, "GET", roles + role.decode(),
                            {"X-aws-ec2-metadata-token": session.decode()})
    assert status == 200 and json.loads(body)["Code"] == "Success"
