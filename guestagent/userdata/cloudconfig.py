"""``#cloud-config`` documents: parse, merge, dump, check against cloud-init's schema, and
tell whether cloud-init will handle them in a given tree."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

from guestagent import process
from guestagent.userdata.errors import UserdataError
from guestagent.userdata.tree import Tree

log = logging.getLogger(__name__)

HEADER = "#cloud-config"
_UNIT_DIRS = (
    "/etc/systemd/system/cloud-init.target.wants",
    "/etc/systemd/system/multi-user.target.wants",
)


def load(text: str | bytes, where: str = "cloud-config") -> dict[str, Any]:
    """Parse a cloud-config document; it must be a mapping."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise UserdataError(f"{where}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise UserdataError(f"{where}: not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserdataError(f"{where}: must be a mapping of keys, got {type(data).__name__}")
    return data


class _Dumper(yaml.SafeDumper):
    """No ``&id001`` anchors: user-data is read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(data: Mapping[str, Any], comment: str = "") -> str:
    body = yaml.dump(
        dict(data), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000
    )
    note = f"# {comment}\n" if comment else ""
    return f"{HEADER}\n{note}{body}"


def merge(
    base: dict[str, Any], extra: Mapping[str, Any], *, append: bool = False
) -> dict[str, Any]:
    """cloud-init's default merge (dicts merged, later values replace); with ``append``
    lists are concatenated (``merge_how: list(append)``)."""
    out = dict(base)
    for key, value in extra.items():
        if key in ("merge_how", "merge_type"):
            continue
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            out[key] = merge(old, value, append=append)
        elif append and isinstance(old, list) and isinstance(value, list):
            out[key] = old + [v for v in value if v not in old]
        else:
            out[key] = value
    return out


def wants_append(doc: Mapping[str, Any]) -> bool:
    how = doc.get("merge_how", doc.get("merge_type", ""))
    return "append" in str(how)


def schema_errors(text: str, cloud_init: str = "cloud-init") -> list[str] | None:
    """cloud-init's own schema check; None when cloud-init is not installed here."""
    fd, path = tempfile.mkstemp(prefix="guestagent-cc-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            res = process.run([cloud_init, "schema", "--config-file", path], timeout=60)
        except process.ProcessError:
            return None
    finally:
        os.unlink(path)
    if res.ok:
        return []
    out = (res.stderr + res.stdout).decode(errors="replace").replace(path, "<user-data>")
    errors = [
        ln.strip()
        for ln in out.splitlines()
        if ln.strip() and not ln.startswith(("Error:", "Cloud config schema deprecations"))
    ]
    return errors or [f"cloud-init schema exited {res.returncode}"]


def cloud_init_active(tree: Tree) -> bool:
    """cloud-init installed and enabled in the tree (it will apply user-data itself)."""
    if not (tree.exists("/usr/bin/cloud-init") or tree.exists("/usr/local/bin/cloud-init")):
        return False
    if tree.exists("/etc/cloud/cloud-init.disabled"):
        return False
    if tree.live and os.path.exists("/proc/cmdline"):
        try:
            with open("/proc/cmdline") as fh:
                if "cloud-init=disabled" in fh.read():
                    return False
        except OSError:
            pass
    if not tree.exists("/etc/systemd/system"):
        return True  # not systemd: its init scripts run it
    for d in _UNIT_DIRS:
        if tree.exists(f"{d}/cloud-init.service") or tree.exists(f"{d}/cloud-init-main.service"):
            return True
    return False
