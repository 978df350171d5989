"""``guestagent tasks submit|list|show|logs|stop``.

``submit`` hands the job to the daemon's ``tasks`` service over its local socket
(``run_dir/tasks.sock``, root only); with no daemon it runs the job in the foreground with
the same scheduler. The other commands read the state store directly, so they work
whoever runs the job; ``stop`` leaves a request in the store that the runner honours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from guestagent.cli import EXIT_ABSENT, EXIT_OK, EXIT_UNAVAILABLE, fail, load_settings

EXIT_JOB_FAILED = 4


def register(sub: Any) -> None:
    p = sub.add_parser("tasks", help="BatchCompute-style jobs on this machine")
    tsub = p.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND")
    s = tsub.add_parser("submit", help="submit a job.json or job.cfg; prints the job id")
    s.add_argument("file", nargs="?", help="job JSON (.json) or bcs job.cfg")
    s.add_argument("--wait", action="store_true", help="wait for the end; exit 4 unless Finished")
    s.add_argument("--resume", metavar="JOB", help="rerun what did not finish in JOB")
    s.add_argument("-r", "--read-mount", action="append", default=[],
                   metavar="OSS:/DIR", help="bcs -r: read-only input mapping(s), comma-separated")
    s.add_argument("-w", "--write-mount", action="append", default=[],
                   metavar="OSS:/DIR", help="bcs -w: output mapping(s), comma-separated")
    s.add_argument("--docker", metavar="IMAGE@OSS", help="bcs --docker image@oss://bucket/dir/")
    s.add_argument("-e", "--env", action="append", default=[], metavar="K:V,...",
                   help="bcs -e: environment variables")
    s.add_argument("--foreground", action="store_true",
                   help="run here even if a daemon is running")
    s.set_defaults(handler=_submit)
    ls = tsub.add_parser("list", help="jobs and their states")
    ls.set_defaults(handler=_list)
    sh = tsub.add_parser("show", help="a job: tasks, instances, events")
    sh.add_argument("job")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(handler=_show)
    lg = tsub.add_parser("logs", help="an instance's stdout and stderr")
    lg.add_argument("job")
    lg.add_argument("task")
    lg.add_argument("instance", nargs="?", type=int, default=0)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.set_defaults(handler=_logs)
    st = tsub.add_parser("stop", help="stop a job (running instances end as Stopped)")
    st.add_argument("job")
    st.set_defaults(handler=_stop)
    p.set_defaults(handler=lambda a: (p.print_help(sys.stderr), 2)[1])


def _local(args: argparse.Namespace) -> Any:
    """Settings and the state store, for the commands that only read it. With no store
    yet there is no job to show: nothing is created for a question (the answer is absent)."""
    from guestagent.tasks import service

    settings = load_settings(args)
    return settings, service.open_store(settings, create=False)


def _submit(args: argparse.Namespace) -> int:
    from guestagent.cli import UsageError
    from guestagent.tasks import jobcfg, service, submit
    from guestagent.tasks.errors import JobError, TaskError

    if bool(args.file) == bool(args.resume):
        raise UsageError("tasks submit: give a job file, or --resume JOB")
    settings = load_settings(args)
    flags = jobcfg.Flags(args.read_mount, args.write_mount, args.docker, args.env)
    try:
        # The job is read and checked before the state store exists: a refused job
        # leaves no trace (no tasks.db, no job directory).
        if args.resume:
            store = service.open_store(settings, create=False)
            store.job(args.resume)
            job_id, notices = args.resume, list[str]()
        else:
            job, doc = jobcfg.load_job(Path(args.file), flags, settings.tasks.max_timeout)
            store = service.open_store(settings)
            job_id, notices = submit.create_from(store, service.jobs_dir(settings), job, doc,
                                                 settings.tasks.max_timeout)
    except (JobError, TaskError) as exc:
        raise UsageError(str(exc)) from None
    for notice in notices:
        print(f"guestagent: note: {notice}", file=sys.stderr)
    try:
        handed = _hand_over(args, settings, store, job_id)
    except TaskError as exc:
        return fail(EXIT_UNAVAILABLE, str(exc))
    print(job_id, flush=True)
    if handed:
        if not args.wait:
            return EXIT_OK
        state = _wait(store, job_id)
    else:
        try:
            state = service.run_foreground(settings, store, job_id)
        except TaskError as exc:
            return fail(EXIT_UNAVAILABLE, str(exc))
    if state != "Finished":
        message = store.job(job_id)["message"]
        return fail(EXIT_JOB_FAILED, f"{job_id} {state}" + (f": {message}" if message else ""))
    return EXIT_OK


def _hand_over(args: argparse.Namespace, settings: Any, store: Any, job_id: str) -> bool:
    """True when a running daemon took the job; else it is ready to run here."""
    from guestagent.tasks import service

    handed = not args.foreground and service.hand_to_daemon(settings, job_id,
                                                            bool(args.resume))
    if args.resume and not handed:
        store.reset_unfinished(job_id)
    return handed


def _wait(store: Any, job_id: str) -> str:
    while True:
        state = str(store.job(job_id)["state"])
        if state in ("Finished", "Failed", "Stopped"):
            return state
        time.sleep(0.5)


def _list(args: argparse.Namespace) -> int:
    _, store = _local(args)
    for job in store.jobs():
        print(f"{job['id']}  {job['state']:<9} {_when(job['created'])}  {job['name']}")
    return EXIT_OK


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def show_data(store: Any, job_id: str) -> dict[str, Any]:
    job = store.job(job_id)
    tasks = store.tasks(job_id)
    out: dict[str, Any] = {k: job[k] for k in ("id", "name", "state", "created", "started",
                                                "ended", "message")}
    out["tasks"] = []
    for name, row in tasks.items():
        instances = [{"index": i.index, "state": i.state, "retries": i.retries,
                      "exit_code": i.exit_code, "started": i.started, "ended": i.ended,
                      "runner": i.runner, "message": i.message,
                      "mounts": store.mounts(job_id, name, i.index)}
                     for i in store.instances(job_id, name)]
        out["tasks"].append({"name": name, "state": row["state"], "started": row["started"],
                             "ended": row["ended"], "message": row["message"],
                             "instances": instances})
    out["events"] = store.events(job_id)
    return out


def _show(args: argparse.Namespace) -> int:
    from guestagent.tasks.errors import TaskError

    _, store = _local(args)
    try:
        data = show_data(store, args.job)
    except TaskError as exc:
        return fail(EXIT_ABSENT, str(exc))
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"{data['id']}  {data['name']}  {data['state']}"
          + (f"  ({data['message']})" if data["message"] else ""))
    for t in data["tasks"]:
        print(f"  {t['name']}: {t['state']}" + (f" ({t['message']})" if t["message"] else ""))
        for i in t["instances"]:
            code = "-" if i["exit_code"] is None else i["exit_code"]
            print(f"    {i['index']}: {i['state']:<9} exit={code} retries={i['retries']}"
                  f" {_when(i['started'])} .. {_when(i['ended'])}"
                  + (f"  {i['message']}" if i["message"] else ""))
            for m in i["mounts"]:
                print(f"       mount {m['source']} -> {m['destination']} ({m['options']})")
    print("  events:")
    for e in data["events"]:
        print(f"    {_when(e['time'])} {e['event']}")
    return EXIT_OK


def _logs(args: argparse.Namespace) -> int:
    from guestagent.tasks import service
    from guestagent.tasks.errors import TaskError

    settings, store = _local(args)
    try:
        store.instance(args.job, args.task, args.instance)
    except TaskError as exc:
        return fail(EXIT_ABSENT, str(exc))
    root = service.jobs_dir(settings) / args.job / args.task / str(args.instance)
    if not args.follow:
        for stream in ("stdout", "stderr"):
            path = root / stream
            if path.exists():
                sys.stdout.write(path.read_text(errors="replace"))
        return EXIT_OK
    return _follow(store, args, root)


FOLLOW_POLL = 0.2


def _follow(store: Any, args: argparse.Namespace, root: Path) -> int:
    """Both streams as they grow (stdout here, stderr to stderr) until the instance ends:
    host instances write the files directly, the Docker runner follows the container's
    logs into them while it runs. A retry's attempt starts with fresh files: so does the
    output shown."""
    streams = [_Tail(root / "stdout", sys.stdout.buffer), _Tail(root / "stderr", sys.stderr.buffer)]
    attempt = None
    while True:
        # The state first: once it says ended, the files were complete before it did.
        inst = store.instance(args.job, args.task, args.instance)
        if attempt is not None and inst.retries != attempt:
            for tail in streams:
                tail.reset_due = True
        attempt = inst.retries
        for tail in streams:
            tail.copy_new()
        if inst.state in ("Finished", "Failed", "Stopped"):
            return EXIT_OK
        time.sleep(FOLLOW_POLL)


class _Tail:
    """One log file followed by offset. A new file (another inode) is the same attempt's
    final copy, unless a retry came in between: then it is the next attempt's, shown from
    its start. A file truncated in place (a restarted agent following a container's logs
    again) is rewritten with the same bytes: the offset stays."""

    def __init__(self, path: Path, out: Any) -> None:
        self.path, self.out = path, out
        self.offset = 0
        self.inode: int | None = None
        self.reset_due = False

    def copy_new(self) -> None:
        try:
            with self.path.open("rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                if inode != self.inode:
                    if self.reset_due:
                        self.offset, self.reset_due = 0, False
                    self.inode = inode
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return
        if chunk:
            self.out.write(chunk)
            self.out.flush()
            self.offset += len(chunk)


def _stop(args: argparse.Namespace) -> int:
    from guestagent.tasks.errors import TaskError

    _, store = _local(args)
    try:
        job = store.job(args.job)
    except TaskError as exc:
        return fail(EXIT_ABSENT, str(exc))
    if job["state"] in ("Finished", "Failed", "Stopped"):
        print(f"{args.job} already {job['state']}")
        return EXIT_OK
    store.request_stop(args.job, "stopped by the user")
    print(f"{args.job}: stop requested")
    return EXIT_OK
