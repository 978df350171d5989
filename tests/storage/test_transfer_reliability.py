"""Reliability with real processes: kill -9 mid-upload then resume, the S3 server stopped
and restarted mid-transfer, credentials rotating under a transfer."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from storage_helpers import KEYS, random_file
from test_storage_cli import write_config

from guestagent.localcloud.oss import RcloneOss
from guestagent.storage import ranges
from guestagent.storage.endpoint import from_url
from guestagent.storage.keys import SocketKeys, StaticKeys
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.s3 import ObjectInfo, S3Client
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import NoProgress, Options, Transfers

pytestmark = pytest.mark.slow


def md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def rclone_oss(tmp_path: Path) -> Iterator[RcloneOss]:
    oss = RcloneOss(tmp_path / "rclone", {"GUESTAGENT_LOCALCLOUD_BUCKETS": "bkt"})
    oss.start()
    yield oss
    oss.stop()


def client_of(oss: RcloneOss, **kw: Any) -> S3Client:
    return S3Client(from_url(oss.url, path_style=True), StaticKeys(KEYS), **kw)


class Lister(threading.Thread):
    """Lists the bucket over and over, keeping every (key, size) it saw."""

    def __init__(self, client: S3Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.seen: list[tuple[str, int]] = []
        self.rounds = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for item in self.client.list_objects("bkt", ""):
                if isinstance(item, ObjectInfo):
                    self.seen.append((item.key, item.size))
            self.rounds += 1

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def test_kill_9_during_multipart_upload_resumes(
    creds: Any, rclone_oss: RcloneOss, tmp_path: Path
) -> None:
    src = random_file(tmp_path / "big.bin", 160 * MiB)
    state = tmp_path / "state"
    config = write_config(tmp_path / "agent.toml", creds, rclone_oss.url, state,
                          part_size=5 * MiB, multipart_threshold=6 * MiB)
    env = dict(os.environ, GUESTAGENT_CONFIG=str(config))
    argv = [sys.executable, "-m", "guestagent", "-v", "storage", "cp", str(src),
            "oss://bkt/out/big.bin", "--concurrency", "1"]
    watcher = client_of(rclone_oss)
    lister = Lister(client_of(rclone_oss))
    lister.start()

    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records: list[Path] = []

    def upload_id() -> str | None:
        records[:] = list(state.glob("uploads/*.json"))
        return json.loads(records[0].read_text()).get("upload_id") if records else None

    wait_for(lambda: upload_id() is not None, timeout=60)
    uid = upload_id()
    assert uid
    wait_for(lambda: len(watcher.list_parts("bkt", "out/big.bin", uid) or {}) >= 3,
             timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    assert watcher.head_object("bkt", "out/big.bin") is None, "finished before the kill"
    rounds_before = lister.rounds
    wait_for(lambda: lister.rounds > rounds_before + 2, timeout=30)
    assert all(key != "out/big.bin" for key, _ in lister.seen), "partial object listed"
    # The record holds the upload's id and parts, never a credential.
    served = creds.service.rotator.snapshot.credentials
    text = records[0].read_text()
    assert served.access_key_secret not in text and served.security_token not in text

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    lister.stop()
    assert second.returncode == 0, second.stderr
    assert "resuming upload" in second.stderr
    assert md5(rclone_oss.data / "bkt" / "out" / "big.bin") == md5(src)
    # Whenever the key was listed at all, it was the whole object.
    assert {size for key, size in lister.seen if key == "out/big.bin"} <= {src.stat().st_size}
    assert not list(state.rglob("*.json"))
    watcher.close()


class Outage:
    """Stops the server once ``after`` bytes have moved, restarts it ``down`` seconds later
    (a fault of a set length, not a synchronisation)."""

    def __init__(self, oss: RcloneOss, after: int, down: float = 1.0) -> None:
        self.oss, self.after, self.down = oss, after, down
        self.moved = 0
        self.fired = threading.Event()
        self.restarted = threading.Event()
        self._lock = threading.Lock()

    def expect(self, nbytes: int, files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.moved += nbytes
            if self.moved < self.after or self.fired.is_set():
                return
            self.fired.set()
        self.oss.stop()
        threading.Timer(self.down, self._restart).start()

    def _restart(self) -> None:
        self.oss.start()
        self.restarted.set()

    def finished(self, name: str, nbytes: int) -> None:
        self.advance(0)


def test_server_restart_mid_transfer_is_retried(rclone_oss: RcloneOss, tmp_path: Path) -> None:
    big = random_file(tmp_path / "big.bin", 48 * MiB)
    opts = Options(state_dir=tmp_path / "state", part_size=5 * MiB,
                   multipart_threshold=6 * MiB, concurrency=2)
    client = client_of(rclone_oss, retries=12, backoff_base=0.1, backoff_max=1.0)
    with Transfers(client, opts) as t:
        t.upload_file(big, OssUrl.parse("oss://bkt/big.bin"))

    # Download: ranges resume where they stopped.
    outage = Outage(rclone_oss, after=12 * MiB)
    with Transfers(client, opts, outage) as t:
        t.download_file(OssUrl.parse("oss://bkt/big.bin"), tmp_path / "copy.bin")
    assert outage.restarted.is_set() and client.retried > 0
    assert md5(tmp_path / "copy.bin") == md5(big)

    # Upload of many small files: each PUT is retried.
    tree = tmp_path / "tree"
    for i in range(200):
        random_file(tree / f"f{i:03}", 2000)
    retried = client.retried
    outage = Outage(rclone_oss, after=50 * 2000)
    with Transfers(client, opts, outage) as t:
        keys = t.upload_tree(tree, OssUrl.parse("oss://bkt/tree/"))
    assert outage.restarted.is_set() and client.retried > retried and len(keys) == 200
    stored = rclone_oss.data / "bkt" / "tree"
    assert sorted(p.name for p in stored.iterdir()) == sorted(p.name for p in tree.iterdir())
    assert all((stored / p.name).read_bytes() == p.read_bytes() for p in tree.iterdir())
    client.close()


class Pause(NoProgress):
    """Holds the transfer after ``at`` files until ``until()`` is true."""

    def __init__(self, at: int, until: Any) -> None:
        self.at, self.until, self.count = at, until, 0
        self._lock = threading.Lock()

    def finished(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.count += 1
            hold = self.count == self.at
        if hold:
            wait_for(self.until, timeout=60)


def test_rotation_during_a_transfer(scaled_credentials: Any, s3: Any, tmp_path: Path) -> None:
    from storage_helpers import boto

    boto(s3.url).create_bucket(Bucket="bkt")
    expirations: dict[str, float] = {}

    def note(snap: Any) -> None:
        if snap.credentials is not None:
            expirations[snap.credentials.access_key_id] = snap.credentials.expiration.timestamp()

    note(scaled_credentials.rotator.snapshot)
    scaled_credentials.rotator.subscribe(note)
    first = scaled_credentials.rotator.snapshot.credentials
    keys = SocketKeys(scaled_credentials.settings.socket_path)
    client = S3Client(from_url(s3.url, path_style=True), keys, retries=3)
    tree = tmp_path / "tree"
    for i in range(40):
        random_file(tree / f"f{i:02}", 1000)
    # Half-way, wait until the first set has expired: the rest must use a newer one.
    pause = Pause(20, lambda: time.time() > first.expiration.timestamp() + 0.5)
    opts = Options(state_dir=tmp_path / "state", concurrency=1)
    with Transfers(client, opts, pause) as t:
        t.upload_tree(tree, OssUrl.parse("oss://bkt/t/"))
        t.download_tree(OssUrl.parse("oss://bkt/t/"), tmp_path / "back")
    assert sorted(p.read_bytes() for p in (tmp_path / "back").iterdir()) == \
        sorted(p.read_bytes() for p in tree.iterdir())
    used = {key for key, _ in s3.signed_with() if key in expirations}
    assert first.access_key_id in used and len(used) >= 2
    # No request was signed with a set past its Expiration.
    lines = [json.loads(line) for line in s3.recording.read_text().splitlines() if line]
    for entry in lines:
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        key = headers["authorization"].split("Credential=")[1].split("/")[0]
        if key in expirations:
            sent = calendar.timegm(time.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ"))
            assert sent <= expirations[key], f"request signed with expired set {key}"
    client.close()


def test_kill_9_during_download_resumes_inside_a_range(
    creds: Any, rclone_oss: RcloneOss, tmp_path: Path
) -> None:
    src = random_file(tmp_path / "big.bin", 160 * MiB)
    client = client_of(rclone_oss)
    with Transfers(client, Options(state_dir=tmp_path / "up")) as t:
        t.upload_file(src, OssUrl.parse("oss://bkt/big.bin"))
    state = tmp_path / "state"
    config = write_config(tmp_path / "agent.toml", creds, rclone_oss.url, state,
                          part_size=5 * MiB, multipart_threshold=6 * MiB)
    env = dict(os.environ, GUESTAGENT_CONFIG=str(config))
    dest = tmp_path / "out" / "big.bin"
    dest.parent.mkdir()
    argv = [sys.executable, "-m", "guestagent", "-v", "storage", "cp", "oss://bkt/big.bin",
            str(dest), "--concurrency", "1"]
    # stderr to a file: a pipe nobody reads could stall the copy it is meant to watch.
    errlog = tmp_path / "first.err"
    with errlog.open("wb") as err:
        first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)

    spans = ranges.plan(160 * MiB, 5 * MiB, 1)

    def landed() -> list[int]:
        assert first.poll() is None, f"first copy ended early: {errlog.read_text()[-500:]}"
        records = list(state.glob("downloads/*.json"))
        if not records:
            return []
        try:
            return list(json.loads(records[0].read_text()).get("got", []))
        except ValueError:
            return []

    def inside_a_range() -> bool:
        return any(0 < g < length for g, (_, length) in zip(landed(), spans, strict=False))

    # On an idle machine the whole copy takes well under a second, less than the record's
    # save interval: hold the copier stopped and let it run in short slices, so the kill
    # lands after the record shows a range partly landed, however fast or busy the machine.
    part = dest.with_name("big.bin.part")
    wait_for(lambda: part.exists(), timeout=240, step=0.002)
    first.send_signal(signal.SIGSTOP)
    for _ in range(400):
        if inside_a_range():
            break
        first.send_signal(signal.SIGCONT)
        time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # the record's save interval passes while the copier is stopped
    assert inside_a_range(), "no range was ever recorded part-way"
    recorded = sum(landed())
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert not dest.exists(), "finished before the kill"
    assert dest.with_name("big.bin.part").exists()
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    # It went on from the bytes the record counted, inside a range, not from its start.
    assert f"resuming download, {recorded} of {160 * MiB} bytes already here" in second.stderr
    assert md5(dest) == md5(src)
    assert not dest.with_name("big.bin.part").exists()
    assert not list(state.rglob("*.json"))
