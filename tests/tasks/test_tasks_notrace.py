"""A refused job, and every question about jobs, leave the state directory as it was:
no tasks.db, no job directory — the refusal comes before anything is created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tasks_helpers import job_doc, task


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    out = dict(os.environ)
    (tmp_path / "agent.toml").write_text("[tasks]\nmax_parallel = 1\n")
    out["GUESTAGENT_CONFIG"] = str(tmp_path / "agent.toml")
    out["GUESTAGENT_DAEMON_STATE_DIR"] = str(tmp_path / "state")
    out["GUESTAGENT_DAEMON_RUN_DIR"] = str(tmp_path / "run")
    return out


def tasks(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guestagent", "tasks", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _valid() -> str:
    return json.dumps(job_doc({"a": task("true")}))


BAD_JOBS = {
    "missing file": (None, "job.json", "No such file or directory"),
    "not json": ("{", "job.json", "not valid JSON"),
    "repeated key": ('{"Name": "a", "Name": "b"}', "job.json", "key 'Name' appears twice"),
    "string dependencies": (
        json.dumps(job_doc({"a": task("true"), "b": task("true")}, {"a": "b"})),  # type: ignore[dict-item]
        "job.json", "DAG.Dependencies.a: must be a list of task names"),
    "integer env value": (
        json.dumps(job_doc({"a": task("true", EnvVars={"N": 3})})), "job.json",
        "EnvVars.N: value must be a string, got number"),
    "bad job.cfg": ("[DEFAULT]\njob_name=x\n", "job.cfg", "no task section"),
    "binary": ("\udcff", "job.json", "not UTF-8 text (byte 0)"),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_a_refused_job_leaves_no_state(case: str, tmp_path: Path, env: dict[str, str]) -> None:
    text, name, expected = BAD_JOBS[case]
    path = tmp_path / name
    if text is not None:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    done = tasks(env, "submit", str(path), "--foreground")
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "code", "expected"), [
    (("list",), 0, ""),
    (("show", "job-0"), 1, "no job 'job-0'"),
    (("logs", "job-0", "t"), 1, "no instance 0 of task 't' in job-0"),
    (("stop", "job-0"), 1, "no job 'job-0'"),
    (("submit", "--resume", "job-0"), 2, "no job 'job-0'"),
])
def test_asking_about_jobs_creates_no_state(args: tuple[str, ...], code: int, expected: str,
                                            tmp_path: Path, env: dict[str, str]) -> None:
    done = tasks(env, *args)
    assert done.returncode == code, done.stderr
    assert expected in done.stderr and done.stdout == ""
    assert not (tmp_path / "state").exists()


def test_a_good_job_after_refusals_is_stored(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "job.json"
    path.write_text(_valid())
    done = tasks(env, "submit", str(path), "--foreground")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert (tmp_path / "state" / "tasks" / "tasks.db").exists()
    assert job_id in tasks(env, "list").stdout
