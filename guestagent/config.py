"""Typed settings: ``/etc/guestagent/agent.toml`` (or ``--config``/``GUESTAGENT_CONFIG``),
then ``GUESTAGENT_<SECTION>_<KEY>`` environment overrides.

Each capability owns its section as a frozen dataclass (``guestagent/<cap>/settings.py``);
this module only knows how to load and validate them. Validation happens once, at start:
an unknown key, a wrong type or a bad value is a one-line :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from guestagent.checks import check_url
from guestagent.credentials.settings import CredentialSettings
from guestagent.daemon.settings import DaemonSettings
from guestagent.files import read_input
from guestagent.metadata.settings import MetadataSettings
from guestagent.migrate.settings import MigrateSettings
from guestagent.spot.settings import SpotSettings
from guestagent.storage.settings import StorageSettings
from guestagent.tasks.settings import TasksSettings
from guestagent.userdata.settings import UserdataSettings

DEFAULT_PATH = Path("/etc/guestagent/agent.toml")
ENV_PREFIX = "GUESTAGENT_"
MASK = "********"


__all__ = ["ConfigError", "Settings", "as_dict", "check_url", "config_path", "from_mapping",
           "is_secret", "load", "secret"]


class ConfigError(Exception):
    """A setting is unknown, mistyped or out of range; the message names it."""


def secret() -> Any:
    """Field metadata marking a value that ``config show`` must mask."""
    return {"secret": True}


@dataclass(frozen=True)
class Settings:
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    spot: SpotSettings = field(default_factory=SpotSettings)
    userdata: UserdataSettings = field(default_factory=UserdataSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    tasks: TasksSettings = field(default_factory=TasksSettings)
    migrate: MigrateSettings = field(default_factory=MigrateSettings)


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load settings from the file (absent is fine unless named explicitly) and the env."""
    env = os.environ if environ is None else environ
    explicit = path or env.get(ENV_PREFIX + "CONFIG")
    file = config_path(path) if path else (Path(explicit) if explicit else DEFAULT_PATH)
    raw: dict[str, Any] = {}
    if file.exists():
        try:
            # abspath: a settings file named "-" is that file, not standard input.
            raw = tomllib.loads(read_input(os.path.abspath(file)).decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
        except RecursionError:  # tomllib recurses per nesting level
            raise ConfigError(f"{file}: not valid TOML: nested too deeply") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from exc
    elif explicit:
        raise ConfigError(f"{file}: config file not found")
    return from_mapping(raw, env, source=str(file))


def from_mapping(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: str = "config"
) -> Settings:
    env = {} if environ is None else environ
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Settings)}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(known)})")
    for name, fld in known.items():
        table = raw.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        cls = _resolve(Settings, fld.name)
        sections[name] = _build_section(cls, name, table, env, source)
    return Settings(**sections)


def _resolve(owner: type, attr: str) -> Any:
    return typing.get_type_hints(owner)[attr]


def _build_section(
    cls: type, section: str, table: Mapping[str, Any], env: Mapping[str, str], source: str
) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {section}.{key} (known: {', '.join(sorted(fields))})"
            )
    values: dict[str, Any] = {}
    for name in fields:
        where = f"{section}.{name}"
        env_key = f"{ENV_PREFIX}{section}_{name}".upper()
        if env_key in env:
            values[name] = _from_env(hints[name], env[env_key], f"{env_key} ({where})")
        elif name in table:
            values[name] = _coerce(hints[name], table[name], f"{source}: {where}")
    try:
        obj = cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: [{section}] {exc}") from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            # Name where the bad value came from: the env variable or the file.
            key = str(exc).split(":", 1)[0]
            env_key = f"{ENV_PREFIX}{section}_{key}".upper()
            origin = f"{env_key} ({section}.{key})" if env_key in env else None
            if origin:
                raise ConfigError(f"{origin}: {str(exc).split(':', 1)[1].strip()}") from exc
            raise ConfigError(f"{source}: {section}.{exc}") from exc
    return obj


def _from_env(tp: Any, text: str, where: str) -> Any:
    base = _strip_optional(tp)
    if base is bool:
        low = text.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{where}: expected a boolean, got {text!r}")
    if base in (int, float):
        try:
            return _coerce(tp, base(text), where)
        except ValueError:
            raise ConfigError(f"{where}: expected {base.__name__}, got {text!r}") from None
    if typing.get_origin(base) is list:
        items = [p.strip() for p in text.split(",") if p.strip()]
        return _coerce(tp, items, where)
    if tp is not base and text == "":
        return None
    return _coerce(tp, text, where)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if value is None and _strip_optional(tp) is not tp:
        return None
    base = _strip_optional(tp)
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(base)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    scalar = _SCALARS.get(base)
    if scalar is None:  # pragma: no cover - a section declared a type this loader lacks
        raise ConfigError(f"{where}: unsupported setting type {base!r}")
    accepts, convert, want = scalar
    if not accepts(value):
        raise ConfigError(f"{where}: expected {want}, got {value!r}")
    return convert(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# type -> (accepts the TOML value?, conversion, what the message asks for)
_SCALARS: dict[Any, tuple[Any, Any, str]] = {
    bool: (lambda v: isinstance(v, bool), lambda v: v, "true or false"),
    int: (_is_int, lambda v: v, "an integer"),
    # nan/inf would pass every "> 0" check and then break a timeout or a sleep.
    float: (lambda v: _is_int(v) or (isinstance(v, float) and math.isfinite(v)), float,
            "a finite number"),
    str: (lambda v: isinstance(v, str), lambda v: v, "a string"),
    Path: (lambda v: isinstance(v, str) and bool(v), Path, "a path string"),
}


def is_secret(cls: type, name: str) -> bool:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return bool(f.metadata.get("secret"))
    return False


def as_dict(settings: Settings, *, mask: bool = True) -> dict[str, dict[str, Any]]:
    """The effective settings as plain data, secrets masked (for ``config show``)."""
    out: dict[str, dict[str, Any]] = {}
    for sf in dataclasses.fields(settings):
        section = getattr(settings, sf.name)
        table: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if mask and f.metadata.get("secret") and value:
                value = MASK
            elif isinstance(value, Path):
                value = str(value)
            table[f.name] = value
        out[sf.name] = table
    return out
