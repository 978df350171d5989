"""User-data templates: data files (``*.toml``) in the top-level ``userdata/`` directory.

A template declares typed parameters and the ``#cloud-config`` it stands for, with
``{{param}}`` placeholders (a whole-string placeholder keeps the value's type; inside a
string a list is space-joined), tables or ``_if`` fragments kept only ``_when`` their
conditions hold (``param``, ``!param``, ``param=value``, comma-separated, all must hold),
and empty values dropped. The shell form is generated from that same document
(:mod:`guestagent.userdata.shell`), so both forms make the same changes.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestagent.files import read_input
from guestagent.userdata import checks
from guestagent.userdata.errors import UserdataError

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*(?:\|\s*([a-z]+)\s*)?\}\}")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")

_SCALARS: dict[str, Callable[[object, str], Any]] = {
    "ip": checks.ip,
    "host": checks.host,
    "hostname": checks.hostname,
    "url": lambda v, w: checks.url(v, w, ("http", "https", "ftp", "file")),
    "account": checks.account,
    "word": checks.word,
    "repo-id": checks.repo_id,
    "path": checks.abs_path,
    "text": lambda v, w: checks.text(v, w, max_len=256),
    "bool": checks.boolean,
    "ssh-key": checks.ssh_key,
    "resolv-option": checks.resolv_option,
}
_LISTS = {f"{t}-list": t for t in ("ip", "host", "hostname", "account", "word", "ssh-key")}
_LISTS["resolv-options"] = "resolv-option"
TYPES = (*_SCALARS, *_LISTS, "choice")


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    required: bool = False
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    params: dict[str, Param]
    body: dict[str, Any]
    path: Path


def search_path(configured: Path | None = None) -> list[Path]:
    """Where templates are looked for: the configured directory, else the checkout
    (``pip install -e .``), else the installed ``share/guestagent/userdata``."""
    if configured is not None:
        return [configured]
    return [
        Path(__file__).resolve().parents[2] / "userdata",
        Path(sys.prefix) / "share" / "guestagent" / "userdata",
        Path("/usr/local/share/guestagent/userdata"),
        Path("/usr/share/guestagent/userdata"),
    ]


def templates_dir(configured: Path | None = None) -> Path:
    for d in search_path(configured):
        if d.is_dir() and any(d.glob("*.toml")):
            return d
    where = ", ".join(str(p) for p in search_path(configured))
    raise UserdataError(f"no user-data templates found (looked in {where})")


def names(configured: Path | None = None) -> list[str]:
    return sorted(p.stem for p in templates_dir(configured).glob("*.toml"))


def load(name: str, configured: Path | None = None) -> Template:
    if not _NAME.fullmatch(name):
        raise UserdataError(f"{name!r} is not a template name")
    directory = templates_dir(configured)
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise UserdataError(f"no template {name!r} (have: {', '.join(names(configured))})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserdataError(f"{path}: not valid TOML: {exc or 'nested too deeply'}") from None
    params: dict[str, Param] = {}
    for pname, spec in raw.get("params", {}).items():
        ptype = spec.get("type", "text")
        if ptype not in TYPES:
            raise UserdataError(f"{path}: params.{pname}: unknown type {ptype!r}")
        params[pname] = Param(
            pname,
            ptype,
            bool(spec.get("required", False)),
            spec.get("default"),
            str(spec.get("help", "")),
            tuple(spec.get("choices", ())),
        )
    body = raw.get("cloud-config")
    if not isinstance(body, dict):
        raise UserdataError(f"{path}: no [cloud-config] table")
    return Template(name, str(raw.get("description", "")), params, body, path)


def parse_params(tpl: Template, pairs: Sequence[str]) -> dict[str, Any]:
    """``k=v`` strings from the command line (repeat a key or use commas for lists;
    ``k=@FILE`` reads the value from a file) into typed values."""
    raw: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in tpl.params:
            known = ", ".join(tpl.params)
            raise UserdataError(
                f"--param {pair.split('=')[0]!r}: template {tpl.name} takes {known}"
            )
        if value.startswith("@"):
            try:
                value = read_input(Path(value[1:]).expanduser()).decode().strip()
            except UnicodeDecodeError as exc:
                raise UserdataError(
                    f"--param {key}: {value[1:]} is not UTF-8 text (byte {exc.start})"
                ) from None
            except OSError as exc:
                raise UserdataError(
                    f"--param {key}: cannot read {value[1:]}: {exc.strerror}"
                ) from None
        raw.setdefault(key, []).append(value)
    values: dict[str, Any] = {}
    for key, items in raw.items():
        p = tpl.params[key]
        if p.type in _LISTS:
            sep = "\n" if p.type == "ssh-key-list" else ","
            values[key] = [v.strip() for item in items for v in item.split(sep) if v.strip()]
        elif len(items) > 1:
            raise UserdataError(f"--param {key}: given more than once")
        else:
            values[key] = items[0]
    return values


def check_params(tpl: Template, values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate every parameter (refusing unknown ones) and fill in defaults."""
    unknown = set(values) - set(tpl.params)
    if unknown:
        raise UserdataError(f"{tpl.name}: unknown parameter(s) {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name, p in tpl.params.items():
        where = f"{tpl.name}: {name}"
        if name not in values or values[name] in (None, "", []):
            if p.required:
                raise UserdataError(
                    f"{where}: required ({p.help})" if p.help else f"{where}: required"
                )
            out[name] = p.default
            if p.type == "resolv-options":
                out[name] = _resolv_options(p.default or [], where)
            continue
        out[name] = _typed(p, values[name], where)
    return out


def _typed(p: Param, value: Any, where: str) -> Any:
    if p.type == "choice":
        if value not in p.choices:
            raise UserdataError(f"{where}: must be one of {', '.join(p.choices)}, got {value!r}")
        return value
    if p.type in _LISTS:
        items = value if isinstance(value, list) else [value]
        if p.type == "resolv-options":
            return _resolv_options(items, where)
        check = _SCALARS[_LISTS[p.type]]
        return [check(v, f"{where}[{i}]") for i, v in enumerate(items)]
    return _SCALARS[p.type](value, where)


def _resolv_options(items: Sequence[Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, item in enumerate(items):
        opt = checks.resolv_option(item, f"{where}[{i}]")
        key, _, num = opt.partition(":")
        out[key] = int(num) if num else True
    return out


def render(tpl: Template, values: Mapping[str, Any]) -> dict[str, Any]:
    """The cloud-config document for validated parameter ``values``."""
    params = check_params(tpl, values)
    doc = _expand(tpl.body, params, tpl.name)
    return doc if isinstance(doc, dict) else {}


def _holds(cond: str, params: Mapping[str, Any], where: str) -> bool:
    for term in (t.strip() for t in cond.split(",") if t.strip()):
        negate = term.startswith("!")
        name, eq, want = term.lstrip("!").partition("=")
        if name not in params:
            raise UserdataError(f"{where}: _when names unknown parameter {name!r}")
        value = params[name]
        ok = str(value) == want if eq else bool(value)
        if ok == negate:
            return False
    return True


def _expand(node: Any, params: Mapping[str, Any], where: str) -> Any:
    if isinstance(node, dict):
        return _expand_mapping(node, params, where)
    if isinstance(node, list):
        items = [_expand(v, params, where) for v in node]
        return [v for v in items if v is not None and v != ""]
    if isinstance(node, str):
        return _expand_text(node, params, where)
    return node


def _expand_mapping(node: dict[str, Any], params: Mapping[str, Any], where: str) -> Any:
    """A mapping without its empty values; ``_when`` drops it, ``_if`` fragments merge in."""
    if "_when" in node and not _holds(str(node["_when"]), params, where):
        return None
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("_when", "_if"):
            continue
        v = _expand(value, params, where)
        if v is not None and not _empty(v):
            k = _expand(key, params, where)
            out[str(k)] = v
    for frag in node.get("_if", []):
        part = _expand(frag, params, where)
        if part:
            out = _merge(out, part)
    return out or None


def _expand_text(node: str, params: Mapping[str, Any], where: str) -> Any:
    """A lone placeholder keeps its value's type; placeholders inside text become text."""
    whole = _PLACEHOLDER.fullmatch(node)
    if whole:
        return _filter(params[_known(whole.group(1), params, where)], whole.group(2), where)
    return _PLACEHOLDER.sub(
        lambda m: _as_text(
            _filter(params[_known(m.group(1), params, where)], m.group(2), where)
        ),
        node,
    )


def _empty(value: Any) -> bool:
    return isinstance(value, str | list | dict) and len(value) == 0


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def _known(name: str, params: Mapping[str, Any], where: str) -> str:
    if name not in params:
        raise UserdataError(f"{where}: placeholder names unknown parameter {name!r}")
    return name


def _filter(value: Any, name: str | None, where: str) -> Any:
    if name is None:
        return value
    if name == "path":
        if not isinstance(value, str) or not value.startswith("file:///"):
            raise UserdataError(f"{where}: want a file:///path here (an apt keyring in the image)")
        return value[len("file://") :]
    raise UserdataError(f"{where}: unknown filter {name!r}")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(_as_text(v) for v in value)
    return "" if value is None else str(value)
