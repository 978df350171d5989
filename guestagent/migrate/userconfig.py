"""``user_config.json``: the migration's settings, exactly as the guide's template and tables.

Every rule is checked before anything is contacted or written; each violation is one line
naming the field and the rule, and all of them are reported at once so the user fixes the
file in one go. The secret key is kept out of ``repr`` and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guestagent.migrate.errors import ConfigInvalid

log = logging.getLogger(__name__)

GIB = 1024**3
PLATFORMS = (
    "CentOS", "Ubuntu", "SUSE", "OpenSUSE", "Debian", "RedHat", "Others Linux",
    "Windows Server 2003", "Windows Server 2008", "Windows Server 2012", "Windows Server 2016",
)
ARCHITECTURES = ("i386", "x86_64")
TOP_FIELDS = ("access_id", "secret_key", "region_id", "image_name", "system_disk_size",
              "platform", "architecture", "data_disks", "bandwidth_limit")
REQUIRED = ("access_id", "secret_key", "region_id", "image_name", "system_disk_size")
DISK_FIELDS = ("data_disk_index", "data_disk_size", "src_path")
MAX_DATA_DISKS = 16
SYSTEM_DISK_GB = (40, 500)
DATA_DISK_GB = (5, 2000)
IMAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{1,127}")
REGION = re.compile(r"[a-z]{2,}(-[a-z0-9]+){1,4}")
ACCESS_ID = re.compile(r"[A-Za-z0-9]{8,128}")


@dataclass(frozen=True)
class DataDisk:
    index: int
    size_gb: int
    src_path: str


@dataclass(frozen=True)
class UserConfig:
    path: Path
    access_id: str
    secret_key: str = field(repr=False)
    region_id: str = ""
    image_name: str = ""
    system_disk_size: int = 40
    platform: str | None = None
    architecture: str | None = None
    data_disks: tuple[DataDisk, ...] = ()
    bandwidth_limit: int = 0

    @property
    def directory(self) -> Path:
        """Where client_data and Logs/ live: beside the config, as the real tool keeps them."""
        return self.path.parent


def load(path: Path, root: Path = Path("/"),
         used: Callable[[Path, Iterable[Path]], int] | None = None) -> UserConfig:
    """Read and check ``path``; raise :class:`ConfigInvalid` listing every violation.

    ``root`` is the tree being migrated (data disk ``src_path`` values are inside it);
    ``used`` measures the space used under a path (tests and ``check`` pass the real one).
    """
    raw = _parse(path)
    problems: list[str] = []
    values = _fields(raw, problems)
    disks = _data_disks(raw.get("data_disks", []), root, problems)
    if used is not None and not problems:
        _sizes(values, disks, root, used, problems)
    if problems:
        raise ConfigInvalid(problems)
    warn_if_readable(path)
    return UserConfig(path=path.resolve(), data_disks=tuple(disks), **values)


def warn_if_readable(path: Path) -> str | None:
    """Warn (and return the warning) when others may read the file holding the secret."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        text = (f"{path}: readable by others (mode {stat.S_IMODE(mode):04o}) and it holds "
                f"secret_key: run `chmod 600 {path}`")
        log.warning("%s", text)
        return text
    return None


def _parse(path: Path) -> dict[str, Any]:
    name = path.name
    data = _json(_text(path), name)
    if not isinstance(data, dict):
        raise ConfigInvalid([f"{name}: must be a JSON object {{...}} as in the template"])
    return data


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigInvalid([f"{path}: not found (copy the template and fill it in)"]) from None
    except OSError as exc:
        raise ConfigInvalid([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([f"{path.name}: not UTF-8 text (byte {exc.start})"]) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(f"field {key!r} appears twice")
        seen[key] = value
    return seen


def _json(text: str, name: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigInvalid(
            [f"{name}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"]
        ) from None
    except _Duplicate as exc:
        raise ConfigInvalid([f"{name}: {exc}: keep one"]) from None
    except ValueError:  # json's int() past Python's digit limit
        raise ConfigInvalid([f"{name}: invalid JSON: a number has too many digits"]) from None
    except RecursionError:
        raise ConfigInvalid([f"{name}: invalid JSON: nested too deeply"]) from None


class _Duplicate(ValueError):
    """A field given twice (json's pairs hook can only raise)."""


def _fields(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    _names(raw, TOP_FIELDS, REQUIRED, "", problems)
    out: dict[str, Any] = {}
    strings = ("access_id", "secret_key", "region_id", "image_name", "platform", "architecture")
    out.update(_typed(raw, strings, str, "", problems))
    out.update(_typed(raw, ("system_disk_size", "bandwidth_limit"), int, "", problems))
    _check_keys(out, problems)
    _check_names(out, problems)
    _check_numbers(out, problems)
    for key in ("platform", "architecture"):
        if out.get(key) == "":
            out[key] = None
    return out


def _names(raw: dict[str, Any], known: tuple[str, ...], required: tuple[str, ...],
           where: str, problems: list[str]) -> None:
    """Unknown and missing fields, in the file's order then the template's."""
    problems.extend(f"{where}{key}: unknown field (the fields are: {', '.join(known)})"
                    for key in raw if key not in known)
    problems.extend(f"{where}{key}: required field missing" for key in required
                    if key not in raw)


def _typed(raw: dict[str, Any], keys: tuple[str, ...], kind: type, where: str,
           problems: list[str]) -> dict[str, Any]:
    """The ``keys`` present in ``raw`` whose value has ``kind`` (a bool is no integer)."""
    out: dict[str, Any] = {}
    label = "a string" if kind is str else "an integer"
    for key in keys:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            problems.append(f"{where}{key}: must be {label}, got {_kind(value)}")
        else:
            out[key] = value
    return out


def _check_keys(out: dict[str, Any], problems: list[str]) -> None:
    if out.get("access_id") == "":
        problems.append("access_id: empty: fill in your AccessKey ID")
    elif "access_id" in out and not ACCESS_ID.fullmatch(out["access_id"]):
        problems.append("access_id: must be an AccessKey ID (8-128 letters and digits)")
    secret = out.get("secret_key")
    if secret == "":
        problems.append("secret_key: empty: fill in your AccessKey secret")
    elif secret is not None and not (secret.isascii() and secret.isprintable()
                                     and not any(c.isspace() for c in secret)):
        problems.append("secret_key: must be the AccessKey secret (printable, no spaces)")


def _check_names(out: dict[str, Any], problems: list[str]) -> None:
    region = out.get("region_id")
    if region == "":
        problems.append("region_id: empty: name the target region, e.g. cn-hangzhou")
    elif region is not None and not REGION.fullmatch(region):
        problems.append(f"region_id: {region!r} is not a region ID (e.g. cn-hangzhou)")
    problem = image_name_problem(out["image_name"]) if "image_name" in out else None
    if problem:
        problems.append(f"image_name: {problem}")
    platform = out.get("platform")
    if platform and platform not in PLATFORMS:
        hint = next((p for p in PLATFORMS if p.lower() == platform.lower()), None)
        problems.append(
            f"platform: {platform!r} is not one of {', '.join(PLATFORMS)} (case-sensitive"
            + (f"; did you mean {hint!r}?)" if hint else ")"))
    arch = out.get("architecture")
    if arch and arch not in ARCHITECTURES:
        problems.append(f"architecture: {arch!r} must be i386 or x86_64")


def image_name_problem(name: str) -> str | None:
    if name.lower().startswith(("http://", "https://")):
        return "must not start with http:// or https://"
    if not 2 <= len(name) <= 128:
        return f"must be 2 to 128 characters, got {len(name)}"
    if not name[0].isascii() or not name[0].isalpha():
        return "must start with a letter"
    if not IMAGE_NAME.fullmatch(name):
        return "may hold only letters, digits, '.', '_' and '-'"
    return None


def _check_numbers(out: dict[str, Any], problems: list[str]) -> None:
    size = out.get("system_disk_size")
    low, high = SYSTEM_DISK_GB
    if size is not None and not low <= size <= high:
        problems.append(f"system_disk_size: must be {low} to {high} (GB), got {size}")
    limit = out.get("bandwidth_limit")
    if limit is not None and limit < 0:
        problems.append(f"bandwidth_limit: must be >= 0 (KB/s, 0 = no limit), got {limit}")


def _data_disks(raw: Any, root: Path, problems: list[str]) -> list[DataDisk]:
    if not isinstance(raw, list):
        problems.append(f"data_disks: must be a list [...], got {_kind(raw)}")
        return []
    if len(raw) > MAX_DATA_DISKS:
        problems.append(f"data_disks: at most {MAX_DATA_DISKS} data disks, got {len(raw)}")
    disks: list[DataDisk] = []
    seen_index: set[int] = set()
    seen_path: set[str] = set()
    for n, entry in enumerate(raw):
        where = f"data_disks[{n}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object with {', '.join(DISK_FIELDS)}")
            continue
        index, src = entry.get("data_disk_index"), entry.get("src_path")
        if isinstance(index, int) and index in seen_index:
            problems.append(f"{where}.data_disk_index: {index} is used twice")
        if isinstance(src, str) and os.path.normpath(src) in seen_path:
            problems.append(f"{where}.src_path: {src} is listed twice")
        if isinstance(index, int):
            seen_index.add(index)
        if isinstance(src, str):
            seen_path.add(os.path.normpath(src))
        disk = _data_disk(entry, where, root, problems)
        if disk is not None:
            disks.append(disk)
    return disks


def _data_disk(entry: dict[str, Any], where: str, root: Path,
               problems: list[str]) -> DataDisk | None:
    before = len(problems)
    _names(entry, DISK_FIELDS, DISK_FIELDS, f"{where}.", problems)
    numbers = _typed(entry, ("data_disk_index", "data_disk_size"), int, f"{where}.", problems)
    index, size = numbers.get("data_disk_index"), numbers.get("data_disk_size")
    if index is not None and not 1 <= index <= MAX_DATA_DISKS:
        problems.append(f"{where}.data_disk_index: must be 1 to 16, got {index}")
    low, high = DATA_DISK_GB
    if size is not None and not low <= size <= high:
        problems.append(f"{where}.data_disk_size: must be {low} to {high} (GB), got {size}")
    src = entry.get("src_path")
    if "src_path" in entry:
        _check_src(src, where, root, problems)
    if len(problems) > before:
        return None
    assert isinstance(index, int) and isinstance(size, int) and isinstance(src, str)
    return DataDisk(index, size, os.path.normpath(src))


def _check_src(src: Any, where: str, root: Path, problems: list[str]) -> None:
    if not isinstance(src, str):
        problems.append(f"{where}.src_path: must be a string, got {_kind(src)}")
    elif not src.startswith("/") or re.fullmatch(r"[A-Za-z]:\\?", src):
        problems.append(f"{where}.src_path: {src!r} must be an absolute path on this "
                        "Linux server, e.g. /mnt/disk1")
    elif not src.isprintable():
        problems.append(f"{where}.src_path: {src!r} contains a control character")
    elif os.path.normpath(src) == "/":
        problems.append(f"{where}.src_path: / is the system disk, not a data disk")
    else:
        _check_src_dir(src, where, in_root(root, src), problems)


def _check_src_dir(src: str, where: str, inside: Path, problems: list[str]) -> None:
    try:
        is_dir = inside.is_dir()
    except OSError as exc:  # a name too long, a permission: one line, not a traceback
        problems.append(f"{where}.src_path: {src[:64]}...: {exc.strerror}")
        return
    if not is_dir:
        problems.append(f"{where}.src_path: {src} does not exist")
    elif not os.path.ismount(inside):
        problems.append(f"{where}.src_path: {src} is not a mount point (name the "
                        "directory where the data disk is mounted)")


def _sizes(values: dict[str, Any], disks: list[DataDisk], root: Path,
           used: Callable[[Path, Iterable[Path]], int], problems: list[str]) -> None:
    skip = [in_root(root, d.src_path) for d in disks]
    system = used(root, skip)
    if values["system_disk_size"] * GIB <= system:
        problems.append(
            f"system_disk_size: must be larger than the space used on the system disk "
            f"({_gb(system)}), got {values['system_disk_size']}")
    for n, disk in enumerate(disks):
        taken = used(in_root(root, disk.src_path), [])
        if disk.size_gb * GIB <= taken:
            problems.append(
                f"data_disks[{n}].data_disk_size: must be larger than the space used on "
                f"{disk.src_path} ({_gb(taken)}), got {disk.size_gb}")


def in_root(root: Path, path: str) -> Path:
    """``path`` (absolute, as on the server) inside the migrated tree ``root``."""
    return root / path.lstrip("/")


def _gb(n: int) -> str:
    return f"{n / GIB:.1f} GB"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "an integer", float: "a decimal number", type(None): "null"}.get(
        type(value), type(value).__name__)
