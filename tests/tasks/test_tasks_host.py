"""Host mode: the DAG, instances in parallel, env contract, retries, timeouts, stop."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from polling import wait_for
from tasks_helpers import job_doc, make_scheduler, submit_doc, task


def test_dag_runs_in_order_with_the_guide_environment(tmp_path: Path) -> None:
    sched = make_scheduler(tmp_path / "state")
    out = tmp_path / "out"
    out.mkdir()
    dump = ("python3 -c \"import json, os, sys; "
            "open(os.environ['OUT'] + '/' + os.environ['BATCH_COMPUTE_DAG_TASK_ID'] + "
            "os.environ['BATCH_COMPUTE_DAG_INSTANCE_ID'], 'w').write(json.dumps("
            "{k: v for k, v in os.environ.items()} | {'cwd': os.getcwd(), "
            "'seen': sorted(os.listdir(os.environ['OUT']))}))\"")
    doc = job_doc(
        {"split": task(dump, EnvVars={"OUT": str(out), "k1": "v1"}),
         "count": task(dump, InstanceCount=3, EnvVars={"OUT": str(out)}),
         "merge": task(dump, EnvVars={"OUT": str(out)})},
        {"split": ["count"], "count": ["merge"]},
    )
    job_id = submit_doc(sched, doc)
    assert job_id.startswith("job-") and len(job_id) == 36
    assert sched.run(job_id) == "Finished"
    split = json.loads((out / "split0").read_text())
    assert split["BATCH_COMPUTE_DAG_JOB_ID"] == job_id
    assert split["BATCH_COMPUTE_DAG_INSTANCE_ID"] == "0"
    assert split["BATCH_COMPUTE_OSS_HOST"] == "oss-cn-hangzhou-internal.aliyuncs.com"
    assert split["BATCH_COMPUTE_REGION"] == "cn-hangzhou"
    assert split["BATCH_COMPUTE_CLUSTER_ID"] == "local"
    assert split["BATCH_COMPUTE_WORKER_ID"] == "i-test"
    assert split["k1"] == "v1"
    assert split["cwd"] == split["PWD"]
    ids = sorted(json.loads((out / f"count{i}").read_text())["BATCH_COMPUTE_DAG_INSTANCE_ID"]
                 for i in range(3))
    assert ids == ["0", "1", "2"]
    # merge started only after every count instance had written its file.
    seen = json.loads((out / "merge0").read_text())["seen"]
    assert {"split0", "count0", "count1", "count2"} <= set(seen)
    states = {(i.task, i.index): (i.state, i.exit_code) for i in sched.store.instances(job_id)}
    assert set(states.values()) == {("Finished", 0)}
    events = [e["event"] for e in sched.store.events(job_id)]
    assert events[:2] == ["OnJobWaiting", "OnJobRunning"] and events[-1] == "OnJobFinished"
    assert events.count("OnInstanceFinished") == 5


def test_retries_then_success_and_exit_codes(tmp_path: Path) -> None:
    sched = make_scheduler(tmp_path / "state")
    marker = tmp_path / "tries"
    # Fails twice, then succeeds.
    cmd = (f"sh -c 'echo x >> {marker}; test $(wc -l < {marker}) -ge 3 || exit 7'")
    job_id = submit_doc(sched, job_doc({"flaky": task(cmd, MaxRetryCount=2)}))
    assert sched.run(job_id) == "Finished"
    (inst,) = sched.store.instances(job_id)
    assert (inst.state, inst.retries, inst.exit_code) == ("Finished", 2, 0)
    assert len(marker.read_text().splitlines()) == 3


def test_failure_beyond_retries_fails_the_job_and_stops_successors(tmp_path: Path) -> None:
    sched = make_scheduler(tmp_path / "state")
    after = tmp_path / "after-ran"
    job_id = submit_doc(sched, job_doc(
        {"bad": task("sh -c 'echo oops >&2; exit 3'", MaxRetryCount=1),
         "after": task(f"touch {after}")}, {"bad": ["after"]}))
    assert sched.run(job_id) == "Failed"
    bad = sched.store.instance(job_id, "bad", 0)
    assert (bad.state, bad.retries, bad.exit_code) == ("Failed", 1, 3)
    assert not after.exists()
    tasks = sched.store.tasks(job_id)
    assert tasks["bad"]["state"] == "Failed" and tasks["after"]["state"] == "Stopped"
    assert "failed" in sched.store.job(job_id)["message"]
    stderr = sched.jobs_dir / job_id / "bad" / "0" / "stderr"
    assert stderr.read_text() == "oops\n"


def test_job_fail_on_instance_fail_false_lets_the_dag_go_on(tmp_path: Path) -> None:
    sched = make_scheduler(tmp_path / "state")
    after = tmp_path / "after-ran"
    job_id = submit_doc(sched, job_doc(
        {"some": task("sh -c 'exit $BATCH_COMPUTE_DAG_INSTANCE_ID'", InstanceCount=2),
         "after": task(f"touch {after}")}, {"some": ["after"]},
        JobFailOnInstanceFail=False))
    assert sched.run(job_id) == "Finished"
    assert after.exists()
    codes = [(i.state, i.exit_code) for i in sched.store.instances(job_id, "some")]
    assert codes == [("Finished", 0), ("Failed", 1)]


def test_timeout_kills_a_command_that_ignores_sigterm(tmp_path: Path) -> None:
    sched = make_scheduler(tmp_path / "state", kill_grace=1.0)
    started = tmp_path / "started"
    cmd = f"sh -c 'trap \"\" TERM; touch {started}; while :; do sleep 0.1; done'"
    job_id = submit_doc(sched, job_doc({"stubborn": task(cmd, Timeout=2)}))
    assert sched.run(job_id) == "Failed"
    inst = sched.store.instance(job_id, "stubborn", 0)
    assert inst.state == "Failed" and "timed out after 2s" in inst.message
    assert inst.exit_code == 137  # SIGKILL after the grace
    assert started.exists()


def test_stop_ends_running_instances_as_stopped(tmp_path: Path) -> None:
    sched = make_scheduler(tmp_path / "state")
    started = tmp_path / "started"
    job_id = submit_doc(sched, job_doc(
        {"long": task(f"sh -c 'touch {started}; sleep 60'"), "next": task("true")},
        {"long": ["next"]}))
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(sched.run(job_id)))
    thread.start()
    wait_for(started.exists, timeout=30)
    assert sched.stop(job_id, "stopped by the user")
    thread.join(30)
    assert result == ["Stopped"]
    assert sched.store.instance(job_id, "long", 0).state == "Stopped"
    assert sched.store.tasks(job_id)["next"]["state"] == "Stopped"
    assert sched.store.job(job_id)["message"] == "stopped by the user"


def test_restart_with_a_smaller_limit_adopts_every_running_instance(tmp_path: Path) -> None:
    # Two instances run at the limit of 2; the agent goes away (detach, as a restart does)
    # and comes back with a limit of 1: both are adopted (one beyond the limit), each
    # counted once, and the job finishes; a third instance starts only after them.
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    cmd = (f"sh -c 'echo $BATCH_COMPUTE_DAG_INSTANCE_ID >> {runs}; "
           f"while [ ! -e {gate} ]; do sleep 0.05; done'")
    first = make_scheduler(tmp_path / "state", max_parallel=2)
    job_id = submit_doc(first, job_doc({"t": task(cmd, InstanceCount=3)}))
    thread = threading.Thread(target=first.run, args=(job_id,), daemon=True)
    thread.start()
    wait_for(lambda: runs.exists() and len(runs.read_text().split()) == 2, timeout=60)
    first.detach()
    thread.join(30)
    again = make_scheduler(tmp_path / "state", max_parallel=1)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(again.run(job_id)), daemon=True)
    thread.start()
    gate.touch()
    thread.join(120)
    assert result == ["Finished"]
    assert sorted(runs.read_text().split()) == ["0", "1", "2"]
    assert [i.retries for i in again.store.instances(job_id, "t")] == [0, 0, 0]
