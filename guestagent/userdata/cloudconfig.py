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


# Bounds checked while the YAML is composed, before any Python object is built: a
# "billion laughs" of a few hundred bytes names one anchor many times over.
MAX_ALIASES = 100
MAX_DEPTH = 64
MAX_NODES = 100_000  # nodes with every alias expanded


class _Bounded(yaml.SafeLoader):
    """PyYAML's safe loader, refusing too many aliases, too deep a document, a recursive
    alias, or a document that would expand to too many nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name)")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _measure(node, 0, {}, set())
        return node


class _Refused(Exception):
    pass


def _measure(
    node: yaml.Node, depth: int, memo: dict[int, tuple[int, int]], visiting: set[int]
) -> tuple[int, int]:
    """(expanded node count, height) of ``node``; raises _Refused past the bounds."""
    key = id(node)
    if key in memo:
        count, height = memo[key]
        if depth + height > MAX_DEPTH:
            raise _Refused(f"aliases expand it deeper than {MAX_DEPTH} levels")
        return count, height
    if key in visiting:
        raise _Refused("an alias refers to a node that contains it (recursive)")
    if depth > MAX_DEPTH:
        raise _Refused(f"aliases expand it deeper than {MAX_DEPTH} levels")
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    visiting.add(key)
    count, height = 1, 0
    for child in children:
        c, h = _measure(child, depth + 1, memo, visiting)
        count += c
        height = max(height, h + 1)
        if count > MAX_NODES:
            raise _Refused(f"aliases expand it to more than {MAX_NODES} values")
    visiting.discard(key)
    memo[key] = (count, height)
    return count, height


def load(text: str | bytes, where: str = "cloud-config") -> dict[str, Any]:
    """Parse a cloud-config document; it must be a mapping. Bounded (aliases, depth,
    expanded size) before anything is expanded.

    A key repeated in one mapping keeps its last value, unlike the job and control JSON
    we refuse it in: cloud-init loads user-data with PyYAML's safe loader, which does
    exactly that, and the same #cloud-config must mean the same thing to us as to an
    enabled cloud-init (which may apply it instead of us)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise UserdataError(f"{where}: not UTF-8 text") from None
    loader = _Bounded(text)
    try:
        data = loader.get_single_data()
    except _Refused as exc:
        raise UserdataError(f"{where}: YAML refused: {exc}; write the values out") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise UserdataError(f"{where}: not valid YAML{at}: {problem}") from None
    finally:
        loader.dispose()
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


# cloud-init's schema check is a child of ours: bounded in time and memory, and killed
# by the kernel if we die first.
SCHEMA_TIMEOUT = 60.0
SCHEMA_MEMORY = 768 << 20


def schema_errors(text: str, cloud_init: str = "cloud-init") -> list[str] | None:
    """cloud-init's own schema check; None when cloud-init is not installed here."""
    fd, path = tempfile.mkstemp(prefix="guestagent-cc-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            res = process.run(
                [cloud_init, "schema", "--config-file", path],
                timeout=SCHEMA_TIMEOUT,
                memory_limit=SCHEMA_MEMORY,
                die_with_parent=True,
            )
        except process.ProcessError:
            return None
    finally:
        os.unlink(path)
    if res.ok:
        return []
    if res.timed_out:
        return [f"cloud-init schema did not finish in {SCHEMA_TIMEOUT:.0f}s"]
    if b"MemoryError" in res.stderr:
        return [f"cloud-init schema needed more than {SCHEMA_MEMORY >> 20} MiB"]
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
        if tree.present(f"{d}/cloud-init.service") or tree.present(f"{d}/cloud-init-main.service"):
            return True
    return False
