"""``tasks logs JOB TASK [INSTANCE] -f`` shows an instance's output while it runs: a line
printed before the instance waits for a gate appears before the gate exists (so before
the instance ends), for a host process and for a container on a real dockerd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import job_doc, make_scheduler, submit_doc, task

from guestagent.tasks.docker import DockerRunner
from guestagent.tasks.runner import HostRunner
from guestagent.tasks.settings import TasksSettings

# Prints, waits for a file named "go" in its work dir, prints again (and to stderr).
GATED = ("sh -c 'echo first; echo warned >&2; "
         "while [ ! -e go ]; do sleep 0.1; done; echo second'")


class Follower:
    """``tasks logs -f`` in its own process, its two streams collected as they come."""

    def __init__(self, state: Path, job_id: str, task_name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
        (state.parent / "agent.toml").write_text("[tasks]\nmax_parallel = 2\n")
        env.update(GUESTAGENT_CONFIG=str(state.parent / "agent.toml"),
                   GUESTAGENT_DAEMON_STATE_DIR=str(state),
                   GUESTAGENT_DAEMON_RUN_DIR=str(state.parent / "run"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guestagent", "tasks", "logs", job_id, task_name, "0", "-f"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _read(stream: Any, sink: list[bytes]) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line)

    def stdout(self) -> str:
        return b"".join(self.out).decode()

    def stderr(self) -> str:
        return b"".join(self.err).decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def _follow_gated_instance(tmp_path: Path, runners: dict[str, Any],
                           env: dict[str, str]) -> None:
    state = tmp_path / "state"
    sched = make_scheduler(state / "tasks", runners)
    job_id = submit_doc(sched, job_doc({"gated": task(GATED, EnvVars=env)}))
    result: list[str] = []
    runner = threading.Thread(target=lambda: result.append(sched.run(job_id)), daemon=True)
    runner.start()
    gate = sched.jobs_dir / job_id / "gated" / "0" / "workdir" / "go"
    follower = Follower(state, job_id, "gated")
    try:
        wait_for(lambda: "first\n" in follower.stdout(), timeout=120)
        # Shown while the instance still waits for its gate, i.e. before it ended.
        assert not gate.exists() and not result
        assert sched.store.instance(job_id, "gated", 0).state == "Running"
        assert "second" not in follower.stdout()
        wait_for(lambda: "warned\n" in follower.stderr(), timeout=60)
        gate.touch()
        wait_for(lambda: follower.proc.poll() is not None, timeout=120)
        assert follower.proc.returncode == 0
        assert follower.stdout() == "first\nsecond\n"
        assert follower.stderr() == "warned\n"
    finally:
        gate.touch()
        follower.close()
        runner.join(120)
    assert result == ["Finished"]


def test_follow_shows_a_host_instance_output_while_it_runs(tmp_path: Path) -> None:
    _follow_gated_instance(tmp_path, {"host": HostRunner()}, {})


@pytest.mark.slow
def test_follow_streams_a_container_output_while_it_runs(
    tmp_path: Path, docker_engine: Any, busybox_image: str
) -> None:
    runners = {"host": HostRunner(),
               "docker": DockerRunner(TasksSettings(docker_host=docker_engine.host))}
    _follow_gated_instance(tmp_path, runners, {"BATCH_COMPUTE_DOCKER_IMAGE": busybox_image})
