"""The registry factory of Docker mode: how the agent (daemon or ``tasks submit`` in the
foreground) starts the OSS-backed registry a job's BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH
names.

Storage: the ``[storage]`` endpoint and region (distribution forces path-style addressing,
which the local cloud's S3 servers take). Keys: the credential server's loopback listener,
EC2-style. The registry's AWS SDK drops any path of AWS_EC2_METADATA_SERVICE_ENDPOINT, so
no capability path can be used: the server's IMDSv2-token routes at its root serve it,
permitted by the registry's uid (root).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from guestagent.tasks.errors import TaskError

if TYPE_CHECKING:
    from guestagent.config import Settings
    from guestagent.tasks.docker import RegistryFactory
    from guestagent.tasks.ossregistry import OssRegistry


def credentials_endpoint(settings: Settings) -> str:
    """The credential server's loopback listener; one clear line when it is off."""
    creds = settings.credentials
    if not creds.enabled or not creds.tcp_enabled or not creds.tcp_port:
        raise TaskError("Docker images from OSS need the credential server's loopback "
                        "listener: set [credentials] enabled = true, tcp_enabled = true and "
                        "a tcp_port")
    return f"http://{creds.tcp_host}:{creds.tcp_port}"


def factory(settings: Settings, workdir: Path) -> RegistryFactory:
    """Registries under ``workdir/<hash of the OSS path>``."""

    def make(path: str) -> OssRegistry:
        from guestagent.storage import endpoint
        from guestagent.storage.errors import StorageError
        from guestagent.tasks.ossregistry import OssRegistry, RegistryError, RegistryStorage

        creds = credentials_endpoint(settings)
        try:
            storage = RegistryStorage.parse(path)
            ep = endpoint.resolve(settings.storage, os.environ,
                                  lambda: endpoint.from_instance(settings.metadata))
        except (RegistryError, StorageError) as exc:
            raise TaskError(str(exc)) from None
        name = hashlib.sha256(path.encode()).hexdigest()[:16]
        return OssRegistry(storage, f"{ep.scheme}://{ep.netloc}", ep.region, creds,
                           workdir / name)

    return make
