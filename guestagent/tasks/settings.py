"""Settings of the task launcher: section ``[tasks]``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from guestagent.tasks.model import DEFAULT_MAX_TIMEOUT


@dataclass(frozen=True)
class TasksSettings:
    enabled: bool = True
    # Instances running at once on this machine: 0 = one per core, further capped by
    # memory (available memory / instance_memory_mb).
    max_parallel: int = 0
    instance_memory_mb: int = 256
    # At Timeout (or stop/drain) an instance gets SIGTERM, then SIGKILL after this grace.
    kill_grace: float = 10.0
    # Largest Timeout a job may ask for (the guide's quota is 6 hours).
    max_timeout: int = DEFAULT_MAX_TIMEOUT
    # BATCH_COMPUTE_OSS_HOST / _REGION / _CLUSTER_ID given to instances; empty host = the
    # region's internal OSS endpoint; empty region = the instance's region from metadata.
    oss_host: str = ""
    region: str = ""
    cluster_id: str = "local"
    # Notification events go to this program (event JSON on stdin) and/or loopback URL.
    notify_command: str = ""
    notify_url: str = ""
    # Docker mode: the engine's socket (unix:///path) and the loopback registry's port.
    docker_host: str = "unix:///var/run/docker.sock"
    registry_port: int = 0

    def validate(self) -> None:
        if self.max_parallel < 0:
            raise ValueError(f"max_parallel: must be >= 0, got {self.max_parallel}")
        if self.instance_memory_mb < 1:
            raise ValueError("instance_memory_mb: must be >= 1")
        if self.kill_grace <= 0:
            raise ValueError(f"kill_grace: must be > 0, got {self.kill_grace}")
        if self.max_timeout < 1:
            raise ValueError("max_timeout: must be >= 1")
        if self.notify_url:
            parts = urlsplit(self.notify_url)
            if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(
                    f"notify_url: {self.notify_url!r}: want http://127.0.0.1:PORT/path (loopback)"
                )
        if not self.docker_host.startswith("unix:///"):
            raise ValueError(f"docker_host: want unix:///path, got {self.docker_host!r}")
        if not 0 <= self.registry_port < 65536:
            raise ValueError("registry_port: must be 0-65535")
