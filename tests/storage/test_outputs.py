"""OutputMapping uploads: streamed as files close, the end of the task sends only what
changed, a drain flushes within its deadline and says what it could not finish."""

from __future__ import annotations

import time

from polling import wait_for

from guestagent.storage.api import Storage


class Counting:
    """The real uploads, counted per key (to see what was sent twice)."""

    def __init__(self, inner):
        self.inner = inner
        self.sent: list[str] = []

    def download_file(self, src, local):
        return self.inner.download_file(src, local)

    def upload_file(self, local, dest):
        self.inner.upload_file(local, dest)
        self.sent.append(dest.key)


def keys(bucket, name):
    resp = bucket.client.list_objects_v2(Bucket=name)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_streaming_uploads_each_closed_file_and_the_end_sends_only_changes(
        bucket, agent_transfers, tmp_path):
    name = bucket()
    out = tmp_path / "out"
    out.mkdir()
    counting = Counting(agent_transfers)
    storage = Storage(counting)
    session = storage.open_output(out, f"oss://{name}/results/", streaming=True)
    (out / "part-0.csv").write_text("1,2\n")
    (out / "deep").mkdir()
    (out / "deep" / "part-1.csv").write_text("3,4\n")
    wait_for(lambda: keys(bucket, name) == ["results/deep/part-1.csv", "results/part-0.csv"],
             timeout=60, step=0.1)
    # An object is listed before its upload call returns and is counted: wait for both.
    wait_for(lambda: session.streamed == 2, timeout=30, step=0.05)
    (out / "part-0.csv").write_text("1,2\n5,6\n")  # changed after it was streamed
    (out / "late.txt").write_text("x")
    report = session.finish()
    storage.close_output(session)
    # The watcher may already have streamed late.txt and the new part-0.csv; the end sends
    # at most those two, never the unchanged part-1.csv.
    assert set(report.uploaded) <= {"late.txt", "part-0.csv"}, report.uploaded
    assert counting.sent.count("results/deep/part-1.csv") == 1
    body = bucket.client.get_object(Bucket=name, Key="results/part-0.csv")["Body"].read()
    assert body == b"1,2\n5,6\n"
    assert "results/late.txt" in keys(bucket, name)


def test_end_of_task_upload_skips_symlinks_pointing_out(bucket, agent_transfers, tmp_path):
    name = bucket()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.txt").write_text("ok")
    (out / "leak.txt").symlink_to(secret)
    (out / "leakdir").symlink_to(tmp_path)
    storage = Storage(agent_transfers)
    assert storage.upload_dir(out, f"oss://{name}/o/") == ["o/result.txt"]
    assert keys(bucket, name) == ["o/result.txt"]


def test_a_drain_flushes_pending_outputs_and_reports_what_is_left(bucket, agent_transfers,
                                                                   tmp_path):
    name = bucket()
    out = tmp_path / "out"
    out.mkdir()
    logf = tmp_path / "task.log"
    logf.write_text("log line\n")
    storage = Storage(agent_transfers)
    storage.open_output(out, f"oss://{name}/o/")
    storage.open_output(logf, f"oss://{name}/logs/", kind="log")
    for i in range(3):
        (out / f"f{i}").write_text(str(i))
    assert storage.pending_uploads() == 4
    # A deadline already passed: nothing is started, everything is reported unfinished.
    reports = storage.flush_all(deadline=time.monotonic() - 1)
    assert sorted(reports[str(out)].unfinished) == ["f0", "f1", "f2"]
    assert keys(bucket, name) == []
    reports = storage.flush_all(deadline=time.monotonic() + 60)
    assert all(r.complete for r in reports.values())
    assert keys(bucket, name) == ["logs/task.log", "o/f0", "o/f1", "o/f2"]
    assert storage.pending_uploads() == 0
    storage.close()


def test_a_failed_upload_is_reported_not_lost(bucket, agent_transfers, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("a")
    storage = Storage(agent_transfers)
    session = storage.open_output(out, "oss://no-such-bucket-xyz/o/")
    report = session.flush()
    assert list(report.failed) == ["a.txt"] and "\n" not in report.failed["a.txt"]
    assert session.pending() == ["a.txt"]  # still pending: a later flush retries it
