"""The agent-run image registry whose storage is an OSS path (BatchCompute's Docker mode).

BatchCompute names a registry by its storage: ``BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH =
oss://bucket/dir/`` holds the image as ``dir/docker/registry/v2/...``. The agent runs
Debian's ``docker-registry`` (distribution 2.8, s3 driver, OSS's S3-compatible API) on
loopback over that path; the Docker engine pulls ``127.0.0.1:<port>/<image>`` through it.

Credentials: the registry's AWS SDK reads env keys once and never again, so it is pointed
at the agent's credential server through ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (an EC2-
shaped route under a capability path, with an early ``Expiration`` so it re-fetches while
the set it holds is still valid). No key is ever in its config file, argv or environment.

Limit: distribution 2.8 forces path-style addressing whenever an endpoint is configured;
the local cloud's S3 servers accept it, OSS itself wants virtual-hosted names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from guestagent import process
from guestagent.files import atomic_write

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
# Variables of the agent's own environment the registry must not see: a CA bundle its SDK
# panics on, keys it would read once and keep past their expiry, the developer's profile.
_DROP = ("AWS_CA_BUNDLE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
         "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
         "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN")


class RegistryError(RuntimeError):
    """The registry could not be configured or did not come up; the message says why."""


@dataclass(frozen=True)
class RegistryStorage:
    bucket: str
    directory: str  # "" for the bucket's root, else "dir" or "dir/sub" (no slashes around)

    @classmethod
    def parse(cls, text: str) -> RegistryStorage:
        """``oss://bucket/dir/`` as BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH names it."""
        if not text.startswith("oss://"):
            raise RegistryError(f"registry OSS path {text!r}: must start with oss://")
        bucket, _, rest = text[len("oss://"):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise RegistryError(f"registry OSS path {text!r}: bucket {bucket!r} is not a valid "
                                "bucket name (3-63 of a-z, 0-9, '-')")
        parts = [p for p in rest.split("/") if p]
        if any(p in (".", "..") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in p)
               for p in parts):
            raise RegistryError(f"registry OSS path {text!r}: '.', '..' or control characters")
        return cls(bucket, "/".join(parts))

    @property
    def prefix(self) -> str:
        """Where the images' objects live in the bucket."""
        return (self.directory + "/" if self.directory else "") + "docker/registry/v2/"


@dataclass
class OssRegistry:
    """``docker-registry serve`` over an OSS path, on a free loopback port."""

    storage: RegistryStorage
    endpoint: str  # the S3-compatible endpoint URL
    region: str
    credentials_endpoint: str = field(repr=False)  # EC2-style base URL (a capability path)
    workdir: Path = Path("/var/lib/guestagent/registry")
    _child: process.Child | None = field(default=None, init=False, repr=False)
    address: str = field(default="", init=False)

    def config(self, port: int) -> dict[str, object]:
        return {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "s3": {
                    "region": self.region,
                    "regionendpoint": self.endpoint.rstrip("/"),
                    "bucket": self.storage.bucket,
                    "rootdirectory": "/" + self.storage.directory,
                    "secure": self.endpoint.startswith("https://"),
                    "v4auth": True,
                },
                # Clients must never be sent to the storage itself.
                "redirect": {"disable": True},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}"},
        }

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in _DROP}
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = self.credentials_endpoint
        env["AWS_EC2_METADATA_DISABLED"] = "false"
        # No shared credentials file or profile may be read instead of the endpoint.
        env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        env["AWS_CONFIG_FILE"] = os.devnull
        env["HOME"] = str(self.workdir)
        return env

    def start(self) -> str:
        exe = shutil.which("docker-registry")
        if exe is None:
            raise RegistryError("docker-registry not found: install Debian's docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        port = _free_port()
        path = self.workdir / "config.yml"
        # JSON is YAML: no YAML library needed to write the registry's configuration.
        atomic_write(path, json.dumps(self.config(port), indent=1), mode=0o600)
        self._child = process.spawn([exe, "serve", str(path)], name="docker-registry",
                                    env=self.env(os.environ),
                                    log_path=self.workdir / "registry.log")
        self.address = f"127.0.0.1:{port}"
        try:
            self._wait_ready()
        except RegistryError:
            self.stop()
            raise
        log.info("registry on %s over oss://%s/%s", self.address, self.storage.bucket,
                 self.storage.prefix)
        return self.address

    def _wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            assert self._child is not None
            if self._child.poll() is not None:
                raise RegistryError(f"docker-registry exited {self._child.returncode}: "
                                    f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RegistryError(f"docker-registry not ready after {START_TIMEOUT:.0f}s: "
                            f"{self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.workdir / "registry.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def alive(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop(grace=5)
            self._child = None

    def image(self, name: str) -> str:
        """The reference the engine pulls for ``name`` (``repo[:tag]``)."""
        return f"{self.address}/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
