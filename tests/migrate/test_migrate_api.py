"""The signed ECS RPC: the published signing example, and the local endpoint refusing what
the cloud refuses (unknown key, wrong secret, replayed nonce, stale timestamp)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest

from guestagent.localcloud.components import factory
from guestagent.localcloud.ecsapi import AccessKey, Account, EcsApi
from guestagent.migrate import signing
from guestagent.migrate.api import EcsClient
from guestagent.migrate.errors import ApiError


def test_signature_matches_the_published_example() -> None:
    # The worked example of Alibaba Cloud's RPC signature documentation.
    params = {"AccessKeyId": "testid", "Action": "DescribeRegions", "Format": "XML",
              "SignatureMethod": "HMAC-SHA1",
              "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
              "SignatureVersion": "1.0", "Timestamp": "2016-02-23T12:46:24Z",
              "Version": "2014-05-26"}
    assert signing.string_to_sign("GET", params).startswith(
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions")
    assert signing.signature("testsecret", "GET", params) == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


@pytest.fixture
def api(tmp_path: Path) -> Iterator[EcsApi]:
    key = AccessKey("LTAI5tApiTest0001", "right-secret")
    with EcsApi(Account(keys={key.id: key}, images=["taken"]), tmp_path, "10.213.0.0/24") as a:
        yield a.start()


def _code(call: object) -> str:
    with pytest.raises(ApiError) as err:
        call()  # type: ignore[operator]
    return err.value.code


def test_endpoint_checks_key_secret_and_answers(api: EcsApi) -> None:
    good = EcsClient(api.url, "LTAI5tApiTest0001", "right-secret", "cn-hangzhou")
    images = good.call("DescribeImages", ImageName="taken")["Images"]["Image"]
    assert [i["ImageName"] for i in images] == ["taken"]
    wrong = EcsClient(api.url, "LTAI5tApiTest0001", "wrong-secret", "cn-hangzhou")
    assert _code(lambda: wrong.call("DescribeImages")) == "SignatureDoesNotMatch"
    nobody = EcsClient(api.url, "LTAI5tNobody00001", "x", "cn-hangzhou")
    assert _code(lambda: nobody.call("DescribeImages")) == "InvalidAccessKeyId.NotFound"
    assert _code(lambda: good.call("NoSuchAction")) == "InvalidAction.NotFound"
    assert "wrong-secret" not in repr(wrong) and good.clock_offset is not None


def test_replayed_or_stale_requests_are_refused(api: EcsApi) -> None:
    params = signing.signed_params("DescribeImages", "LTAI5tApiTest0001", "right-secret", {})
    body = urlencode(params).encode()

    def post(data: bytes) -> tuple[int, dict[str, str]]:
        try:
            with urllib.request.urlopen(api.url + "/", data=data, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert post(body)[0] == 200
    status, answer = post(body)
    assert status == 400 and answer["Code"] == "SignatureNonceUsed"
    old = datetime.now(UTC) - timedelta(hours=1)
    stale = signing.signed_params("DescribeImages", "LTAI5tApiTest0001", "right-secret", {},
                                  now=old)
    status, answer = post(urlencode(stale).encode())
    assert status == 400 and answer["Code"] == "InvalidTimeStamp.Expired"


def test_localcloud_component_serves_the_api_with_a_key_file(tmp_path: Path) -> None:
    component = factory("ecs")(tmp_path / "ecs", {})
    env = component.start()
    try:
        keys = json.loads(Path(env["GUESTAGENT_LOCALCLOUD_ECS_KEYS"]).read_text())
        assert oct(Path(env["GUESTAGENT_LOCALCLOUD_ECS_KEYS"]).stat().st_mode & 0o777) == "0o600"
        assert all(keys[0]["secret_key"] not in v for v in env.values())
        client = EcsClient(env["GUESTAGENT_MIGRATE_ENDPOINT"], keys[0]["access_id"],
                           keys[0]["secret_key"], "cn-hangzhou")
        assert client.call("DescribeImages")["TotalCount"] == 0
    finally:
        component.stop()
