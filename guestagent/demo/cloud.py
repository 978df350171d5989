"""Act 1: the local cloud — metadata emulator, OSS (moto's S3 server), a private dockerd.

Everything is started under the work directory and registered on one ExitStack, so it is
stopped in reverse order whatever happens (success, a failed step, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from guestagent.demo.common import BUCKET, DemoFailed, say


class LocalCloud:
    def __init__(self, workdir: Path, stack: contextlib.ExitStack, docker: bool) -> None:
        self.workdir = workdir
        self.stack = stack
        self.want_docker = docker
        self.emu: Any = None
        self.oss_url = ""
        self.engine: Any = None
        self.docker_skipped = "" if docker else "--no-docker given"

    def start(self) -> LocalCloud:
        from guestagent.localcloud.emulator import Emulator
        from guestagent.localcloud.oss import MotoOss, OssStandInError

        say("act 1: the local cloud")
        self.emu = self.stack.enter_context(Emulator().start())
        print(f"   metadata service {self.emu.url} (control API {self.emu.control_url})")
        oss = MotoOss(self.workdir / "oss", {"GUESTAGENT_LOCALCLOUD_BUCKETS": BUCKET})
        try:
            oss.start()
        except OssStandInError as exc:
            raise DemoFailed(f"OSS stand-in: {exc}") from None
        self.stack.callback(oss.stop)
        self.oss_url = oss.url
        print(f"   OSS (moto S3 server) {oss.url}, bucket {BUCKET}")
        if self.want_docker:
            self._docker()
        return self

    def _docker(self) -> None:
        from guestagent.localcloud.dockerd import DockerEngine, EngineError

        if shutil.which("dockerd") is None:
            self.docker_skipped = "dockerd is not installed (Debian docker.io)"
        elif not Path("/sys/fs/cgroup").exists():
            self.docker_skipped = "no cgroup file system here"
        else:
            # A short path: the engine's socket must fit in sun_path.
            engine = DockerEngine(self.workdir / "d")
            try:
                engine.start()
            except EngineError as exc:
                self.docker_skipped = f"dockerd cannot run on this machine: {exc}"
            else:
                self.stack.callback(engine.stop)
                self.engine = engine
                print(f"   dockerd {engine.host} (bridge {engine.bridge}, "
                      f"gateway {engine.gateway})")
        if self.docker_skipped:
            print(f"   dockerd: skipped, {self.docker_skipped}")

    # -- the store, seen directly (the user's data before the instance, and a second opinion)

    def _client(self) -> Any:
        from guestagent.storage.endpoint import from_url
        from guestagent.storage.keys import Keys, StaticKeys
        from guestagent.storage.s3 import S3Client

        # moto takes any key: these stand for the data owner's console, never the agent's.
        return S3Client(from_url(self.oss_url, path_style=True),
                        StaticKeys(Keys("owner", "owner")), retries=3)

    def put(self, key: str, data: bytes) -> None:
        import hashlib

        client = self._client()
        try:
            client.put_object(BUCKET, key, data, hashlib.md5(data).digest())  # noqa: S324
        finally:
            client.close()

    def get(self, key: str) -> bytes:
        client = self._client()
        try:
            resp = client.call("GET", BUCKET, key, what=f"oss://{BUCKET}/{key}")
            return bytes(resp.body)
        finally:
            client.close()
