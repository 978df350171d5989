"""BatchCompute's storage declarations, parsed and checked before anything is touched.

The shapes are BatchCompute's own (task description fields):

- ``InputMapping``  ``{"oss://bucket/dir/": "/local/dir/"}``: a read-only view of OSS;
- ``OutputMapping`` ``{"/local/dir/": "oss://bucket/dir/"}``: uploaded when the task ends;
- ``LogMapping``    ``{"/local/file.log": "oss://bucket/dir/"}`` (or a whole object name);
- ``Parameters.StdoutRedirectPath`` / ``StderrRedirectPath``: an OSS directory that gets
  ``stdout.<job-id>.<task>.<instance>`` / ``stderr.…``;
- ``Parameters.Command.PackagePath``: ``oss://bucket/worker.tar.gz``, unpacked in the work dir;
- ``Mounts`` ``{"Entries": [{"Source", "Destination", "WriteSupport"}], "Locale", "Lock"}``
  with ``oss://`` or ``nas://<id>.<region>.nas.aliyuncs.com:/path/`` sources;
- ``Parameters.InputMappingConfig`` ``{"Locale", "Lock"}``.

Every rule violation is a :class:`BadInput` with one line naming the field and the fix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from guestagent.storage.errors import BadInput
from guestagent.storage.ossurl import OssUrl

# Local directories a mapping may never be, nor be under ("/" itself only as equal).
FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev", "/etc", "/boot")
PACKAGE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Locales whose file names need no conversion (OSS names are UTF-8).
UTF8_LOCALES = {"", "utf-8", "utf8", "c.utf-8", "en_us.utf-8", "zh_cn.utf-8"}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ALIYUN_NAS = re.compile(r"^[a-z0-9-]+\.([a-z0-9-]+\.)?[a-z]+-[a-z0-9-]+\.nas\.aliyuncs\.com$")
_REDIRECT_STREAMS = ("stdout", "stderr")


# -- the pieces ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NasSource:
    """``nas://host:/path/``: an NFS export."""

    host: str
    path: str

    @classmethod
    def parse(cls, text: str, where: str = "Source") -> NasSource:
        if not text.startswith("nas://"):
            raise BadInput(f"{where}: {text!r} is not a NAS source; want nas://host:/path/")
        host, sep, path = text[len("nas://"):].partition(":")
        if not sep or not path:
            raise BadInput(f"{where}: {text!r} has no export path; want nas://host:/path/")
        if "!" in path:
            raise BadInput(f"{where}: {text!r} is a Windows (SMB) source; "
                           "only NFS sources (nas://host:/path/) can be mounted on Linux")
        if not path.startswith("/"):
            raise BadInput(f"{where}: export path {path!r} must start with '/'")
        _check_plain_path(path, where, "export path")
        if not _is_host(host):
            raise BadInput(f"{where}: {host!r} is not a host name; "
                           "want <id>.<region>.nas.aliyuncs.com")
        if host.endswith(".nas.aliyuncs.com") and not _ALIYUN_NAS.fullmatch(host):
            raise BadInput(f"{where}: {host!r} is not a NAS mount target; "
                           "want <id>.<region>.nas.aliyuncs.com")
        return cls(host, path)

    @property
    def export(self) -> str:
        """``host:/path`` as mount(8) and fstab want it."""
        return f"{self.host}:{self.path}"

    def __str__(self) -> str:
        return f"nas://{self.host}:{self.path}"


@dataclass(frozen=True)
class InputMap:
    source: OssUrl  # a directory
    local: PurePosixPath


@dataclass(frozen=True)
class OutputMap:
    local: PurePosixPath
    dest: OssUrl  # a directory
    # Beyond BatchCompute: upload each file as soon as it is closed.
    streaming: bool = False


@dataclass(frozen=True)
class LogMap:
    local: PurePosixPath  # a file (or a directory: everything in it)
    dest: OssUrl  # a directory (the file keeps its name) or a whole object name

    def object_for(self, name: str) -> OssUrl:
        return self.dest.join(name) if self.dest.is_dir else self.dest


@dataclass(frozen=True)
class MountEntry:
    source: OssUrl | NasSource
    destination: PurePosixPath
    write: bool = False

    @property
    def is_nas(self) -> bool:
        return isinstance(self.source, NasSource)


@dataclass(frozen=True)
class MountConfig:
    """``Locale`` and ``Lock`` of ``Mounts`` or ``InputMappingConfig``."""

    locale: str = ""
    lock: bool = False


@dataclass(frozen=True)
class Mappings:
    """Everything a task declares about storage, checked as a whole."""

    inputs: tuple[InputMap, ...] = ()
    outputs: tuple[OutputMap, ...] = ()
    logs: tuple[LogMap, ...] = ()
    package: OssUrl | None = None
    stdout: OssUrl | None = None
    stderr: OssUrl | None = None
    mounts: tuple[MountEntry, ...] = ()
    mount_config: MountConfig = field(default_factory=MountConfig)
    input_config: MountConfig = field(default_factory=MountConfig)

    @property
    def empty(self) -> bool:
        return self == Mappings()


# -- parsing -------------------------------------------------------------------------------

def parse_task(task: Mapping[str, Any], *, streaming: Iterable[str] = ()) -> Mappings:
    """The storage part of a BatchCompute task description (``DAG.Tasks.<name>``).

    Fields are read where BatchCompute puts them (``InputMapping``, ``OutputMapping``,
    ``LogMapping``, ``Mounts`` on the task; ``StdoutRedirectPath``, ``StderrRedirectPath``,
    ``InputMappingConfig`` and ``Command.PackagePath`` under ``Parameters``), and also
    at the task level for the redirects and config. ``streaming`` names OutputMapping local
    directories that upload each file as soon as it is closed.
    """
    if not isinstance(task, Mapping):
        raise BadInput("task: want a JSON object")
    params = _table(task.get("Parameters"), "Parameters")
    command = _table(params.get("Command"), "Parameters.Command")

    def pick(name: str) -> Any:
        return params.get(name, task.get(name))

    package = command.get("PackagePath", task.get("PackagePath"))
    result = Mappings(
        inputs=parse_input_mapping(task.get("InputMapping")),
        outputs=parse_output_mapping(task.get("OutputMapping"), streaming=streaming),
        logs=parse_log_mapping(task.get("LogMapping")),
        # Only absent or "" mean no package: a 0 or false is a mistake, refused by name.
        package=None if package in (None, "") else parse_package_path(package),
        stdout=parse_redirect(pick("StdoutRedirectPath"), "StdoutRedirectPath"),
        stderr=parse_redirect(pick("StderrRedirectPath"), "StderrRedirectPath"),
        mounts=parse_mount_entries(task.get("Mounts")),
        mount_config=parse_config(_table(task.get("Mounts"), "Mounts"), "Mounts"),
        input_config=parse_config(pick("InputMappingConfig"), "InputMappingConfig"),
    )
    check(result)
    return result


def parse_input_mapping(raw: Any) -> tuple[InputMap, ...]:
    out = []
    for src, dst in _pairs(raw, "InputMapping"):
        where = f"InputMapping[{src!r}]"
        url = _oss_dir(src, where)
        out.append(InputMap(url, local_dir(dst, where)))
    return tuple(out)


def parse_output_mapping(raw: Any, *, streaming: Iterable[str] = ()) -> tuple[OutputMap, ...]:
    stream = {str(local_dir(s, "streaming")) for s in streaming}
    out = []
    for src, dst in _pairs(raw, "OutputMapping"):
        where = f"OutputMapping[{src!r}]"
        local = local_dir(src, where)
        out.append(OutputMap(local, _oss_dir(dst, where), str(local) in stream))
    unknown = stream - {str(o.local) for o in out}
    if unknown:
        raise BadInput(f"streaming: {sorted(unknown)[0]} is not an OutputMapping directory")
    return tuple(out)


def parse_log_mapping(raw: Any) -> tuple[LogMap, ...]:
    out = []
    for src, dst in _pairs(raw, "LogMapping"):
        where = f"LogMapping[{src!r}]"
        out.append(LogMap(local_dir(src, where), _oss(dst, where)))
    return tuple(out)


def parse_package_path(raw: Any, where: str = "PackagePath") -> OssUrl:
    url = _oss(raw, where)
    if url.is_dir or not url.key.endswith(PACKAGE_SUFFIXES):
        raise BadInput(f"{where}: {raw!r} must name a .tar.gz, .tgz or .tar object")
    return url


def parse_redirect(raw: Any, where: str) -> OssUrl | None:
    if raw is None or raw == "":
        return None
    url = _oss(raw, where)
    if not url.is_dir:
        raise BadInput(f"{where}: {raw!r} must be an OSS directory (end it with '/')")
    return url


def parse_mount_entries(raw: Any) -> tuple[MountEntry, ...]:
    table = _table(raw, "Mounts")
    entries = table.get("Entries", [])
    # The guide shows one entry as a bare object as well as a list of them.
    if isinstance(entries, Mapping):
        entries = [entries]
    if not isinstance(entries, list):
        raise BadInput("Mounts.Entries: want a list of {Source, Destination, WriteSupport}")
    return tuple(mount_entry(e, f"Mounts.Entries[{i}]") for i, e in enumerate(entries))


def parse_config(raw: Any, where: str) -> MountConfig:
    table = _table(raw, where)
    unknown = set(table) - {"Locale", "Lock", "Entries"}
    if unknown:
        raise BadInput(f"{where}: unknown field {sorted(unknown)[0]!r} (known: Locale, Lock)")
    locale = table.get("Locale", "")
    if locale is None:
        locale = ""
    if not isinstance(locale, str):  # a false or 0 is not "no locale": refused, not coerced
        raise BadInput(f"{where}.Locale: want a string such as \"UTF-8\", got {locale!r}")
    if locale.strip().lower() not in UTF8_LOCALES:
        raise BadInput(f"{where}.Locale: {locale!r} is not supported; OSS and NAS names are "
                       "served as UTF-8 (set Locale to UTF-8 or leave it out)")
    lock = table.get("Lock", False)
    if not isinstance(lock, bool):
        raise BadInput(f"{where}.Lock: want true or false, got {lock!r}")
    return MountConfig(locale, lock)


def parse_mount_spec(text: str, where: str = "mount") -> MountEntry:
    """``SOURCE:DEST`` as ``bcs sub -r`` writes it (``oss://b/dir/:/mnt/dir``)."""
    source, sep, dest = text.rpartition(":")
    if not sep or not source or not dest.startswith("/"):
        raise BadInput(f"{where}: want SOURCE:/local/dir, got {text!r}")
    return mount_entry({"Source": source, "Destination": dest}, where)


def parse_output_spec(text: str, where: str = "output") -> OutputMap:
    """``/local/dir/:oss://bucket/dir/``: a directory whose files go to an OSS directory."""
    local, sep, dest = text.partition(":oss://")
    if not sep or not local.startswith("/"):
        raise BadInput(f"{where}: want /local/dir/:oss://bucket/dir/, got {text!r}")
    return OutputMap(local_dir(local, where), _oss_dir("oss://" + dest, where))


def mount_entry(raw: Any, where: str) -> MountEntry:
    entry = _table(raw, where)
    unknown = set(entry) - {"Source", "Destination", "WriteSupport"}
    if unknown:
        raise BadInput(f"{where}: unknown field {sorted(unknown)[0]!r} "
                       "(known: Source, Destination, WriteSupport)")
    src, dst = entry.get("Source"), entry.get("Destination")
    if not isinstance(src, str) or not src:
        raise BadInput(f"{where}.Source: want oss://bucket/dir/ or nas://host:/path/")
    write = entry.get("WriteSupport", False)
    if not isinstance(write, bool):
        raise BadInput(f"{where}.WriteSupport: want true or false, got {write!r}")
    source: OssUrl | NasSource
    if src.startswith("nas://"):
        source = NasSource.parse(src, f"{where}.Source")
    elif src.startswith("oss://"):
        source = _oss_dir(src, f"{where}.Source")
        if write:
            raise BadInput(f"{where}: writable OSS mounts are not supported; mount it read-only "
                           "(WriteSupport: false) and upload results with an OutputMapping")
    else:
        raise BadInput(f"{where}.Source: {src!r} must start with oss:// or nas://")
    return MountEntry(source, local_dir(dst, f"{where}.Destination"), write)


# -- rules ---------------------------------------------------------------------------------

def check(m: Mappings) -> None:
    """Rules between mappings: which local directories may coexist."""
    seen: dict[str, str] = {}
    for label, local in _claims(m):
        key = str(local)
        if key in seen:
            raise BadInput(_conflict(seen[key], label, key))
        seen[key] = label
    # A mount or an upload directory inside another would hide or upload the other.
    claims = sorted(_claims(m), key=lambda c: len(c[1].parts))
    for i, (outer_label, outer) in enumerate(claims):
        for inner_label, inner in claims[i + 1:]:
            if inner.is_relative_to(outer) and inner != outer:
                raise BadInput(f"{inner_label}: {inner} is inside {outer} of {outer_label}; "
                               "use directories that do not contain each other")
    dests: dict[str, str] = {}
    for out in m.outputs:
        key = f"{out.dest.bucket}/{out.dest.prefix}"
        if key in dests:
            raise BadInput(f"OutputMapping: {dests[key]} and {out.local} both upload to "
                           f"{out.dest}; give each its own OSS directory")
        dests[key] = str(out.local)


def _claims(m: Mappings) -> list[tuple[str, PurePosixPath]]:
    claims = [(f"InputMapping[{str(i.source)!r}]", i.local) for i in m.inputs]
    claims += [(f"OutputMapping[{str(o.local)!r}]", o.local) for o in m.outputs]
    claims += [(f"Mounts entry {e.source}", e.destination) for e in m.mounts]
    return claims


def _conflict(first: str, second: str, local: str) -> str:
    kinds = {first.split("[", 1)[0].split(" ", 1)[0], second.split("[", 1)[0].split(" ", 1)[0]}
    if kinds == {"InputMapping", "OutputMapping"}:
        return (f"{second}: {local} is also in {first}; InputMapping and OutputMapping may not "
                "share a local directory (read inputs from one, write outputs to another)")
    return (f"{second}: {local} is also the local directory of {first}; two sources may not "
            "map to one local directory")


def local_dir(raw: Any, where: str) -> PurePosixPath:
    """An absolute, normalised local path that is not a system directory."""
    if not isinstance(raw, str) or not raw:
        raise BadInput(f"{where}: want an absolute local path such as /home/admin/data/")
    if not raw.startswith("/"):
        raise BadInput(f"{where}: local path {raw!r} must be absolute (start with '/')")
    _check_plain_path(raw, where, "local path")
    path = PurePosixPath(raw)
    if str(path) == "/":
        raise BadInput(f"{where}: the local path may not be '/'; name a directory under it")
    for root in FORBIDDEN_ROOTS:
        if path == PurePosixPath(root) or path.is_relative_to(root):
            raise BadInput(f"{where}: {raw!r} is under the system directory {root}; "
                           "use a directory such as /home/admin/data/")
    return path


def _check_plain_path(raw: str, where: str, what: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise BadInput(f"{where}: {what} {raw.encode('unicode_escape').decode()!r} "
                       "contains a control character")
    if any(p in (".", "..") for p in raw.split("/")):
        raise BadInput(f"{where}: {what} {raw!r} has a '.' or '..' segment; write it plainly")
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadInput(f"{where}: {what} {raw!r} is not valid UTF-8") from None
    # Linux's NAME_MAX and PATH_MAX: refused here, not by mkdir once the run has begun.
    if size > 4095 or any(len(p.encode("utf-8")) > 255 for p in raw.split("/")):
        raise BadInput(f"{where}: {what} {raw[:48]!r}... is too long: at most 255 bytes "
                       "a name, 4095 in all")


def _oss(raw: Any, where: str) -> OssUrl:
    if not isinstance(raw, str) or not raw:
        raise BadInput(f"{where}: want an OSS URL such as oss://bucket/dir/")
    return OssUrl.parse(raw, where)


def _oss_dir(raw: Any, where: str) -> OssUrl:
    url = _oss(raw, where)
    if not url.is_dir:
        raise BadInput(f"{where}: {raw!r} must be an OSS directory (end it with '/')")
    return url


def _pairs(raw: Any, where: str) -> list[tuple[str, str]]:
    table = _table(raw, where)
    out = []
    for k, v in table.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise BadInput(f"{where}: want string keys and values, got {k!r}: {v!r}")
        out.append((k, v))
    return out


def _table(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise BadInput(f"{where}: want a JSON object, got {type(raw).__name__}")
    return raw


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host))


# -- stdout/stderr object names ------------------------------------------------------------

def redirect_object(base: OssUrl, stream: str, job_id: str, task: str, instance: int) -> OssUrl:
    """``<base>/stdout.<job-id>.<task>.<instance>`` as BatchCompute names it."""
    if stream not in _REDIRECT_STREAMS:
        raise ValueError(f"stream: want stdout or stderr, got {stream!r}")
    if instance < 0:
        raise BadInput(f"instance: want a 0-based index, got {instance}")
    for what, value in (("job id", job_id), ("task name", task)):
        if not value or "/" in value or value in (".", ".."):
            raise BadInput(f"{what}: {value!r} cannot be part of an object name")
    return base.join(f"{stream}.{job_id}.{task}.{instance}")


__all__ = [
    "InputMap",
    "LogMap",
    "Mappings",
    "MountConfig",
    "MountEntry",
    "NasSource",
    "OutputMap",
    "check",
    "local_dir",
    "mount_entry",
    "parse_input_mapping",
    "parse_log_mapping",
    "parse_mount_entries",
    "parse_mount_spec",
    "parse_output_mapping",
    "parse_package_path",
    "parse_redirect",
    "parse_task",
    "redirect_object",
]
