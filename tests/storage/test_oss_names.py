"""OSS URL and key rules, endpoint choice, and SigV4 against botocore's own signer."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from guestagent.storage import endpoint, sigv4
from guestagent.storage.errors import BadInput, StorageError
from guestagent.storage.keys import Keys
from guestagent.storage.ossurl import OssUrl, check_key
from guestagent.storage.settings import StorageSettings


def test_parse_oss_url() -> None:
    url = OssUrl.parse("oss://my-bucket/dir/sub/file.txt")
    assert (url.bucket, url.key, url.name, url.is_dir) == (
        "my-bucket", "dir/sub/file.txt", "file.txt", False)
    root = OssUrl.parse("oss://my-bucket")
    assert root.is_dir and root.prefix == ""
    assert OssUrl.parse("oss://my-bucket/dir/").join("a/b").key == "dir/a/b"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("s3://bucket/key", "not an OSS URL"),
        ("oss://Bucket/key", "bad bucket name"),
        ("oss://ab/key", "bad bucket name"),
        ("oss://-bucket/key", "bad bucket name"),
        ("oss://bucket/../etc/passwd", "'..' segment"),
        ("oss://bucket/a/./b", "'.' segment"),
        ("oss://bucket/a\x01b", "control character"),
        ("oss://bucket/a\x7fb", "control character"),
        ("oss://bucket/" + "k" * 1024, "at most 1023"),
        ("oss://bucket/" + "s" * 256 + "/x", "over 255 bytes"),
        ("oss://bucket//abs", "must not start with '/'"),
        ("oss://bucket/a//b", "empty path segment"),
    ],
)
def test_bad_urls_are_one_clear_line(text: str, needle: str) -> None:
    with pytest.raises(BadInput) as info:
        OssUrl.parse(text, "--dest")
    message = str(info.value)
    assert needle in message and "\n" not in message and message.startswith("--dest")


def test_key_limits_count_utf8_bytes() -> None:
    check_key("é" * 127)  # 254 bytes: fine
    with pytest.raises(BadInput, match="over 255 bytes"):
        check_key("é" * 128)


def test_endpoint_from_region_and_network_type() -> None:
    st = StorageSettings()
    public = endpoint.resolve(st, {}, lambda: ("cn-hangzhou", "classic"))
    vpc = endpoint.resolve(st, {}, lambda: ("cn-hangzhou", "vpc"))
    assert public.netloc == "s3.oss-cn-hangzhou.aliyuncs.com"
    assert vpc.netloc == "s3.oss-cn-hangzhou-internal.aliyuncs.com"
    assert vpc.scheme == "https" and vpc.region == "cn-hangzhou"
    # Virtual-hosted style: the bucket is in the host name.
    assert vpc.host_for("bkt") == "bkt.s3.oss-cn-hangzhou-internal.aliyuncs.com"
    assert vpc.path_for("bkt", "a b/c") == "/a%20b/c"
    forced = endpoint.resolve(StorageSettings(network="public"), {}, lambda: ("cn-beijing", "vpc"))
    assert forced.netloc == "s3.oss-cn-beijing.aliyuncs.com"


def test_batchcompute_oss_host_is_honoured() -> None:
    env = {"BATCH_COMPUTE_OSS_HOST": "oss-cn-shenzhen-internal.aliyuncs.com"}
    ep = endpoint.resolve(StorageSettings(), env, None)
    assert ep.netloc == "s3.oss-cn-shenzhen-internal.aliyuncs.com"
    assert ep.region == "cn-shenzhen" and not ep.path_style


def test_explicit_endpoint_wins_and_path_style_for_loopback() -> None:
    st = StorageSettings(endpoint="http://127.0.0.1:9000", path_style=True)
    ep = endpoint.resolve(st, {"BATCH_COMPUTE_OSS_HOST": "oss-cn-x.aliyuncs.com"}, None)
    assert (ep.scheme, ep.netloc, ep.path_style) == ("http", "127.0.0.1:9000", True)
    assert ep.host_for("bkt") == "127.0.0.1:9000" and ep.path_for("bkt", "k") == "/bkt/k"


def test_no_endpoint_without_instance_or_setting() -> None:
    with pytest.raises(StorageError, match=r"set \[storage\] endpoint"):
        endpoint.resolve(StorageSettings(), {}, None)


def test_sigv4_matches_the_published_s3_example() -> None:
    # AWS's documented "GET Object" example of Signature Version 4 for S3.
    keys = Keys("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = {"host": "examplebucket.s3.amazonaws.com", "range": "bytes=0-9"}
    sigv4.sign("GET", "/test.txt", {}, headers, keys=keys, region="us-east-1",
               payload_hash=sigv4.EMPTY_SHA256, now=datetime(2013, 5, 24, tzinfo=UTC))
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_keys_never_in_repr() -> None:
    keys = Keys("AKID", "very-secret", "session-token")
    assert "very-secret" not in repr(keys) and "session-token" not in repr(keys)
