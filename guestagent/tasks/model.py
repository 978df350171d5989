"""A BatchCompute job as its user guide describes it, parsed and checked before anything runs.

``Job.parse(document)`` takes the job JSON (``Name``, ``Type: "DAG"``, ``DAG.Tasks`` …);
``guestagent.tasks.jobcfg`` turns a ``bcs sub --file job.cfg`` file into the same
document. Every refusal is one :class:`JobError` line naming the field.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from guestagent.storage import mappings
from guestagent.tasks import rules
from guestagent.tasks.errors import JobError

log = logging.getLogger(__name__)

# The guide's per-instance limit (6 hours); a longer local run raises [tasks] max_timeout.
DEFAULT_MAX_TIMEOUT = 21600
MAX_INSTANCES = 500  # the guide's per-task instance quota
MAX_RETRIES = 100

JOB_EVENTS = (
    "OnJobWaiting", "OnJobRunning", "OnJobStopped", "OnJobFinished", "OnJobFailed",
    "OnTaskWaiting", "OnTaskRunning", "OnTaskStopped", "OnTaskFinished", "OnTaskFailed",
    "OnInstanceWaiting", "OnInstanceRunning", "OnInstanceStopped", "OnInstanceFinished",
    "OnInstanceFailed", "OnPriorityChange",
)

_JOB_KEYS = {"Name", "Type", "Description", "Priority", "JobFailOnInstanceFail",
             "Notification", "DAG"}
_TASK_KEYS = {"InstanceCount", "MaxRetryCount", "Timeout", "Parameters", "InputMapping",
              "OutputMapping", "LogMapping", "Mounts", "AutoCluster", "ClusterId"}
_PARAM_KEYS = {"Command", "StdoutRedirectPath", "StderrRedirectPath", "InputMappingConfig"}
_COMMAND_KEYS = {"CommandLine", "PackagePath", "EnvVars"}


@dataclass(frozen=True)
class MountEntry:
    source: str
    destination: str
    write: bool = False
    lock: bool = False  # Mounts.Lock: NFS locks (NFSv3 drops nolock)

    @property
    def is_nas(self) -> bool:
        return self.source.startswith("nas://")


@dataclass(frozen=True)
class Task:
    name: str
    command_line: str
    instance_count: int = 1
    max_retry_count: int = 0
    timeout: int = DEFAULT_MAX_TIMEOUT
    package_path: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    stdout_redirect_path: str | None = None
    stderr_redirect_path: str | None = None
    input_mapping_config: Mapping[str, Any] = field(default_factory=dict)
    input_mapping: Mapping[str, str] = field(default_factory=dict)  # oss dir -> local dir
    output_mapping: Mapping[str, str] = field(default_factory=dict)  # local dir -> oss dir
    log_mapping: Mapping[str, str] = field(default_factory=dict)  # local file -> oss path
    mounts: tuple[MountEntry, ...] = ()
    cluster_id: str = ""
    auto_cluster: Mapping[str, Any] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command_line)

    @property
    def docker_image(self) -> str | None:
        return self.env_vars.get(rules.DOCKER_IMAGE_VAR) or None

    @property
    def registry_path(self) -> str | None:
        return self.env_vars.get(rules.DOCKER_REGISTRY_VAR) or None


@dataclass(frozen=True)
class Notification:
    topic: str = ""
    endpoint: str = ""
    events: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    name: str
    tasks: Mapping[str, Task]
    # task -> the tasks that start after it (the guide's "split": ["count"])
    dependencies: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    priority: int = 0
    job_fail_on_instance_fail: bool = True
    notification: Notification = field(default_factory=Notification)
    document: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, doc: object, *, max_timeout: int = DEFAULT_MAX_TIMEOUT) -> Job:
        return _parse_job(doc, max_timeout)

    def predecessors(self, name: str) -> list[str]:
        return sorted(t for t, after in self.dependencies.items() if name in after)

    def order(self) -> list[str]:
        """Task names in an order that honours the dependencies (stable by name)."""
        return _topological(self.tasks, self.dependencies)

    def uses_cluster(self) -> bool:
        return any(t.cluster_id or t.auto_cluster for t in self.tasks.values())


# -- parsing ------------------------------------------------------------------------------

def _obj(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JobError(f"{where}: must be an object, got {rules.json_type(value)}")
    return value


def _known(obj: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in obj:
        if key not in known:
            raise JobError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")


def _int(value: object, where: str, lo: int, hi: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"{where}: must be an integer, got {rules.json_type(value)} {value!r}")
    if not lo <= value <= hi:
        raise JobError(f"{where}: must be between {lo} and {hi}, got {value}")
    return value


def _str(value: object, where: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise JobError(f"{where}: must be a string, got {rules.json_type(value)}")
    return value


def _parse_job(doc: object, max_timeout: int) -> Job:
    job = _obj(doc, "job")
    _known(job, _JOB_KEYS, "job")
    name = _str(job.get("Name"), "Name").strip()
    if not name or len(name) > 128 or any(ord(c) < 0x20 for c in name):
        raise JobError("Name: the job needs a name of 1-128 printable characters")
    if job.get("Type", "DAG") != "DAG":
        raise JobError(f"Type: only \"DAG\" jobs exist, got {job.get('Type')!r}")
    fail_on = job.get("JobFailOnInstanceFail", True)
    if not isinstance(fail_on, bool):
        raise JobError(f"JobFailOnInstanceFail: must be true or false, got {fail_on!r}")
    dag = _obj(job.get("DAG"), "DAG")
    _known(dag, {"Tasks", "Dependencies"}, "DAG")
    raw_tasks = _obj(dag.get("Tasks"), "DAG.Tasks")
    if not raw_tasks:
        raise JobError("DAG.Tasks: the job has no task: add at least one")
    tasks = {
        rules.task_name(tname, f"DAG.Tasks.{tname}"):
            _parse_task(tname, raw, max_timeout)
        for tname, raw in raw_tasks.items()
    }
    deps = _parse_deps(dag.get("Dependencies"), tasks)
    _topological(tasks, deps)
    parsed = Job(
        name=name,
        tasks=tasks,
        dependencies=deps,
        description=_str(job.get("Description"), "Description"),
        priority=_int(job.get("Priority"), "Priority", 0, 1000, 0),
        job_fail_on_instance_fail=fail_on,
        notification=_parse_notification(job.get("Notification")),
        document=dict(job),
    )
    return parsed


def _parse_notification(value: object) -> Notification:
    note = _obj(value, "Notification")
    _known(note, {"Topic"}, "Notification")
    topic = _obj(note.get("Topic"), "Notification.Topic")
    _known(topic, {"Name", "Endpoint", "Events"}, "Notification.Topic")
    events = topic.get("Events", [])
    if not isinstance(events, list):
        raise JobError("Notification.Topic.Events: must be a list of event names, got "
                       f"{rules.json_type(events)}")
    for ev in events:
        if not isinstance(ev, str) or ev not in JOB_EVENTS:
            raise JobError(
                f"Notification.Topic.Events: unknown event {ev!r} (known: {', '.join(JOB_EVENTS)})"
            )
    return Notification(
        _str(topic.get("Name"), "Notification.Topic.Name"),
        _str(topic.get("Endpoint"), "Notification.Topic.Endpoint"),
        tuple(events),
    )


def _parse_task(name: str, raw: object, max_timeout: int) -> Task:
    where = f"DAG.Tasks.{name}"
    task = _obj(raw, where)
    _known(task, _TASK_KEYS, where)
    params = _obj(task.get("Parameters"), f"{where}.Parameters")
    _known(params, _PARAM_KEYS, f"{where}.Parameters")
    command = _obj(params.get("Command"), f"{where}.Parameters.Command")
    _known(command, _COMMAND_KEYS, f"{where}.Parameters.Command")
    line = _str(command.get("CommandLine"), f"{where}.Parameters.Command.CommandLine").strip()
    _check_command(line, f"{where}.Parameters.Command.CommandLine")
    env = _parse_env(command.get("EnvVars"), f"{where}.Parameters.Command.EnvVars")
    storage = _parse_storage(task, command, where)
    cluster = _str(task.get("ClusterId"), f"{where}.ClusterId")
    return Task(
        name=name,
        command_line=line,
        instance_count=_int(task.get("InstanceCount"), f"{where}.InstanceCount",
                            1, MAX_INSTANCES, 1),
        max_retry_count=_int(task.get("MaxRetryCount"), f"{where}.MaxRetryCount",
                             0, MAX_RETRIES, 0),
        timeout=_int(task.get("Timeout"), f"{where}.Timeout", 1, max_timeout, max_timeout),
        package_path=storage.package,
        env_vars=env,
        stdout_redirect_path=storage.stdout,
        stderr_redirect_path=storage.stderr,
        input_mapping_config=dict(_obj(params.get("InputMappingConfig"),
                                       f"{where}.Parameters.InputMappingConfig")),
        input_mapping=storage.inputs,
        output_mapping=storage.outputs,
        log_mapping=storage.logs,
        mounts=storage.mounts,
        cluster_id=cluster,
        auto_cluster=dict(_obj(task.get("AutoCluster"), f"{where}.AutoCluster")),
    )


def _check_command(line: str, where: str) -> None:
    if not line:
        raise JobError(f"{where}: empty: give the program and its arguments, e.g. 'python test.py'")
    if "\x00" in line:
        raise JobError(f"{where}: contains a NUL byte")
    try:
        shlex.split(line)
    except ValueError as exc:
        raise JobError(f"{where}: cannot split {line!r} into arguments: {exc}") from None


def _parse_env(value: object, where: str) -> dict[str, str]:
    env = _obj(value, where)
    out = {rules.env_name(k, where): rules.env_value(v, f"{where}.{k}") for k, v in env.items()}
    image = out.get(rules.DOCKER_IMAGE_VAR)
    if image:
        rules.image(image, f"{where}.{rules.DOCKER_IMAGE_VAR}")
        reg = out.get(rules.DOCKER_REGISTRY_VAR)
        if reg:
            rules.oss_dir(reg, f"{where}.{rules.DOCKER_REGISTRY_VAR}")
    return out


@dataclass(frozen=True)
class _Storage:
    """A task's storage fields as the launcher keeps them (plain strings)."""

    inputs: dict[str, str]  # oss dir -> local dir (with '/')
    outputs: dict[str, str]  # local dir (with '/') -> oss dir
    logs: dict[str, str]  # local file -> oss path
    mounts: tuple[MountEntry, ...]
    package: str | None
    stdout: str | None
    stderr: str | None


def _parse_storage(task: Mapping[str, Any], command: Mapping[str, Any], where: str) -> _Storage:
    """Mappings, mounts, redirects and package, checked by the storage capability's rules
    (``storage.mappings``: one place for them); a refusal names the task's field."""
    package = command.get("PackagePath")
    local_package = isinstance(package, str) and package.startswith("/")
    if local_package:
        # A package packed locally (job.cfg ``pack``): a local path, not an OSS object.
        command = {k: v for k, v in command.items() if k != "PackagePath"}
        task = {**task, "Parameters": {**_obj(task.get("Parameters"), where),
                                       "Command": command}}
    with rules.storage_rules(where):
        m = mappings.parse_task(task)
        if local_package:
            package = str(mappings.local_dir(package, "Parameters.Command.PackagePath"))
    return _Storage(
        inputs={str(i.source): _dir(i.local) for i in m.inputs},
        outputs={_dir(o.local): str(o.dest) for o in m.outputs},
        logs={str(lm.local): str(lm.dest) for lm in m.logs},
        mounts=tuple(MountEntry(str(e.source), _dir(e.destination), e.write,
                                m.mount_config.lock) for e in m.mounts),
        package=package if local_package else (str(m.package) if m.package else None),
        stdout=str(m.stdout) if m.stdout else None,
        stderr=str(m.stderr) if m.stderr else None,
    )


def _dir(path: PurePosixPath) -> str:
    return str(path).rstrip("/") + "/"


def _parse_deps(value: object, tasks: Mapping[str, Task]) -> dict[str, tuple[str, ...]]:
    deps = _obj(value, "DAG.Dependencies")
    out: dict[str, tuple[str, ...]] = {}
    for before, after in deps.items():
        where = f"DAG.Dependencies.{before}"
        if before not in tasks:
            raise JobError(f"{where}: unknown task {before!r} (tasks: {', '.join(sorted(tasks))})")
        # The guide's form only: task -> list of tasks. A bare string is refused rather than
        # read as a one-element list (it may as well be a typo for a key).
        if not isinstance(after, list):
            raise JobError(f"{where}: must be a list of task names such as [\"merge\"], got "
                           f"{rules.json_type(after)}")
        for name in after:
            if not isinstance(name, str):
                raise JobError(f"{where}: task names must be strings, got "
                               f"{rules.json_type(name)}")
            if name not in tasks:
                raise JobError(
                    f"{where}: unknown task {name!r} (tasks: {', '.join(sorted(tasks))})"
                )
            if name == before:
                raise JobError(f"{where}: a task cannot depend on itself")
        out[before] = tuple(dict.fromkeys(after))
    return out


def _topological(tasks: Mapping[str, Any], deps: Mapping[str, tuple[str, ...]]) -> list[str]:
    incoming = {name: 0 for name in tasks}
    for after in deps.values():
        for name in after:
            incoming[name] += 1
    ready = sorted(n for n, c in incoming.items() if c == 0)
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for nxt in deps.get(name, ()):
            incoming[nxt] -= 1
            if incoming[nxt] == 0:
                ready.append(nxt)
                ready.sort()
    if len(order) != len(tasks):
        cycle = sorted(n for n, c in incoming.items() if c > 0)
        raise JobError(
            f"DAG.Dependencies: cycle among {', '.join(cycle)}: a task cannot (indirectly) "
            "wait for itself"
        )
    return order
