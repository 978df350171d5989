"""``deprovision``: remove what belongs to one instance before its disk becomes an image
(after ``waagent -deprovision[+user]`` and ``cloud-init clean``).

A plan is made first — every item found, each with why it goes — and checked as a whole:
not a root file system, or any item that cannot be changed (read-only), refuses before
anything is removed. Then the items are removed one by one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from guestagent import process
from guestagent.files import atomic_write

log = logging.getLogger(__name__)

Kind = Literal["remove", "empty", "userdel"]

# (guest glob, why). Globs are matched inside the root; symlinks are removed, never followed.
FIXED: tuple[tuple[str, str], ...] = (
    ("/etc/ssh/ssh_host_*_key", "SSH host key (regenerated at next boot)"),
    ("/etc/ssh/ssh_host_*_key.pub", "SSH host key (regenerated at next boot)"),
    ("/var/lib/dbus/machine-id", "D-Bus machine id (a copy of /etc/machine-id)"),
    ("/var/lib/dhcp/*.leases", "DHCP lease (dhclient)"),
    ("/var/lib/dhclient/*.lease*", "DHCP lease (dhclient)"),
    ("/var/lib/NetworkManager/*.lease", "DHCP lease (NetworkManager)"),
    ("/run/systemd/netif/leases/*", "DHCP lease (systemd-networkd)"),
    ("/root/.*_history", "shell history"),
    ("/home/*/.*_history", "shell history"),
    ("/root/.lesshst", "shell history"),
    ("/home/*/.lesshst", "shell history"),
    ("/var/log/guestagent*", "the agent's logs"),
    ("/var/log/cloud-init*.log", "cloud-init's logs"),
)
HISTORY_NAMES = frozenset({".bash_history", ".zsh_history", ".ash_history", ".sh_history",
                           ".python_history", ".mysql_history", ".psql_history", ".lesshst"})
CLOUD_DIR = "/var/lib/cloud"
# Kept by `cloud-init clean` too: the seed is image configuration, not instance state.
CLOUD_KEEP = ("seed",)
MACHINE_ID = "/etc/machine-id"
SUDO_RULES = "/etc/sudoers.d/90-guestagent-users"


class Refused(Exception):
    """Deprovisioning refused before anything was removed; one line says why."""


@dataclass(frozen=True)
class Item:
    kind: Kind
    guest: str  # the path as the instance sees it (or the account name for userdel)
    why: str

    def line(self) -> str:
        verb = {"remove": "remove", "empty": "empty ", "userdel": "userdel"}[self.kind]
        return f"  {verb}  {self.guest}  ({self.why})"


@dataclass
class Plan:
    root: Path
    items: list[Item] = field(default_factory=list)

    @property
    def running_root(self) -> bool:
        return self.root.resolve() == Path("/")

    def host(self, guest: str) -> Path:
        return self.root / guest.lstrip("/")

    def add(self, kind: Kind, guest: str, why: str) -> None:
        if all(i.guest != guest for i in self.items):
            self.items.append(Item(kind, guest, why))


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise Refused(f"{root}: not a directory; give --root the mounted root file system")
    if not os.path.lexists(root / "etc/os-release"):
        raise Refused(f"{root}: no etc/os-release, so not a root file system; "
                      "give --root the directory the image's / is mounted on")


def plan(root: Path, *, users: bool, state_dir: str, run_dir: str,
         credential_files: Iterable[str]) -> Plan:
    """Everything of one instance found under ``root`` (guest paths are absolute)."""
    check_root(root)
    p = Plan(root)
    _plan_fixed(p)
    _plan_agent(p, state_dir, run_dir, credential_files)
    _plan_cloud_init(p)
    for guest in _journals(root):
        p.add("remove", guest, "this machine's journal (the agent's logs)")
    _plan_machine_id(p)
    if users:
        _plan_users(p, state_dir)
    return p


def _plan_fixed(p: Plan) -> None:
    """Host keys, leases, shell histories and logs (``FIXED``)."""
    for pattern, why in FIXED:
        for guest in _glob(p.root, pattern):
            if "history" in why and Path(guest).name not in HISTORY_NAMES:
                continue
            p.add("remove", guest, why)


def _plan_agent(p: Plan, state_dir: str, run_dir: str,
                credential_files: Iterable[str]) -> None:
    """The agent's own state, runtime files and credential files."""
    for base, why in ((state_dir, "the agent's state (semaphores, drain, user-data runs)"),
                      (run_dir, "the agent's runtime files")):
        for guest in _children(p.root, base):
            p.add("remove", guest, why)
    for guest in credential_files:
        if os.path.lexists(p.host(guest)):
            p.add("remove", guest, "credential file")


def _plan_cloud_init(p: Plan) -> None:
    for guest in _children(p.root, CLOUD_DIR):
        if Path(guest).name not in CLOUD_KEEP:
            p.add("remove", guest, "cloud-init instance state")


def _plan_machine_id(p: Plan) -> None:
    mid = p.host(MACHINE_ID)
    if mid.is_file() and not mid.is_symlink() and mid.stat().st_size:
        p.add("empty", MACHINE_ID, "machine id (emptied: systemd makes a new one at boot)")


def _plan_users(p: Plan, state_dir: str) -> None:
    from guestagent.userdata.handlers.accounts import created_users

    record = p.host(state_dir) / "userdata" / "created-users.json"
    try:
        names = created_users(record.read_text())
    except OSError:
        names = []
    passwd = _passwd_names(p.host("/etc/passwd"))
    for name in names:
        if name in passwd:
            p.add("userdel", name, "account created by user-data (with its home)")
    if names and os.path.lexists(p.host(SUDO_RULES)):
        p.add("remove", SUDO_RULES, "sudo rules of those accounts")


def check_writable(p: Plan) -> None:
    """Refuse (one line) if any item cannot be changed: nothing is removed partially."""
    for item in p.items:
        targets = [p.host("/etc")] if item.kind == "userdel" else [p.host(item.guest).parent]
        if item.kind == "empty":
            targets.append(p.host(item.guest))
        for target in targets:
            if _read_only(target):
                raise Refused(
                    f"{target} is on a read-only file system ({item.guest} cannot be changed); "
                    "remount it read-write and run again — nothing was removed"
                )
            if not os.access(target, os.W_OK):
                raise Refused(f"{target} is not writable ({item.guest} cannot be changed); "
                              "run as root — nothing was removed")


def execute(p: Plan) -> list[tuple[Item, str]]:
    """Remove every item; the failures as (item, reason) — the rest is still done."""
    failed: list[tuple[Item, str]] = []
    for item in p.items:
        try:
            _do(p, item)
        except (OSError, process.ProcessError, RuntimeError) as exc:
            failed.append((item, getattr(exc, "strerror", None) or str(exc)))
    return failed


def _do(p: Plan, item: Item) -> None:
    path = p.host(item.guest)
    if item.kind == "userdel":
        argv = ["userdel", "--remove"]
        if not p.running_root:
            argv += ["--root", str(p.root.resolve())]
        result = process.run([*argv, item.guest], timeout=60)
        # 12: home or mail spool could not be removed (already gone) — the account is.
        if result.returncode not in (0, 12):
            err = result.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"userdel exited {result.returncode}: {err[-1] if err else ''}")
    elif item.kind == "empty":
        try:
            atomic_write(path, b"", mode=0o444)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # A bind-mounted machine-id (containers) cannot be replaced, only truncated.
            os.truncate(path, 0)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    log.info("deprovision: %s %s", item.kind, item.guest)


def _glob(root: Path, pattern: str) -> Iterator[str]:
    for host in sorted(root.glob(pattern.lstrip("/"))):
        yield "/" + host.relative_to(root).as_posix()


def _children(root: Path, guest_dir: str) -> Iterator[str]:
    base = root / guest_dir.lstrip("/")
    if base.is_dir() and not base.is_symlink():
        for host in sorted(base.iterdir()):
            yield "/" + host.relative_to(root).as_posix()


def _journals(root: Path) -> Iterator[str]:
    """The journal directories of this machine (named after its machine id)."""
    try:
        mid = (root / MACHINE_ID.lstrip("/")).read_text().strip()
    except OSError:
        return
    for base in ("/var/log/journal", "/run/log/journal"):
        if mid and (root / base.lstrip("/") / mid).is_dir():
            yield f"{base}/{mid}"


def _passwd_names(path: Path) -> set[str]:
    try:
        return {ln.split(":", 1)[0] for ln in path.read_text().splitlines() if ln}
    except OSError:
        return set()


def _read_only(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
