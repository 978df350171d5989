"""The daemon's ``tasks`` service, and the same scheduler run in the foreground by the CLI.

State: ``<state_dir>/tasks/tasks.db`` (SQLite) and ``<state_dir>/tasks/jobs/<job>/``.
The CLI hands a stored job to the daemon over ``<run_dir>/tasks.sock`` (root only; the
request names the job id, never a secret). On start the service goes on with every job
left Running — re-adopting the processes/containers still there; on a drain it stops
taking instances, stops the running ones within the deadline (outputs and logs uploaded)
and marks them Stopped with the reason, so ``submit --resume`` reruns only those.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guestagent.service import Service
from guestagent.tasks.errors import TaskError
from guestagent.tasks.runner import HostRunner, Runner
from guestagent.tasks.scheduler import Identity, Scheduler
from guestagent.tasks.store import RUNNING, WAITING, Store

if TYPE_CHECKING:
    from guestagent.config import Settings
    from guestagent.daemon.registry import Context
    from guestagent.tasks.credentials import TaskCredentials

log = logging.getLogger(__name__)

SOCKET_NAME = "tasks.sock"


def tasks_dir(settings: Settings) -> Path:
    return settings.daemon.state_dir / "tasks"


def jobs_dir(settings: Settings) -> Path:
    return tasks_dir(settings) / "jobs"


def open_store(settings: Settings, *, create: bool = True) -> Store:
    """The state store; ``create=False`` (a command that only reads or names a job) opens
    an empty in-memory store when none exists yet, so asking leaves nothing behind."""
    path = tasks_dir(settings) / "tasks.db"
    if not create and not path.exists():
        return Store(None)
    return Store(path)


def identity(settings: Settings, region: str = "", worker: str = "") -> Identity:
    t = settings.tasks
    region = t.region or region
    host = t.oss_host or (f"oss-{region}-internal.aliyuncs.com" if region else "")
    return Identity(host, region, t.cluster_id, worker or socket.gethostname())


def runners(settings: Settings) -> dict[str, Runner]:
    out: dict[str, Runner] = {"host": HostRunner(settings.daemon.run_dir)}
    try:
        from guestagent.tasks.docker import DockerRunner  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return out
    from guestagent.tasks.registries import factory as registry_factory

    out["docker"] = DockerRunner(settings.tasks,
                                 registry_factory(settings, tasks_dir(settings) / "registries"))
    return out


def close_runners(sched: Scheduler) -> None:
    """Stop what the runners keep running (the OSS-backed registries)."""
    for runner in sched.runners.values():
        close = getattr(runner, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # one runner's failure must not keep the others up
                log.warning("tasks: closing the %s runner: %s", runner.kind, exc)


def build(settings: Settings, store: Store, **kwargs: Any) -> Scheduler:
    from guestagent.tasks.staging import default_storage

    kwargs.setdefault("identity", identity(settings))
    kwargs.setdefault("storage", lambda: default_storage(settings))
    return Scheduler(store, settings.tasks, jobs_dir(settings), runners(settings), **kwargs)


def run_foreground(settings: Settings, store: Store, job_id: str) -> str:
    """Run the job here (no daemon); Ctrl-C stops it cleanly (instances end Stopped)."""
    sched = build(settings, store)
    result: list[str] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(sched.run(job_id))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=body, name="job", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        sched.stop(job_id, "interrupted")
        thread.join()
    finally:
        if not thread.is_alive():
            close_runners(sched)
    if errors:
        raise TaskError(f"{job_id}: {errors[0]}")
    return result[0]


# How long a submit waits for a running daemon's tasks service to listen (it starts after
# the daemon's other services, and later still under load) before giving up.
HANDOFF_WAIT = 60.0


def hand_to_daemon(settings: Settings, job_id: str, resume: bool) -> bool:
    """Ask a running daemon to run the job; False when no daemon runs the tasks service.

    A daemon that runs but does not listen yet is waited for: running the job in the
    foreground beside it would leave two schedulers over one store."""
    from guestagent.flocks import daemon_holder
    from guestagent.tasks.handoff import ask

    path = settings.daemon.run_dir / SOCKET_NAME
    request = {"command": "run", "job": job_id, "resume": resume}
    reply = ask(path, request)
    deadline = time.monotonic() + HANDOFF_WAIT
    while reply is None and settings.tasks.enabled:
        pid = daemon_holder(settings.daemon.run_dir)
        if pid is None:
            return False
        if time.monotonic() > deadline:
            raise TaskError(f"the daemon (pid {pid}) runs but its tasks service has not "
                            f"answered at {path} for {HANDOFF_WAIT:.0f} s: see "
                            "'guestagent status'")
        time.sleep(0.2)
        reply = ask(path, request)
    if reply is None:
        return False
    if "error" in reply:
        raise TaskError(f"the daemon refused the job: {reply['error']}")
    return True


class TasksService(Service):
    name = "tasks"
    requires: tuple[str, ...] = ()

    def __init__(self, settings: Settings, ctx: Context | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.sched: Scheduler | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def _identity(self) -> Identity:
        region = worker = ""
        if self.ctx is not None and not self.settings.tasks.region:
            try:
                ident = self.ctx.client.identity()
                region, worker = ident.region_id, ident.instance_id
            except Exception as exc:  # metadata down: the env says "" until it is back
                log.warning("tasks: no region/instance id from metadata: %s", exc)
        return identity(self.settings, region, worker)

    def run(self, stop: threading.Event) -> None:
        from guestagent.tasks.handoff import HandoffServer

        store = open_store(self.settings)
        draining = self.ctx.draining if self.ctx is not None else None
        minter = self._minter()
        self.sched = build(self.settings, store, identity=self._identity(), draining=draining,
                           minter=minter)
        for job_id in store.jobs_in(RUNNING):
            log.info("tasks: going on with %s", job_id)
            self._start(job_id)
        server = HandoffServer(self.settings.daemon.run_dir / SOCKET_NAME, self._handle).start()
        try:
            while not self.wait(stop, 5.0):
                pass
        finally:
            server.close()
            self.sched.detach()
            close_runners(self.sched)
            if minter is not None:
                minter.close()
            store.close()

    def _minter(self) -> TaskCredentials | None:
        """Task-scoped credentials from the credential service, reached through the
        daemon's context; None (instances get none) when it is not running here."""
        from guestagent.credentials.consumers import CredentialAccess
        from guestagent.tasks.credentials import TASK_ADDRESS, Relay, TaskCredentials

        try:
            access = (self.ctx.service("credentials", CredentialAccess)  # type: ignore[type-abstract]
                      if self.ctx else None)
        except LookupError as exc:
            log.info("tasks: instances get no task credentials: %s", exc)
            return None
        socket_path = self.settings.credentials.socket_path
        if access is None or socket_path is None:
            return None
        docker_host = self.settings.tasks.docker_host

        def host_relay(port: int) -> Relay | None:
            return Relay(socket_path, "127.0.0.1", port=port).start()

        def docker_relay(port: int) -> Relay | None:
            from guestagent.tasks.docker import bridge_interface

            return Relay(socket_path, TASK_ADDRESS, bridge_interface(docker_host),
                         port=port).start()

        # Relays listen where they did before a restart: re-adopted instances ask there.
        creds = TaskCredentials(access, host_relay, docker_relay,
                                ports_file=tasks_dir(self.settings) / "relays.json")
        creds.relay("host")
        return creds

    def _start(self, job_id: str) -> None:
        assert self.sched is not None
        sched = self.sched
        with self._lock:
            old = self._threads.get(job_id)
            if old is not None and old.is_alive():
                raise TaskError(f"{job_id} is already running")
            thread = threading.Thread(target=self._run_job, args=(sched, job_id),
                                      name=f"job-{job_id[-6:]}", daemon=True)
            self._threads[job_id] = thread
        thread.start()

    @staticmethod
    def _run_job(sched: Scheduler, job_id: str) -> None:
        try:
            state = sched.run(job_id)
            log.info("tasks: %s %s", job_id, state)
        except Exception:
            log.exception("tasks: %s could not run", job_id)

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("command") != "run" or not isinstance(request.get("job"), str):
            raise ValueError("want {\"command\": \"run\", \"job\": JOB}")
        assert self.sched is not None
        job_id = request["job"]
        store = self.sched.store
        try:
            row = store.job(job_id)
            if request.get("resume"):
                store.reset_unfinished(job_id)
            elif row["state"] != WAITING:
                raise TaskError(f"{job_id} is {row['state']}: use --resume")
            self._start(job_id)
        except TaskError as exc:
            return {"error": str(exc)}
        return {"job": job_id}

    def drain(self, deadline: float) -> None:
        sched = self.sched
        if sched is None:
            return
        sched.drain(deadline, "the instance is being released (spot termination)")

    def status(self) -> dict[str, Any]:
        sched = self.sched
        if sched is None:
            return {}
        return {"jobs_running": len(sched.active()), "parallel_limit": sched.limit}


def factory(ctx: Context) -> Service | None:
    if not ctx.settings.tasks.enabled:
        return None
    service = TasksService(ctx.settings, ctx)
    if ctx.settings.credentials.enabled and find_spec("guestagent.credentials.service"):
        # Started once the credential service is ready: instances re-adopted at start get
        # their credentials back, new ones get theirs.
        service.requires = ("credentials",)
    return service
