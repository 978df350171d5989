"""The rules one field of a job must pass: names, OSS paths, local paths, env vars, images.

Each check raises :class:`JobError` with one line naming the field (``where``), what is
wrong and what to do. OSS rules follow the OSS object-name limits (UTF-8, a segment of at
most 255 bytes, the whole key at most 1023, no 0x00-0x1F/0x7F).
"""

from __future__ import annotations

import posixpath
import re

from guestagent.tasks.errors import JobError

# Task names end up in file names, log object names and env values: keep them plain.
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
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
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise JobError(f"{where}: value must be a string, got {type(value).__name__}")
    text = str(value)
    if "\x00" in text:
        raise JobError(f"{where}: value contains a NUL byte")
    return text


def oss_url(url: object, where: str, *, directory: bool | None = None) -> str:
    """Check an ``oss://bucket/key`` URL; ``directory`` True wants a trailing '/', False none."""
    if not isinstance(url, str) or not url.startswith("oss://"):
        raise JobError(f"{where}: {url!r} is not an OSS path: want oss://bucket/path")
    bucket, _, key = url[len("oss://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or "--" in bucket:
        raise JobError(
            f"{where}: bucket {bucket!r} in {url!r} is not a valid OSS bucket name "
            "(3-63 lower-case letters, digits and '-', not starting or ending with '-')"
        )
    _oss_key(key, url, where)
    if directory is True and key and not key.endswith("/"):
        raise JobError(f"{where}: {url!r} must name a directory: end it with '/'")
    if directory is False and (not key or key.endswith("/")):
        raise JobError(f"{where}: {url!r} must name an object, not a directory")
    return url


def _oss_key(key: str, url: str, where: str) -> None:
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) > 1023:
        raise JobError(f"{where}: {url!r}: the object name is longer than 1023 bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise JobError(f"{where}: {url!r}: control characters are not allowed in OSS names")
    for segment in key.split("/"):
        if segment in (".", ".."):
            raise JobError(f"{where}: {url!r}: '.' and '..' segments are not allowed")
        if len(segment.encode()) > 255:
            raise JobError(f"{where}: {url!r}: a name segment is longer than 255 bytes")
    if "//" in key:
        raise JobError(f"{where}: {url!r}: empty path segment ('//')")


def local_dir(path: object, where: str) -> str:
    """An absolute local directory, normalised to end with '/'."""
    return local_path(path, where).rstrip("/") + "/"


def local_path(path: object, where: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise JobError(f"{where}: {path!r} must be an absolute local path")
    if any(ord(c) < 0x20 for c in path):
        raise JobError(f"{where}: {path!r}: control characters are not allowed")
    if ".." in path.split("/"):
        raise JobError(f"{where}: {path!r}: '..' is not allowed")
    norm = posixpath.normpath(path)
    if norm == "/":
        raise JobError(f"{where}: the root directory cannot be mapped")
    return norm


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
