"""The rules one field of a job must pass: names, OSS paths, local paths, env vars, images.

Each check raises :class:`JobError` with one line naming the field (``where``), what is
wrong and what to do. OSS names, local paths and mappings are the storage capability's
rules (``guestagent.storage.ossurl``, ``guestagent.storage.mappings``), applied through
:func:`storage_rules`: this module keeps only what is the launcher's own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

from guestagent.storage.errors import BadInput
from guestagent.storage.ossurl import OssUrl
from guestagent.tasks.errors import JobError

# Task names end up in file names, log object names and env values: keep them plain.
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A Docker image reference: [host[:port]/]path[:tag][@sha256:hex], per the distribution
# reference grammar (lower-case path components, tag of at most 128 word characters).
_IMAGE = re.compile(
    r"(?:(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
# Set by the launcher for every instance; a job may not override them.
RESERVED_PREFIX = "BATCH_COMPUTE_"
# The two BATCH_COMPUTE_ variables a job sets itself (Docker mode).
DOCKER_IMAGE_VAR = "BATCH_COMPUTE_DOCKER_IMAGE"
DOCKER_REGISTRY_VAR = "BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH"
USER_SETTABLE = frozenset({DOCKER_IMAGE_VAR, DOCKER_REGISTRY_VAR})


def task_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise JobError(
            f"{where}: task name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


def env_name(name: str, where: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise JobError(
            f"{where}: {name!r} is not an environment variable name: use letters, digits "
            "and '_', not starting with a digit"
        )
    if name.startswith(RESERVED_PREFIX) and name not in USER_SETTABLE:
        raise JobError(
            f"{where}: {name} is set by the launcher for every instance and cannot be "
            f"overridden: remove it (only {', '.join(sorted(USER_SETTABLE))} may be set)"
        )
    return name


def env_value(value: object, where: str) -> str:
    # EnvVars is a map of string to string (the guide; its SDKs' addEnvVars(String, String)).
    # A number or boolean is refused, not turned into text: 1e3, 1.0 or true would reach
    # the program as "1000.0", "1.0" or "True", not as written.
    if not isinstance(value, str):
        hint = f" (quote it: \"{json.dumps(value)}\")" if isinstance(value, int | float) else ""
        raise JobError(f"{where}: value must be a string, got {json_type(value)}{hint}")
    if "\x00" in value:
        raise JobError(f"{where}: value contains a NUL byte")
    return value


def json_type(value: object) -> str:
    """``value``'s type as JSON names it (a user wrote JSON, not Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def oss_dir(url: object, where: str) -> str:
    """An ``oss://bucket/dir/`` directory URL, by the storage capability's OSS rules."""
    with storage_rules():
        if not isinstance(url, str) or not url:
            raise BadInput(f"{where}: want an OSS directory such as oss://bucket/dir/")
        parsed = OssUrl.parse(url, where)
        if not parsed.is_dir:
            raise BadInput(f"{where}: {url!r} must be an OSS directory (end it with '/')")
    return url


@contextmanager
def storage_rules(where: str = "") -> Iterator[None]:
    """Run the storage capability's checks (OSS names, local paths, mappings: they live in
    ``guestagent.storage``, one place for both capabilities) and turn a refusal into a
    job error, its field prefixed with ``where`` (``DAG.Tasks.count``)."""
    try:
        yield
    except BadInput as exc:
        raise JobError(f"{where}.{exc}" if where else str(exc)) from None


def image(ref: object, where: str) -> str:
    if not isinstance(ref, str) or len(ref) > 512 or not _IMAGE.fullmatch(ref):
        raise JobError(
            f"{where}: {ref!r} is not a Docker image name: want [registry/]name[:tag] "
            "(lower-case name, one tag of letters, digits, '_', '.', '-')"
        )
    return ref


def image_parts(ref: str) -> tuple[str, str]:
    """(repository without registry host, tag) of a checked image reference."""
    m = _IMAGE.fullmatch(ref)
    assert m is not None
    host, path = m.group("host"), m.group("path")
    # As Docker reads it: a first component is a registry only with '.', ':' or localhost.
    if host and not ("." in host or ":" in host or host == "localhost"):
        path = f"{host}/{path}"
    return path, m.group("tag") or "latest"
