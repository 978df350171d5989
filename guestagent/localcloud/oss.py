"""OSS stand-ins for ``localcloud up``: ``oss`` (moto's S3 server: S3 semantics, objects
in memory) and ``oss-rclone`` (``rclone serve s3`` over a directory: real throughput).

Both listen on an ephemeral 127.0.0.1 port, take any credentials (the agent signs with
the emulator's rotating STS keys), create the buckets named in
``GUESTAGENT_LOCALCLOUD_BUCKETS`` (comma-separated; default ``guestagent``) and hand back
the settings the agent needs: ``GUESTAGENT_STORAGE_ENDPOINT`` and path-style requests
(``bucket.127.0.0.1`` cannot resolve, so virtual-hosted names are not usable here).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from guestagent import process

START_TIMEOUT = 30.0
DEFAULT_BUCKETS = "guestagent"


class OssStandInError(RuntimeError):
    """The stand-in's program is missing or did not come up; the message says which."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, child: process.Child, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                child.stop(1.0)
                tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
                raise OssStandInError(
                    f"{child.name} did not start on port {port}: {tail}"
                ) from None
            time.sleep(0.05)


def _buckets(env: Mapping[str, str]) -> list[str]:
    raw = env.get("GUESTAGENT_LOCALCLOUD_BUCKETS", DEFAULT_BUCKETS)
    return [b.strip() for b in raw.split(",") if b.strip()]


class _StandIn:
    name = "oss"
    program = ""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = Path(workdir)
        self.buckets = _buckets(env)
        self.port = 0
        self._child: process.Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (bench/storage.py reads its CPU time)."""
        return self._child.pid if self._child is not None else None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def make_buckets(self) -> None:
        raise NotImplementedError

    def start(self) -> dict[str, str]:
        if shutil.which(self.program) is None:
            raise OssStandInError(f"{self.program} not found (pip install the test extras)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()  # a restart keeps its port
        log = self.workdir / f"{self.program}.log"
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        self._child = process.spawn(self.argv(), name=self.program, env=env,
                                    cwd=str(self.workdir), log_path=log)
        _wait_listening(self.port, self._child, log)
        from guestagent.storage.errors import StorageError

        try:
            self.make_buckets()
        except (OSError, StorageError) as exc:
            self.stop()
            raise OssStandInError(f"{self.name}: cannot create buckets: {exc}") from None
        own = "GUESTAGENT_LOCALCLOUD_" + self.name.upper().replace("-", "_") + "_URL"
        return {
            own: self.url,  # both stand-ins stay reachable when both run
            "GUESTAGENT_STORAGE_ENDPOINT": self.url,
            "GUESTAGENT_STORAGE_PATH_STYLE": "true",
        }

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop(5.0)
            self._child = None

    def __enter__(self) -> _StandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoOss(_StandIn):
    """moto's S3 server: the semantics (multipart, listing, errors) of S3."""

    name = "oss"
    program = "moto_server"

    def argv(self) -> list[str]:
        return [self.program, "-H", "127.0.0.1", "-p", str(self.port)]

    def make_buckets(self) -> None:
        from guestagent.storage.endpoint import from_url
        from guestagent.storage.keys import Keys, StaticKeys
        from guestagent.storage.s3 import S3Client

        # moto takes any key; these never leave this process.
        client = S3Client(from_url(self.url, path_style=True),
                          StaticKeys(Keys("localcloud", "localcloud")), retries=3)
        try:
            for bucket in self.buckets:
                client.create_bucket(bucket)
        finally:
            client.close()


class RcloneOss(_StandIn):
    """``rclone serve s3`` over ``<workdir>/oss-rclone/data`` (one directory per bucket)."""

    name = "oss-rclone"
    program = "rclone"

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def argv(self) -> list[str]:
        return [self.program, "serve", "s3", str(self.data), "--addr", f"127.0.0.1:{self.port}",
                "--config", "/dev/null", "--log-level", "NOTICE"]

    def start(self) -> dict[str, str]:
        self.data.mkdir(parents=True, exist_ok=True)
        return super().start()

    def make_buckets(self) -> None:
        for bucket in self.buckets:
            (self.data / bucket).mkdir(exist_ok=True)
