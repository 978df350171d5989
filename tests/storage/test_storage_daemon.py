"""The real daemon (no systemd) with a mount and an output directory declared in
``[storage]``, against the emulator and moto: mounted at start and readable, a killed rclone
remounted, both visible in ``guestagent status`` and ``storage mounts --json``; a kill -9 of
the agent leaves the mount to the next agent, which adopts it; a spot drain flushes what is
pending, unmounts lazily and leaves nothing behind (no rclone, no mount)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from guestagent.daemon.localrun import AgentProcess, local_config
from guestagent.drain import load_report
from guestagent.localcloud.oss import free_port
from guestagent.storage.mounts import mountinfo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("rclone") is None or not Path("/dev/fuse").exists() or os.geteuid() != 0,
        reason="needs rclone, /dev/fuse and root",
    ),
]


@pytest.fixture
def agent(emulator: Any, s3: Any, bucket: Any, tmp_path: Path) -> Any:
    """``start()`` a daemon whose [storage] mounts oss://<bucket>/in/ at <tmp>/mnt/in and
    uploads <tmp>/out/ to oss://<bucket>/out/."""
    name = bucket({"in/data.txt": b"input for the task\n", "in/sub/b.bin": b"\x00\x01"})
    wd = tmp_path / "agent"
    cfg = local_config(emulator.url, wd)
    cfg["daemon"].update(stop_timeout=15.0, restart_backoff=0.1)
    cfg["spot"].update(poll_interval=0.2, deadline_margin=1.0, hook_timeout=2.0)
    cfg["credentials"]["tcp_port"] = free_port()  # rclone is told this port: fixed
    cfg["userdata"] = {"enabled": False}
    cfg["tasks"] = {"enabled": False}
    cfg["storage"] = {"endpoint": s3.url, "path_style": True, "region": "us-east-1",
                      "mounts": [f"oss://{name}/in/:{tmp_path / 'mnt' / 'in'}"],
                      "outputs": [f"{tmp_path / 'out'}/:oss://{name}/out/"],
                      "mount_check_interval": 0.5, "mount_ready_timeout": 60.0}
    made: list[AgentProcess] = []

    admin = bucket.client

    class Agents:
        bucket = name
        client = admin
        dest = tmp_path / "mnt" / "in"
        out = tmp_path / "out"
        config = cfg

        def start(self) -> AgentProcess:
            proc = AgentProcess(cfg, wd).start(wait=60.0)
            made.append(proc)
            return proc

    yield Agents()
    for proc in made:
        proc.stop(timeout=30)
    # Whatever a failed test left: our rclone (its command line names our private
    # directory) and our mount.
    for pid in rclone_pids(tmp_path / "mnt" / "in"):
        os.kill(pid, signal.SIGKILL)
    if mountinfo(tmp_path / "mnt" / "in") is not None:
        subprocess.run(["umount", "-l", str(tmp_path / "mnt" / "in")], check=False)


def mount_row(agent: AgentProcess, dest: Path) -> dict[str, Any]:
    rows = agent.status()["storage"]["mounts"]
    return next((r for r in rows if r["dest"] == str(dest)), {})


def healthy_row(agent: AgentProcess, dest: Path, timeout: float = 90) -> dict[str, Any]:
    row: dict[str, Any] = wait_for(lambda: (r := mount_row(agent, dest)).get("health") == "ok"
                                   and r, timeout=timeout, step=0.2)
    return row


def rclone_pids(dest: Path) -> set[int]:
    """rclone processes whose command line names ``dest`` (ours: the path is private)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"rclone") and str(dest).encode() in argv:
            found.add(int(entry.name))
    return found


def cli_mounts(agent: AgentProcess) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "guestagent", "--config", str(agent.config_path),
                          "storage", "mounts", "--json"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode in (0, 1), out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_declared_mount_is_made_healed_reported_and_drained(agent: Any, emulator: Any) -> None:
    daemon = agent.start()
    row = healthy_row(daemon, agent.dest)
    assert mountinfo(agent.dest) == "fuse.rclone" and row["origin"] == "settings"
    assert (agent.dest / "data.txt").read_bytes() == b"input for the task\n"
    assert (agent.dest / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    first = row["pid"]
    assert rclone_pids(agent.dest) == {first}

    # The CLI sees the daemon's mount, with its health.
    (listed,) = [r for r in cli_mounts(daemon)["mounts"] if r["dest"] == str(agent.dest)]
    assert listed["health"] == "ok" and listed["pid"] == first

    # rclone killed: the daemon remounts it within seconds, and says so.
    os.killpg(first, signal.SIGKILL)
    row = wait_for(lambda: (r := mount_row(daemon, agent.dest)).get("health") == "ok"
                   and r.get("pid") != first and r, timeout=60, step=0.2)
    assert row["remounts"] == 1 and rclone_pids(agent.dest) == {row["pid"]}
    assert (agent.dest / "data.txt").read_bytes() == b"input for the task\n"
    status = daemon.status()
    (svc,) = [s for s in status["services"] if s["name"] == "storage"]
    assert svc["healthy"] and "1/1 mount(s) ok" in svc["summary"]

    # Outputs: a closed file is streamed at once; one still being written is pending.
    (agent.out / "done.txt").write_text("finished early\n")
    wait_for(lambda: agent.client.list_objects_v2(Bucket=agent.bucket, Prefix="out/done.txt")
             .get("KeyCount") == 1, timeout=60, step=0.3)
    with open(agent.out / "partial.log", "w") as writer:
        writer.write("written before the notice\n")
        writer.flush()
        wait_for(lambda: daemon.status()["storage"]["pending_uploads"] == 1, timeout=30)

        # Spot notice: the drain flushes it, unmounts lazily, ends rclone; the agent exits 0.
        emulator.schedule_termination(0, 30)
        assert daemon.wait(60) == 0
    body = agent.client.get_object(Bucket=agent.bucket, Key="out/partial.log")["Body"].read()
    assert body == b"written before the notice\n"
    report = load_report(daemon.state_dir)
    assert report is not None and report["completed"], report
    assert mountinfo(agent.dest) is None
    assert agent.dest.as_posix() not in Path("/proc/mounts").read_text()
    wait_for(lambda: not rclone_pids(agent.dest), timeout=30)
    run = Path(agent.config["daemon"]["run_dir"]) / "storage"
    assert not list((run / "mounts").glob("*.json"))
    assert not list((run / "detached").glob("*"))


def test_kill_9_leaves_the_mount_to_the_next_agent_and_a_stop_unmounts(agent: Any) -> None:
    first = agent.start()
    pid = healthy_row(first, agent.dest)["pid"]
    # A reader inside the mount (a task's working directory) across the agent's death.
    reader = subprocess.Popen(["sleep", "600"], cwd=agent.dest)
    try:
        first.kill()  # SIGKILL: no drain, no stop code
        assert mountinfo(agent.dest) == "fuse.rclone" and rclone_pids(agent.dest) == {pid}
        assert sorted(os.listdir(f"/proc/{reader.pid}/cwd")) == ["data.txt", "sub"]

        second = agent.start()
        row = healthy_row(second, agent.dest)
        # Adopted: the same rclone, not a second mount.
        assert row["pid"] == pid and row["remounts"] == 0
        assert rclone_pids(agent.dest) == {pid}
        assert "adopted mount" in second.log()
        assert Path(f"/proc/{reader.pid}/cwd/data.txt").read_bytes() == b"input for the task\n"

        # A clean stop (SIGTERM, no systemd): lazy unmount, rclone ended.
        assert second.stop(timeout=30) == 0
        assert mountinfo(agent.dest) is None
        wait_for(lambda: not rclone_pids(agent.dest), timeout=30)
    finally:
        reader.kill()
        reader.wait()


def foreground_submit(agent: AgentProcess, tmp_path: Path, inputs: dict[str, str],
                      command: str) -> subprocess.Popen[str]:
    """``tasks submit --foreground`` of a one-task job in a process of its own, with the
    daemon's settings (so the same run dir, credential server and mount counts)."""
    job = tmp_path / f"job-{len(list(tmp_path.glob('job-*.json')))}.json"
    job.write_text(json.dumps({"Name": "shared", "Type": "DAG", "DAG": {"Dependencies": {},
                   "Tasks": {"t": {"InputMapping": inputs,
                                   "Parameters": {"Command": {"CommandLine": command}}}}}}))
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "guestagent", "--config",
                             str(agent.config_path), "tasks", "submit", "--foreground",
                             str(job)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_foreground_task_shares_the_daemons_mount_both_ways(agent: Any,
                                                                tmp_path: Path) -> None:
    daemon = agent.start()
    pid = healthy_row(daemon, agent.dest)["pid"]
    shared = {f"oss://{agent.bucket}/in/": f"{agent.dest}/"}
    out, gate = tmp_path / "task-out", tmp_path / "gate"
    out.mkdir()

    # A task reading the daemon's mount ends first: the mount stays, the same rclone.
    quick = foreground_submit(daemon, tmp_path, shared, f"cp {agent.dest}/data.txt {out}/q")
    stdout, stderr = quick.communicate(timeout=180)
    assert quick.returncode == 0, stderr
    assert (out / "q").read_text() == "input for the task\n"
    row = mount_row(daemon, agent.dest)
    assert row["health"] == "ok" and row["pid"] == pid and row["users"] == ["settings"]
    assert rclone_pids(agent.dest) == {pid}

    # Another source at the daemon's directory: refused, naming both; the mount untouched.
    other = foreground_submit(daemon, tmp_path, {f"oss://{agent.bucket}/": f"{agent.dest}/"},
                              "true")
    stdout, stderr = other.communicate(timeout=180)
    assert other.returncode != 0
    job_id = stdout.strip()
    assert f"is in use by settings with oss://{agent.bucket}/in/" in stderr, stderr
    assert f"{job_id}.t.inputs wants oss://{agent.bucket}/ " in stderr, stderr
    assert mount_row(daemon, agent.dest)["pid"] == pid

    # The daemon stops (its drain unmounts what it alone uses) while a task still reads:
    # the mount stays for the task, and the task's end unmounts it.
    reader = foreground_submit(
        daemon, tmp_path, shared,
        f"sh -c 'cat {agent.dest}/data.txt > {out}/before; while [ ! -e {gate} ]; "
        f"do sleep 0.05; done; cat {agent.dest}/sub/b.bin > {out}/after'")
    try:
        wait_for((out / "before").exists, timeout=180)
        wait_for(lambda: len(mount_row(daemon, agent.dest).get("users", [])) == 2, timeout=60)
        assert daemon.stop(timeout=30) == 0
        assert mountinfo(agent.dest) == "fuse.rclone" and rclone_pids(agent.dest) == {pid}
    finally:
        gate.touch()
    stdout, stderr = reader.communicate(timeout=180)
    assert reader.returncode == 0, stderr
    assert (out / "after").read_bytes() == b"\x00\x01"
    assert mountinfo(agent.dest) is None
    wait_for(lambda: not rclone_pids(agent.dest), timeout=30)
