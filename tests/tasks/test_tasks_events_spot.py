"""Notification events delivered to a local command and a loopback URL; a spot drain mid
task: running instances stopped, their outputs in OSS, marked Stopped; --resume reruns
only what did not finish."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from tasks_helpers import job_doc, make_scheduler, needs_fuse, submit_doc, task


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events", got
    finally:
        server.shutdown()
        server.server_close()


def test_subscribed_events_reach_command_and_url(
    tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = receiver
    sink = tmp_path / "events.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {sink}\necho >> {sink}\n")
    hook.chmod(0o755)
    sched = make_scheduler(tmp_path / "state", notify_command=str(hook), notify_url=url)
    events = ["OnJobRunning", "OnJobFailed", "OnTaskFailed", "OnInstanceRunning",
              "OnInstanceFailed"]
    job_id = submit_doc(sched, job_doc(
        {"bad": task("sh -c 'exit 5'", Parameters={
            "StdoutRedirectPath": "", "StderrRedirectPath": ""})},
        Notification={"Topic": {"Name": "t", "Endpoint": "http://mns.example/", "Events": events}},
    ))
    assert sched.run(job_id) == "Failed"
    by_command = [json.loads(line) for line in sink.read_text().splitlines() if line.strip()]
    names = [e["Event"] for e in by_command]
    assert names == ["OnJobRunning", "OnInstanceRunning", "OnInstanceFailed", "OnTaskFailed",
                     "OnJobFailed"]
    assert [e["Event"] for e in got] == names
    failed = by_command[2]
    assert failed["Category"] == "Job" and failed["JobId"] == job_id
    assert failed["Task"] == "bad" and failed["InstanceId"] == "0"
    assert failed["ExitCode"] == "5" and failed["State"] == "Failed"
    assert failed["RetryCount"] == "0" and failed["EndTime"].endswith("Z")
    job_event = by_command[-1]
    assert job_event["JobName"] == "test-job" and job_event["CreationTime"]
    # The job's event log keeps every event, subscribed or not.
    logged = [e["event"] for e in sched.store.events(job_id)]
    assert "OnTaskRunning" in logged and "OnInstanceWaiting" in logged


@pytest.mark.slow
@needs_fuse
def test_spot_drain_stops_uploads_and_resume_reruns_the_rest(
    tmp_path: Path, bucket: Any, storage: Any
) -> None:
    name = bucket()
    out = tmp_path / "out"
    # Instance 0 finishes at once; instance 1 writes its output, then runs on.
    cmd = ("sh -c 'i=$BATCH_COMPUTE_DAG_INSTANCE_ID; "
           f"echo part-$i > {out}/part-$i; "
           "test $BATCH_COMPUTE_DAG_INSTANCE_ID = 0 || test -e $MARK || sleep 300'")
    mark = tmp_path / "second-run"
    doc = job_doc({"work": task(cmd, InstanceCount=2, EnvVars={"MARK": str(mark)},
                                OutputMapping={str(out) + "/": f"oss://{name}/out/"},
                                Parameters={"StdoutRedirectPath": f"oss://{name}/logs/"})})
    sched = make_scheduler(tmp_path / "state", storage=storage, kill_grace=5.0)
    job_id = submit_doc(sched, doc)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(sched.run(job_id)))
    thread.start()
    wait_for(lambda: (out / "part-1").exists()
             and sched.store.instance(job_id, "work", 0).state == "Finished", timeout=60)
    deadline = time.monotonic() + 30
    sched.drain(deadline, "spot termination at 2026-11-21T15:00:00Z")
    thread.join(60)
    assert time.monotonic() < deadline
    assert result == ["Stopped"]
    inst = sched.store.instance(job_id, "work", 1)
    assert inst.state == "Stopped" and "spot termination" in inst.message
    keys = {o["Key"] for o in bucket.client.list_objects_v2(Bucket=name)["Contents"]}
    assert {"out/part-0", "out/part-1", f"logs/stdout.{job_id}.work.1"} <= keys

    mark.touch()
    sched.store.reset_unfinished(job_id)
    assert sched.run(job_id) == "Finished"
    runs = {i.index: (i.state, i.started) for i in sched.store.instances(job_id, "work")}
    assert runs[0][0] == runs[1][0] == "Finished"
    first = [e for e in sched.store.events(job_id) if e["event"] == "OnInstanceRunning"]
    # Instance 0 ran once, instance 1 twice (before the drain and after the resume).
    assert sorted(e["body"]["InstanceId"] for e in first) == ["0", "1", "1"]
