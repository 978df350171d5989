"""The daemon's storage service: declared mounts made and kept healthy, outputs flushed by a
drain within its deadline, all visible in its status."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from polling import wait_for

from guestagent.config import from_mapping
from guestagent.storage.api import Storage
from guestagent.storage.mounts import mountinfo
from guestagent.storage.service import StorageService

pytestmark = pytest.mark.skipif(
    shutil.which("rclone") is None or not Path("/dev/fuse").exists() or os.geteuid() != 0,
    reason="needs rclone, /dev/fuse and root",
)


def settings_for(tmp_path, creds, s3, mounts):
    return from_mapping({
        "daemon": {"run_dir": str(tmp_path / "run"), "state_dir": str(tmp_path / "state")},
        "credentials": {"tcp_enabled": True, "tcp_port": urlsplit(creds.aws_url).port,
                        "token_file": str(creds.token_file)},
        "storage": {"endpoint": s3.url, "path_style": True, "region": "us-east-1",
                    "mounts": mounts, "mount_check_interval": 0.2,
                    "mount_ready_timeout": 60.0},
    })


@pytest.fixture
def running(tmp_path):
    started = []

    def start(service):
        stop = threading.Event()
        thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
        thread.start()
        started.append((service, stop, thread))
        return service

    yield start
    for service, stop, thread in started:
        stop.set()
        thread.join(10)
        service.storage.close()


def test_declared_mounts_are_made_healed_and_drained(bucket, creds, s3, tmp_path, agent_transfers,
                                                     running):
    name = bucket({"ref/genome.fa": b">chr1\nACGT\n"})
    dest = tmp_path / "ref"
    settings = settings_for(tmp_path, creds, s3, [f"oss://{name}/ref/:{dest}",
                                                  "nas://127.0.0.1:/nowhere/:/mnt/ga-nas-test"])
    storage = Storage(agent_transfers, options=Storage.from_settings(settings).options,
                      remote_factory=Storage.from_settings(settings).rclone_remote)
    service = running(StorageService(settings, storage))
    def rows():
        return {r["dest"]: r for r in service.status()["mounts"]}

    wait_for(lambda: rows().get(str(dest), {}).get("health") == "ok", timeout=60, step=0.2)
    assert mountinfo(dest) == "fuse.rclone"
    assert (dest / "genome.fa").read_bytes() == b">chr1\nACGT\n"
    rows = rows()
    assert rows[str(dest)]["health"] == "ok" and rows[str(dest)]["origin"] == "settings"
    nas_row = rows["/mnt/ga-nas-test"]
    assert nas_row["kind"] == "nas" and nas_row["health"] == "error"
    assert "no NFS client" in nas_row["error"] or "preflight" in nas_row["error"]
    assert not service.healthy()  # a declared NAS mount could not be made here

    # rclone killed: back within a few seconds, on its own.
    (mount,) = service.storage.mounts.mounts()
    first = mount.proc.pid
    os.killpg(first, signal.SIGKILL)
    wait_for(lambda: mount.proc.pid != first and mount.health == "ok", timeout=30, step=0.1)
    assert (dest / "genome.fa").read_bytes() == b">chr1\nACGT\n"

    # A task's output, pending when the drain comes: flushed, then mounts released.
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("42\n")
    service.storage.open_output(out, f"oss://{name}/out/")
    assert service.status()["pending_uploads"] == 1
    service.drain(time.monotonic() + 60)
    body = bucket.client.get_object(Bucket=name, Key="out/result.txt")["Body"].read()
    assert body == b"42\n"
    assert service.last_drain["incomplete"] == {} and service.last_drain["uploaded"] == 1
    assert mountinfo(dest) is None


def test_a_drain_out_of_time_reports_what_it_could_not_upload(bucket, creds, s3, tmp_path,
                                                              agent_transfers):
    name = bucket()
    settings = settings_for(tmp_path, creds, s3, [])
    service = StorageService(settings, Storage(agent_transfers))
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin").write_bytes(b"x" * 1000)
    service.storage.open_output(out, f"oss://{name}/out/")
    service.drain(time.monotonic())  # no time left at all
    assert service.last_drain["incomplete"][str(out)]["unfinished"] == ["big.bin"]
    assert service.status()["drain"]["incomplete"]


def test_a_restart_keeps_declared_mounts_and_drops_undeclared_ones(bucket, creds, s3, tmp_path,
                                                                   agent_transfers):
    name = bucket({"ref/a.txt": b"kept", "old/b.txt": b"dropped"})
    kept, dropped = tmp_path / "ref", tmp_path / "old"

    def service_for(mounts):
        settings = settings_for(tmp_path, creds, s3, mounts)
        made = Storage.from_settings(settings)
        return StorageService(settings, Storage(agent_transfers, options=made.options,
                                                remote_factory=made.rclone_remote))

    def run(service):
        stop = threading.Event()
        thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
        thread.start()
        wait_for(lambda: service.ready, timeout=120, step=0.1)
        return stop, thread

    first = service_for([f"oss://{name}/ref/:{kept}", f"oss://{name}/old/:{dropped}"])
    stop, thread = run(first)
    pids = {m.dest: m.proc.pid for m in first.storage.mounts.mounts()}
    assert mountinfo(kept) == mountinfo(dropped) == "fuse.rclone"
    stop.set()  # the agent restarts: no drain, the mounts stay
    thread.join(30)
    assert mountinfo(kept) == mountinfo(dropped) == "fuse.rclone"

    second = service_for([f"oss://{name}/ref/:{kept}"])  # the settings changed meanwhile
    stop, thread = run(second)
    try:
        (mount,) = second.storage.mounts.mounts()
        assert mount.dest == kept and mount.proc.pid == pids[kept]  # adopted, not remade
        assert (kept / "a.txt").read_bytes() == b"kept"
        assert mountinfo(dropped) is None  # no longer declared: released
        wait_for(lambda: not Path(f"/proc/{pids[dropped]}").exists()
                 or "Z" in Path(f"/proc/{pids[dropped]}/stat").read_text().rpartition(")")[2][:3],
                 timeout=30)
    finally:
        stop.set()
        thread.join(30)
        second.storage.close()
        first.storage.close()
