"""``job.cfg`` as ``bcs sub --file job.cfg`` reads it, turned into the job JSON document.

::

    [DEFAULT]
    job_name=log-count
    description=demo
    pack=./log-count/
    deps=split->count;count->merge

    [split]
    cmd=python split.py

    [count]
    cmd=python count.py
    nodes=3

The ``bcs sub`` flags apply to every task, given on the command line (``-r``, ``-w``,
``--docker``, ``-e``) or as keys in ``[DEFAULT]`` or a task's section (``read_mount``,
``write_mount``, ``docker``, ``env``, ``timeout``, ``retry``, ``stdout``/``stderr``
redirect dirs). ``pack`` is a local directory or tarball (relative to the file) or an
``oss://`` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guestagent.files import read_input
from guestagent.tasks import rules
from guestagent.tasks.errors import JobError
from guestagent.tasks.model import Job

if TYPE_CHECKING:
    import configparser

_JOB_KEYS = {"job_name", "description", "deps", "priority", "job_fail_on_instance_fail"}
_TASK_KEYS = {"cmd", "nodes", "pack", "read_mount", "write_mount", "docker", "env", "timeout",
              "retry", "stdout", "stderr", "log_mapping", "cluster"}


@dataclass(frozen=True)
class Flags:
    """The ``bcs sub`` flags given beside ``--file`` (apply to every task)."""

    read_mounts: list[str] = field(default_factory=list)  # -r oss://b/dir/:/local
    write_mounts: list[str] = field(default_factory=list)  # -w oss://b/dir/:/local
    docker: str | None = None  # --docker image@oss://bucket/dir/
    env: list[str] = field(default_factory=list)  # -e k:v,k2:v2


def load(path: Path, flags: Flags | None = None) -> dict[str, Any]:
    return parse(read_text(path), base_dir(path), flags or Flags(), source=str(path))


def read_text(path: Path) -> str:
    """The job file's text (``-``: standard input), or one JobError line saying why not."""
    try:
        return read_input(path).decode()
    except OSError as exc:
        raise JobError(f"{path}: cannot read the job file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise JobError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def base_dir(path: Path) -> Path:
    """Where a job.cfg's relative ``pack`` is found: beside the file, or the current
    directory for standard input and ``<(cmd)`` (whose /dev/fd/N has no directory)."""
    if str(path) == "-" or str(path).startswith(("/dev/fd/", "/proc/")):
        return Path.cwd()
    return path.parent


def parse(text: str, base: Path, flags: Flags, source: str = "job.cfg") -> dict[str, Any]:
    import configparser  # lazily: a job file is read once in a while, the daemon idles

    cfg = configparser.ConfigParser(interpolation=None, default_section="DEFAULT")
    cfg.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        cfg.read_string(text, source=source)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise JobError(f"{source}: not a valid job.cfg: {first}") from None
    default = cfg.defaults()
    for key in default:
        if key not in _JOB_KEYS | _TASK_KEYS:
            raise JobError(f"{source}: [DEFAULT] unknown key {key!r}")
    names = cfg.sections()
    if not names:
        raise JobError(f"{source}: no task section: add one, e.g. [task1] with cmd=...")
    for name in names:  # a job key in a task's section would be silently ignored
        for key in _JOB_KEYS:
            if key in cfg[name] and (key not in default or cfg[name][key] != default[key]):
                raise JobError(f"{source}: [{name}] {key}= is a job setting: move it to "
                               "[DEFAULT]")
    tasks = {name: _task(cfg[name], name, base, flags, source) for name in names}
    deps = _deps(default.get("deps", ""), tasks, source)
    doc: dict[str, Any] = {
        "Name": default.get("job_name") or path_stem(source),
        "Type": "DAG",
        "Description": default.get("description", ""),
        "Priority": _intval(default.get("priority", "0"), "priority", source),
        "JobFailOnInstanceFail": _boolval(default.get("job_fail_on_instance_fail", "true"),
                                          "job_fail_on_instance_fail", source),
        "DAG": {"Tasks": tasks, "Dependencies": deps},
    }
    return doc


def path_stem(source: str) -> str:
    return Path(source).stem or "job"


def _intval(text: str, key: str, where: str) -> int:
    # Plain digits only: int() would also take "1_000" or "٣" (other scripts' digits).
    stripped = text.strip()
    if not re.fullmatch(r"-?[0-9]{1,9}", stripped):
        raise JobError(f"{where}: {key}={text!r} must be an integer")
    return int(stripped)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _boolval(text: str, key: str, where: str) -> bool:
    # As configparser's getboolean reads it: any other word is a mistake, not "true".
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise JobError(f"{where}: {key}={text!r} must be true or false")
    return word in _TRUE


def _task(
    section: configparser.SectionProxy, name: str, base: Path, flags: Flags, source: str
) -> dict[str, Any]:
    where = f"{source}: [{name}]"
    rules.task_name(name, where)
    for key in section:
        if key not in _JOB_KEYS | _TASK_KEYS:
            raise JobError(f"{where} unknown key {key!r} (known: {', '.join(sorted(_TASK_KEYS))})")
    command = _command(section, base, flags, where)
    task: dict[str, Any] = {
        "InstanceCount": _intval(section.get("nodes", "1"), "nodes", where),
        "MaxRetryCount": _intval(section.get("retry", "0"), "retry", where),
        "Parameters": {"Command": command},
        "InputMapping": _mounts(section.get("read_mount", ""), flags.read_mounts, "-r", False),
        "OutputMapping": _mounts(section.get("write_mount", ""), flags.write_mounts, "-w", True),
    }
    _task_options(section, task, where)
    return task


def _command(
    section: configparser.SectionProxy, base: Path, flags: Flags, where: str
) -> dict[str, Any]:
    """The task's Parameters.Command: command line, env (with the Docker image), package."""
    cmd = section.get("cmd", "").strip()
    if not cmd:
        raise JobError(f"{where} has no cmd=: give the command line to run")
    env = _env(section.get("env", ""), where) | _env(",".join(flags.env), "-e")
    docker = flags.docker or section.get("docker")
    if docker:
        env.update(_docker(docker, "--docker" if flags.docker else f"{where} docker"))
    command: dict[str, Any] = {"CommandLine": cmd, "EnvVars": env}
    pack = section.get("pack")
    if pack:
        command["PackagePath"] = _pack(pack, base, where)
    return command


def _task_options(section: configparser.SectionProxy, task: dict[str, Any], where: str) -> None:
    """The keys a task carries only when the section sets them."""
    if "timeout" in section:
        task["Timeout"] = _intval(section["timeout"], "timeout", where)
    for key, param in (("stdout", "StdoutRedirectPath"), ("stderr", "StderrRedirectPath")):
        if section.get(key):
            task["Parameters"][param] = section[key]
    if section.get("log_mapping"):
        task["LogMapping"] = dict(_split_mapping(m, "log_mapping")
                                  for m in section["log_mapping"].split(",") if m.strip())
    if section.get("cluster"):
        task["ClusterId"] = section["cluster"]


def _env(text: str, where: str) -> dict[str, str]:
    out = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition(":")
        if not sep:
            raise JobError(f"{where}: env entry {item!r}: want key:value")
        out[key.strip()] = value
    return out


def _docker(value: str, where: str) -> dict[str, str]:
    image, sep, storage = value.partition("@")
    if not sep or not storage.startswith("oss://"):
        raise JobError(
            f"{where}: {value!r}: want image@oss://bucket/dir/ (the registry's OSS path)"
        )
    rules.image(image, where)
    if not storage.endswith("/"):
        storage += "/"
    rules.oss_dir(storage, where)
    return {rules.DOCKER_IMAGE_VAR: image, rules.DOCKER_REGISTRY_VAR: storage}


def _pack(value: str, base: Path, where: str) -> str:
    if value.startswith("oss://"):
        return value
    path = (base / value).resolve()
    if not path.exists():
        raise JobError(f"{where} pack={value!r}: {path} does not exist")
    return str(path)


def _mounts(text: str, extra: list[str], flag: str, write: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    items = [p for p in text.split(",") if p.strip()]
    for group in extra:
        items.extend(p for p in group.split(",") if p.strip())
    for item in items:
        oss, local = _split_mapping(item.strip(), flag)
        if write:
            out[local] = oss
        else:
            out[oss] = local
    return out


def _split_mapping(item: str, flag: str) -> tuple[str, str]:
    """``oss://bucket/dir/:/local/dir`` (or ``/local:oss://…`` for log mappings)."""
    if item.startswith("oss://"):
        cut = item.rfind(":/")
        if cut <= len("oss://"):
            raise JobError(f"{flag}: {item!r}: want oss://bucket/dir/:/local/dir")
        return item[:cut], item[cut + 1:]
    local, sep, oss = item.partition(":oss://")
    if not sep:
        raise JobError(f"{flag}: {item!r}: want /local/path:oss://bucket/path")
    return local, "oss://" + oss


def _deps(text: str, tasks: dict[str, Any], source: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for edge in (e.strip() for e in text.split(";")):
        if not edge:
            continue
        before, sep, after = edge.partition("->")
        if not sep or not before.strip() or not after.strip():
            raise JobError(f"{source}: deps entry {edge!r}: want a->b (several: a->b;b->c)")
        for name in (before.strip(), *[a.strip() for a in after.split(",")]):
            if name not in tasks:
                raise JobError(
                    f"{source}: deps names task {name!r} but there is no [{name}] section: "
                    "add the section or fix the name"
                )
        out.setdefault(before.strip(), []).extend(a.strip() for a in after.split(","))
    return out


def load_job(path: Path, flags: Flags | None = None,
             max_timeout: int | None = None) -> tuple[Job, dict[str, Any]]:
    """The checked job and its JSON document, from a job JSON or a job.cfg file."""
    from guestagent.tasks.model import DEFAULT_MAX_TIMEOUT

    flags = flags or Flags()
    text = read_text(path)
    if is_json(path, text):
        if flags != Flags():
            raise JobError(f"{path}: -r/-w/--docker/-e apply to a job.cfg, not to a job JSON")
        doc = parse_json(text, path)
    else:
        doc = parse(text, base_dir(path), flags, source=str(path))
    job = Job.parse(doc, max_timeout=max_timeout or DEFAULT_MAX_TIMEOUT)
    return job, doc


def is_json(path: Path, text: str) -> bool:
    """A job JSON by its name, or, with no telling name (``-``, ``<(cmd)``), by its first
    character: a job.cfg starts with a section or a comment, never with ``{``."""
    if path.suffix in (".json", ".cfg"):
        return path.suffix == ".json"
    return text.lstrip("\ufeff \t\r\n").startswith("{")


def parse_json(text: str, path: Path) -> Any:
    """A job JSON document; a repeated key is refused (json would keep the last silently)."""
    from guestagent import jsondoc

    try:
        return jsondoc.loads(text)
    except jsondoc.DuplicateKey as exc:
        raise JobError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise JobError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise JobError(f"{path}: not valid JSON: nested too deeply") from None
