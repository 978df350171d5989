"""Docker-mode set-up shared by the task tests: the docker CLI on the test's engine, the
runners a scheduler gets, and the agent's OSS-backed registry to push images through."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.cloud import tcp_base

from guestagent import process
from guestagent.credentials.service import CredentialService
from guestagent.tasks.docker import DockerRunner
from guestagent.tasks.ossregistry import OssRegistry, RegistryStorage
from guestagent.tasks.runner import HostRunner
from guestagent.tasks.settings import TasksSettings


def docker(engine: Any, *args: str) -> process.Result:
    """``docker -H <engine> args...``, which must succeed."""
    res = process.run(["docker", "-H", engine.host, *args], timeout=300)
    assert res.ok, res.stderr.decode()
    return res


def docker_runners(engine: Any, registries: Any = None) -> dict[str, Any]:
    """Host and Docker runners; ``registries`` makes an OSS registry for a path."""
    settings = TasksSettings(docker_host=engine.host)
    return {"host": HostRunner(), "docker": DockerRunner(settings, registries)}


def registry_factory(s3: Any, credentials: CredentialService, root: Path,
                     endpoint: str | None = None) -> Callable[[str], OssRegistry]:
    """Make registries on an ``oss://`` path as the agent does: each its own consumer of the
    credential server, its own workdir under ``root``."""
    def make(path: str) -> OssRegistry:
        index = len(list(root.glob("*")))
        minted = credentials.registry.mint(f"registry-{index}", credentials.rotator)
        return OssRegistry(RegistryStorage.parse(path), endpoint or s3.url, "cn-hangzhou",
                           tcp_base(credentials) + minted.path, root / str(index))
    return make


def push(engine: Any, registry: OssRegistry, local: str, name: str) -> None:
    """Push the engine's image ``local`` as ``name`` into a running registry."""
    ref = registry.image(name)
    docker(engine, "tag", local, ref)
    docker(engine, "push", ref)
    docker(engine, "rmi", ref)


def push_to_path(make: Callable[[str], OssRegistry], path: str, engine: Any, local: str,
                 name: str) -> None:
    """Push ``local`` as ``name`` into the registry on an ``oss://`` path (started and
    stopped around the push), as a user would before submitting a job."""
    pusher = make(path)
    pusher.start()
    try:
        push(engine, pusher, local, name)
    finally:
        pusher.stop()
