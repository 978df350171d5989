"""``write_files`` (cloud-init semantics: path, content, encoding, owner, permissions,
append, defer). Deferred entries are written after the accounts exist."""

from __future__ import annotations

import base64
import binascii
import gzip
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from guestagent.userdata import checks
from guestagent.userdata.errors import ApplyError, UserdataError
from guestagent.userdata.handlers import Context, Handler
from guestagent.userdata.tree import Tree

_ENCODINGS = {
    "text": (),
    "b64": ("b64",),
    "base64": ("b64",),
    "gz": ("gz",),
    "gzip": ("gz",),
    "gz+b64": ("b64", "gz"),
    "gz+base64": ("b64", "gz"),
    "gzip+b64": ("b64", "gz"),
    "gzip+base64": ("b64", "gz"),
}
_KEYS = {"path", "content", "source", "encoding", "owner", "permissions", "append", "defer"}
MAX_CONTENT = 16 * 1048576


@dataclass(frozen=True)
class FileEntry:
    where: str
    path: str
    content: bytes
    owner: str
    group: str
    mode: int
    append: bool


def _decode(content: Any, encoding: str, where: str) -> bytes:
    if not isinstance(content, str):
        raise UserdataError(f"{where}.content: must be a string")
    data = content.encode()
    for step in _ENCODINGS[encoding]:
        try:
            if step == "b64":
                data = base64.b64decode(b"".join(data.split()), validate=True)
            else:
                data = gzip.decompress(data)
        except (binascii.Error, ValueError) as exc:
            raise UserdataError(f"{where}.content: not valid base64: {exc}") from None
        except (OSError, EOFError, zlib.error) as exc:
            raise UserdataError(f"{where}.content: not valid gzip: {exc}") from None
        if len(data) > MAX_CONTENT:
            raise UserdataError(f"{where}.content: larger than {MAX_CONTENT} bytes")
    return data


def plan_from(cfg: Mapping[str, Any], deferred: bool) -> list[FileEntry] | None:
    items = cfg.get("write_files")
    if not items:
        return None
    if not isinstance(items, list):
        raise UserdataError("write_files: must be a list")
    out = []
    for i, item in enumerate(items):
        where = f"write_files[{i}]"
        if not isinstance(item, Mapping):
            raise UserdataError(f"{where}: must be a mapping")
        unknown = set(item) - _KEYS
        if unknown:
            raise UserdataError(f"{where}: unsupported key(s) {', '.join(sorted(unknown))}")
        if "source" in item:
            raise UserdataError(f"{where}.source: fetching files is not supported by guestagent")
        path = checks.abs_path(item.get("path"), f"{where}.path")
        encoding = str(item.get("encoding", "text")).lower()
        if encoding not in _ENCODINGS:
            raise UserdataError(
                f"{where}.encoding: {encoding!r} is not one of {', '.join(_ENCODINGS)}"
            )
        content = _decode(item.get("content", ""), encoding, where)
        owner = checks.text(item.get("owner", "root:root"), f"{where}.owner", max_len=65)
        user, _, group = owner.partition(":")
        user = checks.account(user, f"{where}.owner")
        group = checks.account(group or user, f"{where}.owner")
        mode = checks.octal_mode(item.get("permissions", "0644"), f"{where}.permissions")
        append = checks.boolean(item.get("append", False), f"{where}.append")
        if checks.boolean(item.get("defer", False), f"{where}.defer") == deferred:
            out.append(FileEntry(where, path, content, user, group, mode, append))
    return out or None


def lookup(tree: Tree, path: str, name: str) -> int:
    if name == "root":
        return 0
    for line in (tree.read_text(path) or "").splitlines():
        f = line.split(":")
        if len(f) >= 3 and f[0] == name:
            return int(f[2])
    raise ApplyError(
        f"write_files: no {'user' if 'passwd' in path else 'group'} {name!r} in {path}"
    )


def _names(tree: Tree, path: str) -> set[str]:
    return {ln.split(":", 1)[0] for ln in (tree.read_text(path) or "").splitlines() if ln}


def created(cfg: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(users, groups) this user-data creates; values are checked by the accounts handler."""
    users: set[str] = set()
    groups: set[str] = set()
    raw_users = cfg.get("users") or []
    for item in raw_users if isinstance(raw_users, list) else []:
        name = item.get("name") if isinstance(item, Mapping) else item
        if isinstance(name, str) and name != "default":
            users.add(name)
            groups.add(name)  # USERGROUPS_ENAB: a group of the user's name
            if isinstance(item, Mapping):
                for g in checks.str_list(item.get("groups") or [], "users.groups"):
                    groups.add(g)
                if isinstance(item.get("primary_group"), str):
                    groups.add(item["primary_group"])
    raw_groups = cfg.get("groups") or []
    if isinstance(raw_groups, Mapping):
        groups.update(str(g) for g in raw_groups)
    elif isinstance(raw_groups, list):
        for g in raw_groups:
            groups.update([str(k) for k in g] if isinstance(g, Mapping) else [str(g)])
    return users, groups


def check_owners(plan: list[FileEntry], cfg: Mapping[str, Any], tree: Tree, deferred: bool) -> None:
    """Every owner exists in the tree, or (for ``defer: true`` entries) is created by this
    user-data: found in the plan, before anything is written."""
    have_users, have_groups = _names(tree, "/etc/passwd"), _names(tree, "/etc/group")
    new_users, new_groups = created(cfg)
    for entry in plan:
        for kind, name, have, new in (
            ("user", entry.owner, have_users, new_users),
            ("group", entry.group, have_groups, new_groups),
        ):
            if name == "root" or name in have:
                continue
            if name in new and not deferred:
                raise UserdataError(
                    f"{entry.where}.owner: {kind} {name!r} is created by this user-data after "
                    "write_files runs; add 'defer: true' to the entry"
                )
            if name not in new:
                raise UserdataError(
                    f"{entry.where}.owner: no {kind} {name!r} in the image and none in users"
                )


class WriteFiles(Handler):
    name = "write_files"
    keys: ClassVar[tuple[str, ...]] = ("write_files",)
    deferred = False

    def plan(self, cfg: Mapping[str, Any], ctx: Context) -> list[FileEntry] | None:
        plan = plan_from(cfg, self.deferred)
        if plan:
            check_owners(plan, cfg, ctx.tree, self.deferred)
        return plan

    def apply(self, plan: list[FileEntry], ctx: Context) -> None:
        tree = ctx.tree
        with tree.transaction():
            for entry in plan:
                uid = lookup(tree, "/etc/passwd", entry.owner)
                gid = lookup(tree, "/etc/group", entry.group)
                data = entry.content
                if entry.append:
                    data = (tree.read(entry.path) or b"") + data
                tree.write(entry.path, data, mode=entry.mode, uid=uid, gid=gid)


class WriteFilesDeferred(WriteFiles):
    name = "write_files_deferred"
    keys = ()
    deferred = True
