"""The OSS-backed registry: real docker-registry over moto, a real dockerd pulling through
it, credentials from the agent's credential server (EC2-style route) across rotations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from dockerjobs import docker, registry_factory
from polling import wait_for

from guestagent.credentials.service import CredentialService
from guestagent.tasks.ossregistry import OssRegistry, RegistryError, RegistryStorage

BUCKET = "images-bucket"


def _registry(s3: Any, credentials: CredentialService, workdir: Path) -> OssRegistry:
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
    return registry_factory(s3, credentials, workdir)(f"oss://{BUCKET}/team/images/")


def _registry_keys(s3: Any) -> list[str]:
    return [key for key, _token in s3.signed_with() if key.startswith("STS.")]


@pytest.mark.slow
def test_image_round_trip_through_oss_across_rotations(
    s3: Any, scaled_credentials: CredentialService, docker_engine: Any, busybox_image: str,
    tmp_path: Path,
) -> None:
    credentials = scaled_credentials  # a new set every ~11 s
    registry = _registry(s3, credentials, tmp_path / "registry")
    registry.start()
    try:
        ref = registry.image("batch/busybox:1")
        docker(docker_engine, "tag", busybox_image, ref)
        docker(docker_engine, "push", ref)
        listed = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test"
                              ).list_objects_v2(Bucket=BUCKET)["Contents"]
        keys = [o["Key"] for o in listed]
        # BatchCompute's layout: oss://bucket/dir/ -> dir/docker/registry/v2/...
        assert any(k.startswith("team/images/docker/registry/v2/repositories/batch/busybox/")
                   for k in keys)
        first = set(_registry_keys(s3))
        assert first, "the registry signed nothing with the role's keys"

        # Two rotations later the registry still works, signing with the newer keys only.
        gen = credentials.rotator.snapshot.generation
        wait_for(lambda: credentials.rotator.snapshot.generation >= gen + 2, timeout=60)
        current = credentials.rotator.snapshot.credentials
        assert current is not None
        docker(docker_engine, "rmi", ref)
        before = len(_registry_keys(s3))
        docker(docker_engine, "pull", ref)
        out = docker(docker_engine, "run", "--rm", ref, "echo", "pulled-through-oss")
        assert out.text().strip() == "pulled-through-oss"
        later = _registry_keys(s3)[before:]
        assert later and not (set(later) & first), "an old set was used after two rotations"
    finally:
        registry.stop()


def test_registry_config_carries_no_secret(credentials: CredentialService, tmp_path: Path
                                           ) -> None:
    registry = OssRegistry(RegistryStorage.parse("oss://bucket-a/dir/"), "http://127.0.0.1:9",
                           "cn-hangzhou", "http://127.0.0.1:9/capability-secret", tmp_path)
    text = json.dumps(registry.config(5000))
    snap = credentials.rotator.snapshot.credentials
    assert snap is not None
    assert snap.access_key_id not in text and "capability-secret" not in text
    assert "capability-secret" not in repr(registry)
    env = registry.env({"AWS_CA_BUNDLE": "/x.pem", "AWS_ACCESS_KEY_ID": "AKIA", "PATH": "/bin"})
    assert "AWS_CA_BUNDLE" not in env and "AWS_ACCESS_KEY_ID" not in env
    assert env["AWS_EC2_METADATA_SERVICE_ENDPOINT"].endswith("/capability-secret")


@pytest.mark.parametrize("path", [
    "s3://bucket/dir/", "oss://UPPER/dir/", "oss://b/dir/", "oss://bucket/../etc/",
    "oss://bucket/a\nb/", "oss://bucket_x/",
])
def test_bad_registry_paths_are_refused(path: str) -> None:
    with pytest.raises(RegistryError, match="registry OSS path"):
        RegistryStorage.parse(path)


def test_storage_prefix() -> None:
    assert RegistryStorage.parse("oss://bkt/a/b/").prefix == "a/b/docker/registry/v2/"
    assert RegistryStorage.parse("oss://bkt/").prefix == "docker/registry/v2/"
