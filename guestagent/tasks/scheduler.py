"""Runs a job's DAG on this machine.

A task starts when all its predecessors are Finished; its instances run in parallel up to
the machine's limit (shared by every job of this scheduler); a failed attempt is retried
up to ``MaxRetryCount``; ``Timeout`` ends an attempt with SIGTERM, then SIGKILL after
``kill_grace``. Outputs and logs are uploaded when an instance ends, before it counts as
Finished. Each state change is committed before the next step, so :meth:`Scheduler.resume`
after a crash re-adopts what still runs and repeats at most the attempt that was running.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from guestagent.storage.mountrefs import MountRefs
from guestagent.tasks import staging
from guestagent.tasks.errors import TaskError
from guestagent.tasks.events import Events
from guestagent.tasks.model import Job, Task
from guestagent.tasks.runner import Handle, Launch, Runner
from guestagent.tasks.settings import TasksSettings
from guestagent.tasks.store import (
    DONE,
    FAILED,
    FINISHED,
    RUNNING,
    STOPPED,
    WAITING,
    Instance,
    Store,
)

if TYPE_CHECKING:
    from guestagent.tasks.credentials import Grant

log = logging.getLogger(__name__)

DOCKER_ENV = {"USER": "root", "PWD": staging.DOCKER_WORKDIR,
              "PATH": "/sbin:/usr/sbin:/bin:/usr/bin", "HOME": "/root"}
HOST_ENV_PASS = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TZ")

# How often a waiting DAG loop looks at the store for a stop asked by another process.
STOP_POLL = 0.5
# How long a finished job waits for the delivery of its notification events.
EVENTS_FLUSH = 15.0
# The mount user of a task's OSS inputs (job.task.inputs): never taken for an instance
# (job.task.index, the index a number), whatever the task is named.
INPUTS_USER = ".inputs"


class Minter(Protocol):
    """Task-scoped credentials (``tasks/credentials.py: TaskCredentials``)."""

    def mint(self, name: str, docker: bool) -> Grant | None: ...

    def restore(self, name: str, record: dict[str, Any]) -> bool: ...

    def revoke(self, name: str) -> None: ...


@dataclass(frozen=True)
class Identity:
    """What BATCH_COMPUTE_OSS_HOST/_REGION/_CLUSTER_ID/_WORKER_ID say on this machine."""

    oss_host: str = ""
    region: str = ""
    cluster_id: str = "local"
    worker_id: str = "local"


class _Detached(Exception):
    """The scheduler let go of a running instance (agent restart)."""


@dataclass
class _Outcome:
    task: str
    index: int
    state: str
    exit_code: int | None
    message: str = ""


@dataclass
class _JobRun:
    job_id: str
    job: Job
    stop: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    failed: str = ""  # why the job fails (it stops taking instances)
    # Everything below is changed only under ``lock``: by the driver, and by an instance
    # thread recording its outcome and taking the next ready instance itself.
    lock: threading.RLock = field(default_factory=threading.RLock)
    wake: threading.Event = field(default_factory=threading.Event)  # for the driver
    error: BaseException | None = None  # the bookkeeping failed in an instance thread
    running: int = 0  # attempts claimed and not yet recorded
    claimed: list[Instance] = field(default_factory=list)  # claimed, no thread yet
    inputs: dict[str, staging.Inputs] = field(default_factory=dict)
    # The stored states, mirrored (see "the DAG" below).
    tasks: dict[str, str] = field(default_factory=dict)
    states: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> index -> state
    retries: dict[tuple[str, int], int] = field(default_factory=dict)
    waiting: dict[str, deque[int]] = field(default_factory=dict)  # in start order
    next_stop_check: float = 0.0

    def __post_init__(self) -> None:
        self.order = self.job.order()
        self.predecessors = {name: self.job.predecessors(name) for name in self.order}


def parallel_limit(settings: TasksSettings) -> int:
    cores = settings.max_parallel or (os.cpu_count() or 1)
    available = _available_memory()
    by_memory = cores if available is None else available // (settings.instance_memory_mb << 20)
    return max(1, min(cores, int(by_memory)))


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (what psutil reports, without loading psutil
    into the idle daemon); None without /proc: cores decide."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Scheduler:
    def __init__(
        self,
        store: Store,
        settings: TasksSettings,
        jobs_dir: Path,
        runners: Mapping[str, Runner],
        *,
        identity: Identity | None = None,
        storage: Callable[[], staging.Storage] = staging.default_storage,
        minter: Minter | None = None,
        draining: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.jobs_dir = jobs_dir
        self.runners = runners
        self.identity = identity or Identity()
        self._storage_factory = storage
        self._storage: staging.Storage | None = None
        self.minter = minter
        self.events = Events(store, settings)
        self.draining = draining or threading.Event()
        self.limit = parallel_limit(settings)
        self.slots = threading.BoundedSemaphore(self.limit)
        self.grace = settings.kill_grace  # shortened by a drain
        self._runs: dict[str, _JobRun] = {}
        self._lock = threading.Lock()
        # Set when the service goes away but the agent will be back (restart): instances
        # keep running, states stay as they are, a new scheduler re-adopts them.
        self._detached = threading.Event()
        self._starting = 0  # attempts between their start and their recorded ref
        self._starting_done = threading.Condition()
        # Host-wide counts of the NAS mounts instances share, when the storage facade
        # keeps none (no OSS mounts configured); else the facade's, shared with OSS mounts.
        self.mount_refs = MountRefs(jobs_dir.parent / "mounts")

    # -- public -------------------------------------------------------------------------

    def storage(self, needed: bool) -> staging.Storage | None:
        if not needed:
            return None
        if self._storage is None:
            self._storage = self._storage_factory()
        return self._storage

    def _refs(self, storage: staging.Storage | None) -> MountRefs:
        refs = getattr(storage, "refs", None)
        return refs if isinstance(refs, MountRefs) else self.mount_refs

    def run(self, job_id: str) -> str:
        """Run (or go on running) the job to its end; its final state."""
        row = self.store.job(job_id)
        if row["state"] in DONE:
            return str(row["state"])
        job = Job.parse(row["document"], max_timeout=self.settings.max_timeout)
        run = _JobRun(job_id, job)
        with self._lock:
            if job_id in self._runs:
                raise TaskError(f"{job_id} is already running")
            self._runs[job_id] = run
        try:
            self._prune_for(job)
            return self._drive(run, row["state"])
        finally:
            # A restart leaves the input mounts to the instances still reading them: the
            # next agent adopts them by their records (same rclone, no remount).
            for inputs in run.inputs.values() if not self._detached.is_set() else ():
                inputs.release()
            if not self._detached.is_set() and not self.events.flush(EVENTS_FLUSH):
                log.warning("%s: notification events still undelivered after %ss", job_id,
                            EVENTS_FLUSH)
            with self._lock:
                self._runs.pop(job_id, None)

    def _prune_for(self, job: Job) -> None:
        """Prune before any instance thread runs (one could be between two states), with
        the storage facade built first when the job mounts, so its counts are pruned too."""
        if any(staging.needs_storage(t) or t.input_mapping or t.mounts
               for t in job.tasks.values()):
            try:
                self.storage(True)
            except Exception as exc:  # said again, as the task's error, where it is used
                log.warning("storage not available to prune mounts: %s", exc)
        self.prune_mounts()

    def prune_mounts(self) -> list[str]:
        """Count out of the shared mounts every user whose instance no longer runs (it
        ended while no agent watched it, or its record outlived a crash); the last one
        out unmounts. An instance still Running is left to whoever adopts it."""
        dropped: list[str] = []
        for refs in {self.mount_refs, self._refs(self._storage)}:
            dropped += refs.prune(self._still_running,
                                  partial(staging.unmount_record, refs.folder))
        return dropped

    def _still_running(self, user: str) -> bool:
        """Whether a task user (``job.task.index``: an instance's NAS mounts;
        ``job.task.inputs``: a task's OSS inputs) still runs. Other users (the daemon's,
        the CLI's, another process's) are not the store's to judge: kept."""
        if not user.startswith("job-"):
            return True
        job_id, _, rest = user.partition(".")
        try:
            if rest.endswith(INPUTS_USER):
                task = rest.removesuffix(INPUTS_USER)
                return str(self.store.tasks(job_id)[task]["state"]) == RUNNING
            task, _, index = rest.rpartition(".")
            return self.store.instance(job_id, task, int(index)).state == RUNNING
        except (TaskError, ValueError, KeyError):
            return False

    def stop(self, job_id: str, reason: str = "stopped by the user") -> bool:
        """Ask a running job to stop; False when this scheduler does not run it."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is None:
            return False
        run.reason = reason
        run.stop.set()
        run.wake.set()
        return True

    def detach(self, timeout: float = 10.0) -> None:
        """Leave every job as it is (for a restart); their threads end soon. Waits (up to
        ``timeout``) for instances being started to have their process recorded, so the
        next agent finds them by their ref, never half-started."""
        self._detached.set()
        self._wake_all()
        leave = getattr(self._storage, "leave", None)
        if leave is not None:  # its mounts stay for their instances, supervised by the next
            leave()
        with self._starting_done:
            self._starting_done.wait_for(lambda: self._starting == 0, timeout)

    @contextmanager
    def _starting_one(self) -> Iterator[None]:
        with self._starting_done:
            self._starting += 1
        try:
            yield
        finally:
            with self._starting_done:
                self._starting -= 1
                self._starting_done.notify_all()

    def _wake_all(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.wake.set()

    def stop_all(self, reason: str) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.reason = reason
            run.stop.set()
            run.wake.set()

    def drain(self, deadline: float, reason: str) -> None:
        """Stop every job by ``deadline`` (a monotonic time): no new instance starts,
        running ones get SIGTERM (SIGKILL after a grace that fits the deadline), their
        outputs and logs are uploaded and they end Stopped with ``reason``."""
        left = deadline - time.monotonic()
        self.grace = max(0.5, min(self.settings.kill_grace, left / 3))
        self.stop_all(reason)
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)

    def active(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    # -- the DAG ------------------------------------------------------------------------
    #
    # While a job runs, this scheduler is the only writer of its task and instance states:
    # every change is committed to the store (the record a restart resumes from) and
    # mirrored in the _JobRun, so the loop decides what to start next without reading
    # SQLite again (re-reading a 1,000-instance job after each end cost milliseconds).

    def _drive(self, run: _JobRun, state: str) -> str:
        subscribed = run.job.notification.events
        if state == WAITING:
            self.events.job(run.job_id, subscribed, WAITING)
            self.store.set_job(run.job_id, RUNNING)
            self.events.job(run.job_id, subscribed, RUNNING)
            tasks = self.store.tasks(run.job_id)
            for name in run.order:
                if tasks[name]["state"] == WAITING:
                    self.events.task(run.job_id, subscribed, name, WAITING)
        with run.lock:
            self._adopt_running(run, self._load(run))
        # The driver only starts what is ready and notices the end (or a stop asked by
        # another process): an instance thread records its own outcome and goes on with
        # the next ready instance, so no hand-over between threads sits between one
        # instance's end and the next one's start.
        while True:
            if self._detached.is_set():
                return RUNNING
            run.wake.clear()
            with run.lock:
                if run.error is not None:
                    raise run.error
                self._step(run)
                self._start_claimed(run)
                if run.running == 0 and (run.stop.is_set() or self._all_done(run)):
                    break
            run.wake.wait(STOP_POLL)
        with run.lock:
            return self._finish(run, run.failed)

    def _step(self, run: _JobRun) -> None:
        """Claim whatever may start now (into ``run.claimed``), or stop taking any."""
        self._check_stop_request(run)
        if run.stop.is_set() or self.draining.is_set():
            run.reason = run.reason or "the instance is draining"
            run.stop.set()
        elif not run.failed:
            run.failed = self._start_ready(run)
        if run.failed and not run.stop.is_set():
            run.reason = run.failed
            run.stop.set()

    def _load(self, run: _JobRun) -> list[Instance]:
        """Mirror the stored states in ``run``; the instances left Running."""
        run.tasks = {name: row["state"] for name, row in self.store.tasks(run.job_id).items()}
        running = []
        for inst in self.store.instances(run.job_id):
            run.states.setdefault(inst.task, {})[inst.index] = inst.state
            run.retries[(inst.task, inst.index)] = inst.retries
            if inst.state == WAITING:
                run.waiting.setdefault(inst.task, deque()).append(inst.index)
            elif inst.state == RUNNING:
                running.append(inst)
        return running

    def _check_stop_request(self, run: _JobRun) -> None:
        """A ``tasks stop`` from another process is a row in the store: read it at most
        every STOP_POLL seconds, not at each instance's end."""
        now = time.monotonic()
        if run.stop.is_set() or now < run.next_stop_check:
            return
        run.next_stop_check = now + STOP_POLL
        requested = self.store.stop_requested(run.job_id)
        if requested:
            run.reason = requested
            run.stop.set()

    def _all_done(self, run: _JobRun) -> bool:
        return all(state in DONE for state in run.tasks.values())

    def _start_ready(self, run: _JobRun) -> str:
        """Start waiting instances of every task whose predecessors finished; a failure
        message when the job must fail now."""
        for name in run.order:
            state = run.tasks[name]
            if state in DONE:
                continue
            preds = [run.tasks[p] for p in run.predecessors[name]]
            if state == WAITING and any(p in (FAILED, STOPPED) for p in preds):
                self._end_task(run, name, STOPPED, "a predecessor did not finish")
                continue
            if state == WAITING and all(p == FINISHED for p in preds):
                message = self._open_task(run, name)
                if message:
                    return message
                state = RUNNING
            if state == RUNNING:
                self._launch_waiting(run, name)
        return ""

    def _set_task(self, run: _JobRun, name: str, state: str, message: str = "") -> None:
        self.store.set_task(run.job_id, name, state, message)
        run.tasks[name] = state

    def _open_task(self, run: _JobRun, name: str) -> str:
        task = run.job.tasks[name]
        try:
            storage = self.storage(bool(task.input_mapping)
                                   or any(not m.is_nas for m in task.mounts))
            run.inputs[name] = staging.Inputs(self._job_dir(run), task, storage,
                                              self._docker(task),
                                              f"{run.job_id}.{name}{INPUTS_USER}")
        except Exception as exc:
            self._end_task(run, name, FAILED, f"inputs: {exc}")
            return f"task {name}: inputs could not be mapped: {exc}"
        self._set_task(run, name, RUNNING)
        subscribed = run.job.notification.events
        self.events.task(run.job_id, subscribed, name, RUNNING)
        with self.store.batch():
            for index in run.waiting.get(name, ()):
                self.events.instance(run.job_id, subscribed, name, index,
                                     redirects=self._redirects(run, name, index))
        return ""

    def _launch_waiting(self, run: _JobRun, name: str) -> None:
        with self.store.batch():  # the claims, in one commit before any process starts
            self._claim(run, name)

    def _claim(self, run: _JobRun, name: str) -> None:
        waiting = run.waiting.get(name)
        while waiting and not run.stop.is_set():
            if not self.slots.acquire(timeout=0):
                return
            index = waiting.popleft()
            # No trace of an earlier attempt may pass for this one's after a crash.
            shutil.rmtree(self._job_dir(run) / name / str(index) / "run", ignore_errors=True)
            self.store.claimed(run.job_id, name, index)
            run.states[name][index] = RUNNING
            run.running += 1
            run.claimed.append(Instance(run.job_id, name, index, RUNNING,
                                        run.retries[(name, index)], None, None, None, "",
                                        "", ""))

    def _adopt_running(self, run: _JobRun, running: list[Instance]) -> None:
        """After a restart: instances still marked Running get their process back."""
        for inst in running:
            if run.tasks[inst.task] == RUNNING and inst.task not in run.inputs:
                self._open_task(run, inst.task)
            # Never a blocking acquire here: the job's lock is held, and an instance thread
            # gives its slot back under that lock. An instance already running is adopted
            # even beyond the limit (a smaller max_parallel after the restart): it holds
            # no slot then, and new ones wait until the count is below the limit again.
            held = self.slots.acquire(timeout=0)
            if not held:
                log.info("%s: %s.%s adopted beyond the parallel limit", run.job_id, inst.task,
                         inst.index)
            run.running += 1
            self._spawn_thread(run, inst, adopt=inst, held=held)

    def _start_claimed(self, run: _JobRun) -> None:
        while run.claimed:
            self._spawn_thread(run, run.claimed.pop(0), adopt=None)

    def _spawn_thread(self, run: _JobRun, inst: Instance, adopt: Instance | None,
                      held: bool = True) -> None:
        thread = threading.Thread(target=self._instance_thread, args=(run, inst, adopt, held),
                                  name=f"task-{inst.task}-{inst.index}", daemon=True)
        thread.start()

    def _record(self, run: _JobRun, out: _Outcome) -> str:
        task = run.job.tasks[out.task]
        key = (out.task, out.index)
        retries = run.retries[key]
        subscribed = run.job.notification.events
        if out.state == FAILED and retries < task.max_retry_count and not run.stop.is_set():
            log.info("%s %s.%s failed (%s): retry %s of %s", run.job_id, out.task, out.index,
                     out.message, retries + 1, task.max_retry_count)
            with self.store.batch():
                self.store.retry(run.job_id, out.task, out.index, out.exit_code, out.message)
                self.events.instance(run.job_id, subscribed, out.task, out.index,
                                     redirects=self._redirects(run, out.task, out.index),
                                     error=out.message)
            run.retries[key] = retries + 1
            run.states[out.task][out.index] = WAITING
            run.waiting.setdefault(out.task, deque()).append(out.index)
            return ""
        with self.store.batch():
            self.store.ended(run.job_id, out.task, out.index, out.state,
                             exit_code=out.exit_code, message=out.message)
            self.events.instance(run.job_id, subscribed, out.task, out.index,
                                 redirects=self._redirects(run, out.task, out.index))
        run.states[out.task][out.index] = out.state
        failed = ""
        if out.state == FAILED and run.job.job_fail_on_instance_fail:
            failed = f"instance {out.index} of task {out.task} failed: {out.message}"
        self._maybe_end_task(run, out.task)
        return failed

    def _maybe_end_task(self, run: _JobRun, name: str) -> None:
        if run.waiting.get(name):
            return
        states = set(run.states.get(name, {}).values())
        if not states <= DONE:
            return
        if STOPPED in states:
            state = STOPPED
        elif FAILED in states and run.job.job_fail_on_instance_fail:
            state = FAILED
        else:
            state = FINISHED
        self._end_task(run, name, state, "")

    def _end_task(self, run: _JobRun, name: str, state: str, message: str) -> None:
        inputs = run.inputs.pop(name, None)
        if inputs is not None:
            inputs.release()
        waiting = run.waiting.pop(name, deque())
        if waiting:
            self.store.stop_waiting(run.job_id, name, list(waiting),
                                    message or "not started")
            for index in waiting:
                run.states[name][index] = STOPPED
        self._set_task(run, name, state, message)
        self.events.task(run.job_id, run.job.notification.events, name, state)

    def _finish(self, run: _JobRun, failed: str) -> str:
        for name in run.order:
            if run.tasks[name] not in DONE:
                self._maybe_end_task(run, name)
                if run.tasks[name] not in DONE:
                    self._end_task(run, name, STOPPED, run.reason)
        states = set(run.tasks.values())
        if failed or FAILED in states:
            state, message = FAILED, failed or "a task failed"
        elif run.stop.is_set() and states != {FINISHED}:
            state, message = STOPPED, run.reason
        else:
            state, message = FINISHED, ""
        self.store.set_job(run.job_id, state, message)
        self.events.job(run.job_id, run.job.notification.events, state, message)
        return state

    # -- one instance -------------------------------------------------------------------

    def _docker(self, task: Task) -> bool:
        return task.docker_image is not None

    def _job_dir(self, run: _JobRun) -> Path:
        return self.jobs_dir / run.job_id

    def _redirects(self, run: _JobRun, task_name: str, index: int) -> dict[str, str]:
        task = run.job.tasks[task_name]
        out_name, err_name = staging.log_names(run.job_id, task_name, index)
        out = {}
        if task.stdout_redirect_path:
            out["stdout"] = task.stdout_redirect_path + out_name
        if task.stderr_redirect_path:
            out["stderr"] = task.stderr_redirect_path + err_name
        return out

    def _instance_thread(self, run: _JobRun, inst: Instance, adopt: Instance | None,
                         held: bool) -> None:
        """Run the attempt, record it, and go on with the next claimed instance if any."""
        current: Instance | None = inst
        while current is not None:
            try:
                outcome = self._attempt(run, current, adopt)
            except _Detached:
                if held:
                    self.slots.release()
                return
            except Exception as exc:
                log.exception("instance %s.%s of %s", current.task, current.index, run.job_id)
                outcome = _Outcome(current.task, current.index, FAILED, None,
                                   f"launcher error: {exc}")
            current, adopt = self._next_after(run, outcome, held), None
            held = True  # a claimed instance comes with its slot
        self._wake_all()  # the slot may serve another job's waiting instances

    def _next_after(self, run: _JobRun, outcome: _Outcome, held: bool) -> Instance | None:
        """Record ``outcome``; the instance this thread runs next (the others claimed now
        get threads of their own)."""
        with run.lock:
            # Released under the job's lock: the step below claims it again for this
            # thread before another instance thread of the job could.
            if held:
                self.slots.release()
            run.running -= 1
            try:
                run.failed = self._record(run, outcome) or run.failed
                if not self._detached.is_set():
                    self._step(run)
            except Exception as exc:
                log.exception("%s: recording an instance's end", run.job_id)
                run.error = run.error or exc
                run.stop.set()
            nxt = run.claimed.pop(0) if run.claimed else None
            self._start_claimed(run)
            if nxt is not None:
                threading.current_thread().name = f"task-{nxt.task}-{nxt.index}"
            elif run.running == 0 or run.stop.is_set():
                run.wake.set()
        return nxt

    def _attempt(self, run: _JobRun, inst: Instance, adopt: Instance | None) -> _Outcome:
        task = run.job.tasks[inst.task]
        docker = self._docker(task)
        runner = self.runners.get("docker" if docker else "host")
        if runner is None:
            return _Outcome(inst.task, inst.index, FAILED, None,
                            "Docker mode is not available on this machine")
        layout = staging.Layout(self._job_dir(run) / inst.task / str(inst.index))
        storage = self.storage(staging.needs_storage(task))
        name = f"{run.job_id}.{inst.task}.{inst.index}"
        env = self._env(run, task, inst.index, layout=layout, docker=docker)
        launch = self._launch(run, task, inst.index, layout=layout, env=env, docker=docker,
                              name=name)
        try:
            mounts = staging.NasMounts(layout, task, storage, docker, refs=self._refs(storage),
                                       user=name)
        except Exception as exc:  # a NAS source the storage layer refuses: one line
            return _Outcome(inst.task, inst.index, FAILED, None, f"Mounts: {exc}")
        credentialed = False
        detached = False
        try:
            started = time.time()
            handle = runner.adopt(adopt.ref, launch) if adopt is not None else None
            if adopt is not None and handle is None and adopt.ref:
                return _Outcome(inst.task, inst.index, FAILED, None,
                                "lost: its process ended while the agent was down")
            if handle is not None:
                assert adopt is not None
                started = adopt.started or started
                credentialed = self._readopted(run, adopt, handle, runner.kind, mounts)
            else:
                mounts.release()  # a stale one of an earlier attempt: never under rmtree
                staging.prepare(layout, task, storage, docker)
                try:
                    self._mount(run, inst, mounts)
                except TaskError as exc:
                    return _Outcome(inst.task, inst.index, FAILED, None, str(exc))
                with self._starting_one():
                    credentialed, launch = self._grant(run, inst, name, docker, launch)
                    handle = runner.start(launch)
                    with self.store.batch():
                        self.store.started(run.job_id, inst.task, inst.index, runner.kind,
                                           handle.ref)
                        self.events.instance(run.job_id, run.job.notification.events,
                                             inst.task, inst.index,
                                             redirects=self._redirects(run, inst.task,
                                                                       inst.index))
            state, code, message = self._watch(run, task, handle, started)
        except _Detached:
            detached = True  # the instance goes on: its credentials and mounts stay
            raise
        finally:
            if not detached:
                self._let_go(run, inst, name, mounts, credentialed)
        problems = staging.upload_results(layout, task, run.job_id, inst.index,
                                          storage=storage, docker=docker)
        if problems and state == FINISHED:
            state, message = FAILED, problems[0]
        return _Outcome(inst.task, inst.index, state, code, message)

    def _readopted(self, run: _JobRun, inst: Instance, handle: Handle, kind: str,
                   mounts: staging.NasMounts) -> bool:
        """An instance found again after a restart: it counts in its mounts again (an
        ended one is counted out right after) and its credential endpoint answers;
        whether it has credentials."""
        if mounts.claims:
            mounts.adopt()
        credentialed = self._restore_grant(run, inst, f"{run.job_id}.{inst.task}.{inst.index}")
        if not inst.ref:  # found by its traces: save what names it now
            self.store.started(run.job_id, inst.task, inst.index, kind, handle.ref)
        return credentialed

    def _let_go(self, run: _JobRun, inst: Instance, name: str, mounts: staging.NasMounts,
                credentialed: bool) -> None:
        """An ended (or failed) attempt's mounts released and its credentials revoked."""
        mounts.release()
        if credentialed:
            self._revoke(run, inst, name)

    def _mount(self, run: _JobRun, inst: Instance, mounts: staging.NasMounts) -> None:
        """The instance's NAS mounts: planned (kept for ``tasks show``), then made."""
        if not mounts.plans:
            return
        self.store.save_mounts(run.job_id, inst.task, inst.index, mounts.plans)
        mounts.mount()

    def _grant(self, run: _JobRun, inst: Instance, name: str, docker: bool,
               launch: Launch) -> tuple[bool, Launch]:
        """Mint the instance's credentials; their digests are stored before it starts."""
        if self.minter is None:
            return False, launch
        grant = self.minter.mint(name, docker)
        if grant is None:
            return False, launch
        try:
            self.store.save_grant(run.job_id, inst.task, inst.index, grant.record)
        except BaseException:
            self.minter.revoke(name)
            raise
        return True, replace(launch, env={**launch.env, **grant.env})

    def _restore_grant(self, run: _JobRun, inst: Instance, name: str) -> bool:
        """A re-adopted instance's credential endpoint answers again (same URL, token)."""
        if self.minter is None:
            return False
        record = self.store.grant(run.job_id, inst.task, inst.index)
        if record is None:
            return False
        try:
            return self.minter.restore(name, record)
        except Exception as exc:  # the instance runs on without credentials
            log.warning("%s: its credentials could not be restored: %s", name, exc)
            return False

    def _revoke(self, run: _JobRun, inst: Instance, name: str) -> None:
        assert self.minter is not None
        try:
            self.minter.revoke(name)
        finally:
            self.store.drop_grant(run.job_id, inst.task, inst.index)

    def _watch(self, run: _JobRun, task: Task, handle: Handle,
               started: float) -> tuple[str, int | None, str]:
        deadline = started + task.timeout
        while True:
            left = deadline - time.time()
            if self._detached.is_set():
                raise _Detached
            if left <= 0:
                code = handle.stop(self.grace)
                return FAILED, code, f"timed out after {task.timeout}s"
            code = handle.wait(min(left, 0.25))
            if code is not None and self._detached.is_set():
                # Detached while waiting: the next agent finds it ended and records it;
                # recording it here too would race that agent over its mounts and state.
                raise _Detached
            if code is not None:
                if code == 0:
                    return FINISHED, 0, ""
                return FAILED, code, f"exited with {code}"
            if run.stop.is_set():
                code = handle.stop(self.grace)
                return STOPPED, code, run.reason or "stopped"

    def _env(self, run: _JobRun, task: Task, index: int, *, layout: staging.Layout,
             docker: bool) -> dict[str, str]:
        if docker:
            env = dict(DOCKER_ENV)
        else:
            env = {k: os.environ[k] for k in HOST_ENV_PASS if k in os.environ}
            env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            env["PWD"] = str(layout.workdir)
        ident = self.identity
        env.update({
            "BATCH_COMPUTE_DAG_JOB_ID": run.job_id,
            "BATCH_COMPUTE_DAG_TASK_ID": task.name,
            "BATCH_COMPUTE_DAG_INSTANCE_ID": str(index),
            "BATCH_COMPUTE_OSS_HOST": ident.oss_host,
            "BATCH_COMPUTE_REGION": ident.region,
            "BATCH_COMPUTE_CLUSTER_ID": task.cluster_id or ident.cluster_id,
            "BATCH_COMPUTE_WORKER_ID": ident.worker_id,
        })
        env.update(task.env_vars)
        return env

    def _launch(self, run: _JobRun, task: Task, index: int, *, layout: staging.Layout,
                env: dict[str, str], docker: bool, name: str) -> Launch:
        return Launch(
            name=name,
            argv=task.argv,
            env=env,
            workdir=layout.workdir,
            stdout=layout.stdout,
            stderr=layout.stderr,
            state_dir=layout.private,
            image=task.docker_image,
            binds=staging.binds(layout, task, self._job_dir(run)) if docker else (),
            labels={"guestagent.job": run.job_id, "guestagent.task": task.name,
                    "guestagent.instance": str(index)},
        )
