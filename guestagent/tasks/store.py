"""Job, task and instance states, kept in SQLite (stdlib) in the state directory.

Every state change is committed before the step it allows (an instance is claimed before
its process exists, its end is recorded before the next one is claimed), so a kill -9 at
any point leaves the last change on disk: a Running instance found at start is reconciled
with the process or container named by its ``ref`` (see ``Scheduler._adopt_running``).
Changes that belong together (an instance's end and its event) share one transaction
(:meth:`Store.batch`). WAL mode lets the CLI read while the daemon writes.

Durability: WAL with ``synchronous=NORMAL`` — a commit is a write() into the WAL, no fsync
(the WAL is synced at checkpoints). A kill -9 of the agent loses nothing: what was
written is in the kernel's page cache and SQLite recovers the WAL at the next open. Only
a crash of the whole machine (power, kernel) may roll back the last commits — and that
same crash ends every instance it ran, so the rolled-back states (Running or Waiting)
are exactly what the restarted agent reconciles anyway: a Running instance whose process
is gone is failed and retried per MaxRetryCount, like any instance lost with its
machine. An fsync per state change (FULL) would cost milliseconds per instance for no
guarantee the tests or users can tell.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestagent.tasks.errors import TaskError
from guestagent.tasks.model import Job

WAITING, RUNNING, FINISHED, FAILED, STOPPED = "Waiting", "Running", "Finished", "Failed", "Stopped"
DONE = frozenset({FINISHED, FAILED, STOPPED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, document TEXT NOT NULL,
  extra TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, started REAL, ended REAL,
  message TEXT NOT NULL DEFAULT '', stop_reason TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tasks (
  job_id TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL, started REAL, ended REAL,
  message TEXT NOT NULL DEFAULT '', PRIMARY KEY (job_id, name));
CREATE TABLE IF NOT EXISTS instances (
  job_id TEXT NOT NULL, task TEXT NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL,
  retries INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, started REAL, ended REAL,
  runner TEXT NOT NULL DEFAULT '', ref TEXT NOT NULL DEFAULT '',
  message TEXT NOT NULL DEFAULT '', PRIMARY KEY (job_id, task, idx));
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL,
  event TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS mounts (
  job_id TEXT NOT NULL, task TEXT NOT NULL, idx INTEGER NOT NULL, plans TEXT NOT NULL,
  PRIMARY KEY (job_id, task, idx));
CREATE TABLE IF NOT EXISTS grants (
  job_id TEXT NOT NULL, task TEXT NOT NULL, idx INTEGER NOT NULL, record TEXT NOT NULL,
  PRIMARY KEY (job_id, task, idx));
"""


def new_job_id() -> str:
    """``job-`` + 32 upper-case hex digits, ordered by creation time like the guide's ids."""
    return f"job-{time.time_ns():016X}{secrets.token_hex(8).upper()}"


@dataclass(frozen=True)
class Instance:
    job_id: str
    task: str
    index: int
    state: str
    retries: int
    exit_code: int | None
    started: float | None
    ended: float | None
    runner: str
    ref: str
    message: str


class Store:
    def __init__(self, path: Path | None) -> None:
        """The store at ``path``, created if absent; ``None``: an empty one in memory (what
        a read-only command sees before any job was submitted)."""
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        self._depth = 0  # nesting of open transactions (see batch)
        try:
            self._db = sqlite3.connect(":memory:" if path is None else str(path), timeout=30,
                                       check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise TaskError(f"{path}: cannot open the task state: {exc}") from None
        if path is not None:
            os.chmod(path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the changes made inside into one transaction (one commit)."""
        with self._tx():
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._depth:  # inside a batch: its commit covers this change
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # -- jobs ---------------------------------------------------------------------------

    def create(self, job_id: str, job: Job, document: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, name, state, document, extra, created) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, job.name, WAITING, json.dumps(document),
                        json.dumps(dict(extra or {})), now))
            for name, task in job.tasks.items():
                db.execute("INSERT INTO tasks (job_id, name, state) VALUES (?, ?, ?)",
                           (job_id, name, WAITING))
                db.executemany(
                    "INSERT INTO instances (job_id, task, idx, state) VALUES (?, ?, ?, ?)",
                    [(job_id, name, i, WAITING) for i in range(task.instance_count)])

    def job(self, job_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", job_id)
        if not rows:
            raise TaskError(f"no job {job_id!r}: see 'guestagent tasks list'")
        out = dict(rows[0])
        out["document"] = json.loads(out["document"])
        out["extra"] = json.loads(out["extra"])
        return out

    def jobs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows(
            "SELECT id, name, state, created, started, ended, message FROM jobs "
            "ORDER BY created")]

    def jobs_in(self, *states: str) -> list[str]:
        marks = ",".join("?" * len(states))
        return [r["id"] for r in self._rows(
            f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created", *states)]  # noqa: S608

    def set_job(self, job_id: str, state: str, message: str = "") -> None:
        self._set("jobs", "id = ?", (job_id,), state, message)

    def request_stop(self, job_id: str, reason: str) -> None:
        """Ask whoever runs the job (daemon or a foreground submit) to stop it."""
        self.job(job_id)
        with self._tx() as db:
            db.execute("UPDATE jobs SET stop_reason = ? WHERE id = ?", (reason, job_id))

    def stop_requested(self, job_id: str) -> str:
        rows = self._rows("SELECT stop_reason FROM jobs WHERE id = ?", job_id)
        return str(rows[0]["stop_reason"]) if rows else ""

    # -- tasks --------------------------------------------------------------------------

    def tasks(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {r["name"]: dict(r) for r in self._rows(
            "SELECT * FROM tasks WHERE job_id = ?", job_id)}

    def set_task(self, job_id: str, task: str, state: str, message: str = "") -> None:
        self._set("tasks", "job_id = ? AND name = ?", (job_id, task), state, message)

    def _set(self, table: str, where: str, key: tuple[Any, ...], state: str,
             message: str) -> None:
        now = time.time()
        started = now if state == RUNNING else None
        ended = now if state in DONE else None
        with self._tx() as db:
            db.execute(
                f"UPDATE {table} SET state = ?, message = ?, "  # noqa: S608 - fixed names
                "started = COALESCE(started, ?), ended = ? "
                f"WHERE {where}", (state, message, started, ended, *key))

    # -- instances ----------------------------------------------------------------------

    def instances(self, job_id: str, task: str | None = None) -> list[Instance]:
        if task is None:
            rows = self._rows("SELECT * FROM instances WHERE job_id = ? ORDER BY task, idx",
                              job_id)
        else:
            rows = self._rows("SELECT * FROM instances WHERE job_id = ? AND task = ? "
                              "ORDER BY idx", job_id, task)
        return [_instance(r) for r in rows]

    def instance(self, job_id: str, task: str, index: int) -> Instance:
        rows = self._rows("SELECT * FROM instances WHERE job_id = ? AND task = ? AND idx = ?",
                          job_id, task, index)
        if not rows:
            raise TaskError(f"no instance {index} of task {task!r} in {job_id}")
        return _instance(rows[0])

    def started(self, job_id: str, task: str, index: int, runner: str, ref: str) -> None:
        """The instance runs: its process/container ``ref`` is on disk before we wait on it."""
        with self._tx() as db:
            db.execute("UPDATE instances SET state = ?, runner = ?, ref = ?, started = ?, "
                       "ended = NULL, exit_code = NULL, message = '' "
                       "WHERE job_id = ? AND task = ? AND idx = ?",
                       (RUNNING, runner, ref, time.time(), job_id, task, index))

    def claimed(self, job_id: str, task: str, index: int) -> None:
        """Marked Running before its process exists (preparing); ``ref`` empty until then."""
        with self._tx() as db:
            db.execute("UPDATE instances SET state = ?, ref = '', started = ?, ended = NULL, "
                       "exit_code = NULL, message = '' WHERE job_id = ? AND task = ? AND idx = ?",
                       (RUNNING, time.time(), job_id, task, index))

    def ended(self, job_id: str, task: str, index: int, state: str, *,
              exit_code: int | None, message: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE instances SET state = ?, exit_code = ?, ended = ?, message = ? "
                       "WHERE job_id = ? AND task = ? AND idx = ?",
                       (state, exit_code, time.time(), message, job_id, task, index))

    def stop_waiting(self, job_id: str, task: str, indexes: list[int], message: str) -> None:
        """Instances that will not start (their task ended): Stopped, in one transaction."""
        now = time.time()
        with self._tx() as db:
            db.executemany("UPDATE instances SET state = ?, exit_code = NULL, ended = ?, "
                           "message = ? WHERE job_id = ? AND task = ? AND idx = ? "
                           "AND state = ?",
                           [(STOPPED, now, message, job_id, task, i, WAITING) for i in indexes])

    def retry(self, job_id: str, task: str, index: int, exit_code: int | None,
              message: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE instances SET state = ?, retries = retries + 1, exit_code = ?, "
                       "ref = '', message = ? WHERE job_id = ? AND task = ? AND idx = ?",
                       (WAITING, exit_code, message, job_id, task, index))

    def reset_unfinished(self, job_id: str) -> int:
        """For ``--resume``: everything not Finished waits again; returns instances reset."""
        with self._tx() as db:
            # Running ones are left alone: the scheduler re-adopts their process first.
            cur = db.execute("UPDATE instances SET state = ?, retries = 0, ref = '', "
                             "exit_code = NULL, started = NULL, ended = NULL, message = '' "
                             "WHERE job_id = ? AND state NOT IN (?, ?)",
                             (WAITING, job_id, FINISHED, RUNNING))
            db.execute("UPDATE tasks SET state = ?, ended = NULL, message = '' "
                       "WHERE job_id = ? AND state NOT IN (?, ?)",
                       (WAITING, job_id, FINISHED, RUNNING))
            db.execute("UPDATE jobs SET state = ?, ended = NULL, message = '', stop_reason = '' "
                       "WHERE id = ?", (RUNNING, job_id))
            return cur.rowcount

    # -- NAS mounts planned for an instance (source, options, destination) ---------------

    def save_mounts(self, job_id: str, task: str, index: int,
                    plans: list[dict[str, str]]) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO mounts (job_id, task, idx, plans) "
                       "VALUES (?, ?, ?, ?)", (job_id, task, index, json.dumps(plans)))

    def mounts(self, job_id: str, task: str, index: int) -> list[dict[str, str]]:
        rows = self._rows("SELECT plans FROM mounts WHERE job_id = ? AND task = ? AND idx = ?",
                          job_id, task, index)
        return list(json.loads(rows[0]["plans"])) if rows else []

    # -- task credentials (digests only: see tasks/credentials.py) -----------------------

    def save_grant(self, job_id: str, task: str, index: int, record: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO grants (job_id, task, idx, record) "
                       "VALUES (?, ?, ?, ?)", (job_id, task, index, json.dumps(dict(record))))

    def grant(self, job_id: str, task: str, index: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT record FROM grants WHERE job_id = ? AND task = ? AND idx = ?",
                          job_id, task, index)
        return dict(json.loads(rows[0]["record"])) if rows else None

    def drop_grant(self, job_id: str, task: str, index: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM grants WHERE job_id = ? AND task = ? AND idx = ?",
                       (job_id, task, index))

    # -- events -------------------------------------------------------------------------

    def add_event(self, job_id: str, event: str, body: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO events (job_id, time, event, body) VALUES (?, ?, ?, ?)",
                       (job_id, time.time(), event, json.dumps(body)))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return [{"time": r["time"], "event": r["event"], "body": json.loads(r["body"])}
                for r in self._rows("SELECT * FROM events WHERE job_id = ? ORDER BY seq",
                                    job_id)]


def _instance(row: sqlite3.Row) -> Instance:
    return Instance(row["job_id"], row["task"], row["idx"], row["state"], row["retries"],
                    row["exit_code"], row["started"], row["ended"], row["runner"], row["ref"],
                    row["message"])
