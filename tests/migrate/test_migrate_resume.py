"""Interruptions: kill -9 in the middle of the 1 GB file (real bytes) and a rerun that sends
only what had not arrived; an SSH connection cut mid-transfer, retried within the run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mig_fixtures import SECRET, Cloud, make_config, migrate_argv, migrate_env, run_migrate
from mig_tree import BIG, build_tree, write
from polling import wait_for

from guestagent.migrate.transfer import PARTIAL_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def _receiving(cloud: Cloud, rel_dir: str, name: str, at_least: int) -> Path | None:
    """rsync's temporary file of ``name`` on the instance, once it holds ``at_least`` bytes."""
    for inst in cloud.api.cloud.instances.values():
        folder = inst.root / rel_dir
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if entry.name.startswith(f".{name}.") and entry.stat().st_size >= at_least:
                    return entry
    return None


def _status_progress(config: Path) -> str | None:
    out = subprocess.run([sys.executable, "-m", "guestagent", "migrate", "status", "--config",
                          str(config)], capture_output=True, text=True, timeout=60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("progress: ")), None)
    return line


def _state(config: Path) -> dict[str, object]:
    return json.loads((config.parent / "client_data").read_text())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_kill_9_mid_big_file_then_rerun_sends_only_the_rest(ecs: Cloud, tmp_path: Path) -> None:
    server = build_tree(tmp_path / "server", big="real")
    # A limit keeps the kill inside the file even on an idle machine (~60 MB/s).
    config = make_config(tmp_path, bandwidth_limit=60000)
    proc = subprocess.Popen(migrate_argv(config, server), env=migrate_env(ecs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _receiving(ecs, "var", "big.img", 300 * 2**20), timeout=600, step=0.05)
        rsync_pid = int(_state(config)["rsync_pid"])  # type: ignore[call-overload]
        # Neither the secret nor the one-time SSH key is on any command line (ps).
        key = (config.parent / "client_keys/id_instance").read_text().splitlines()[1]
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                text = cmdline.read_bytes().decode(errors="replace")
                assert SECRET not in text and key not in text, cmdline
        # The machine loses power: the client and its rsync+ssh die at once, no cleanup.
        os.kill(proc.pid, signal.SIGKILL)
        os.killpg(rsync_pid, signal.SIGKILL)
    finally:
        proc.wait(60)
    inst = next(iter(ecs.api.cloud.instances.values()))
    kept = inst.root / "var" / PARTIAL_DIR / "big.img"
    wait_for(kept.exists, timeout=60)  # the receiver kept what had arrived
    arrived = kept.stat().st_size
    assert 300 * 2**20 <= arrived < BIG
    state = _state(config)
    assert state["current"] == "transfer:system" and state["result"] == "running"

    out = run_migrate(ecs, config, server)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().splitlines()[-1] == "Goto Aliyun Finished!"
    sent = _state(config)["transfers"]["transfer:system"]  # type: ignore[index]
    # Bytes already there were matched, not sent again: the data sent on the rerun is the
    # rest of the big file plus the small files, well under the whole.
    print(f"\nkilled with {arrived / 2**20:.0f} MiB of the 1024 MiB file on the instance; "
          f"rerun sent {sent['literal'] / 2**20:.0f} MiB of data, matched "
          f"{sent['matched'] / 2**20:.0f} MiB already there")
    assert sent["matched"] >= arrived - 2**20
    others = sum(p.stat().st_size for p in server.rglob("*")
                 if p.is_file() and not p.is_symlink() and p.name != "big.img")
    assert sent["literal"] <= BIG - arrived + others + 2**20
    image = next(i for i in ecs.api.cloud.image_records())
    received = Path(str(image["Path"])) / "system/var/big.img"
    assert _sha256(received) == _sha256(server / "var/big.img")


@pytest.mark.slow
def test_ssh_connection_cut_mid_transfer_is_retried(ecs: Cloud, tmp_path: Path) -> None:
    server = build_tree(tmp_path / "server", big="none")
    write(server / "srv/payload.bin", os.urandom(40 * 2**20))
    config = make_config(tmp_path, bandwidth_limit=4000)  # ~10 s for the payload
    proc = subprocess.Popen(migrate_argv(config, server), env=migrate_env(ecs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _receiving(ecs, "srv", "payload.bin", 4 * 2**20), timeout=300)
        # `migrate status` shows the transfer's progress while it runs.
        status = wait_for(lambda: _status_progress(config), timeout=60)
        assert "transfer:system" in status
        host = next(iter(ecs.api.cloud.instances.values())).host
        assert host.cut_connections() > 0
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "transfer:system: connection lost (rsync exit" in out
    assert out.rstrip().splitlines()[-1] == "Goto Aliyun Finished!"
    sent = _state(config)["transfers"]["transfer:system"]  # type: ignore[index]
    assert sent["attempts"] == 2
    image = next(i for i in ecs.api.cloud.image_records())
    received = Path(str(image["Path"])) / "system/srv/payload.bin"
    assert received.read_bytes() == (server / "srv/payload.bin").read_bytes()
