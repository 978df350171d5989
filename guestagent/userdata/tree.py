"""The target file tree of an apply: ``/`` on an instance, an image tree with ``--root``.

Every write goes through :class:`Tree`: paths are resolved inside the root (a symlink may
not lead out of it, for reads as for writes), writes are atomic
(``guestagent.files.atomic_write``) and keep a backup of what they replace in the agent's
state directory, an unchanged file is not rewritten, and a
:meth:`Tree.transaction` puts every file it touched back if the handler fails half-way.
With ``dry_run`` nothing under the root changes: writes land in a scratch overlay and
:meth:`Tree.diff` shows what would have changed.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from guestagent.files import atomic_write
from guestagent.userdata.errors import UserdataError

log = logging.getLogger(__name__)

_MAX_LINKS = 32


@dataclass(frozen=True)
class Change:
    path: str  # path inside the tree
    before: bytes | None
    after: bytes | None
    note: str = ""


@dataclass(frozen=True)
class _Saved:
    kind: str  # "absent", "file", "link", "dir"
    data: bytes = b""
    target: str = ""
    mode: int = 0
    uid: int = -1
    gid: int = -1


class Tree:
    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        dry_run: bool = False,
        backup_dir: Path | None = None,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.dry_run = dry_run
        # Where the previous version of a replaced file is kept (the agent's state
        # directory), as <backup_dir>/<path in the tree>; None keeps none.
        self.backup_dir = backup_dir
        self.changes: list[Change] = []
        self._overlay: Path | None = None
        self._journal: list[dict[str, _Saved]] = []

    @property
    def live(self) -> bool:
        """True when the tree is the running system (services may be restarted)."""
        return self.root == Path("/") and not self.dry_run

    def close(self) -> None:
        if self._overlay is not None:
            shutil.rmtree(self._overlay, ignore_errors=True)
            self._overlay = None

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ---------------------------------------------------------------------

    def host(self, guest: str) -> Path:
        """The real path of ``guest`` under the root, following symlinks chroot-style
        for every parent directory (the last component is not followed)."""
        return self._resolve(guest, follow_last=False)

    def resolve(self, guest: str) -> Path:
        """Like :meth:`host`, but the last component is followed too: what a process
        chrooted into the root would open. Never a path outside the root: an absolute link
        target starts again at the root and '..' stops there, as in a chroot."""
        return self._resolve(guest, follow_last=True)

    def _resolve(self, guest: str, *, follow_last: bool) -> Path:
        if not guest.startswith("/"):
            raise UserdataError(f"{guest}: path must be absolute")
        parts = [p for p in guest.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise UserdataError(f"{guest}: path may not contain '..'")
        last = parts[-1:] if not follow_last else []
        todo = parts[:-1] if not follow_last else parts
        resolved: list[str] = []
        hops = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = self.root.joinpath(*resolved, name)
            if candidate.is_symlink():
                hops += 1
                if hops > _MAX_LINKS:
                    raise UserdataError(f"{guest}: too many symbolic links")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                continue
            resolved.append(name)
        return self.root.joinpath(*resolved, *last)

    def _scratch(self, guest: str) -> Path:
        if self._overlay is None:
            self._overlay = Path(tempfile.mkdtemp(prefix="guestagent-dryrun-"))
        return self._overlay / guest.lstrip("/")

    def path_for_tools(self, stage: Iterable[str] = ()) -> Path:
        """The root to hand to ``useradd --root`` and friends; in a dry run the overlay,
        seeded with copies of ``stage``."""
        if not self.dry_run:
            return self.root
        for guest in stage:
            src, dst = self.resolve(guest), self._scratch(guest)
            if dst.exists() or not src.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst)
        self._scratch("/")
        assert self._overlay is not None
        return self._overlay

    def _view(self, guest: str, *, follow: bool = False) -> Path:
        if self.dry_run and self._overlay is not None:
            scratch = self._scratch(guest)
            if scratch.exists() or scratch.is_symlink():
                return scratch
        return self.resolve(guest) if follow else self.host(guest)

    # -- reads ---------------------------------------------------------------------

    def read(self, guest: str) -> bytes | None:
        """The content of ``guest`` as a process chrooted into the root would read it."""
        path = self._view(guest, follow=True)
        try:
            # O_NOFOLLOW: the path was resolved inside the root; a link that appeared since
            # is refused rather than followed out of it.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserdataError(f"{guest}: changed into a symbolic link while read") from None
            raise
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return fh.read()

    def read_text(self, guest: str) -> str | None:
        data = self.read(guest)
        return None if data is None else data.decode("utf-8", errors="replace")

    def exists(self, guest: str) -> bool:
        """``guest`` exists, its links followed inside the root."""
        return os.path.lexists(self._view(guest, follow=True))

    def present(self, guest: str) -> bool:
        """An entry named ``guest`` is there, even a link to nothing (an enabled unit's
        link in a ``.wants`` directory points at a file of another tree layout)."""
        return os.path.lexists(self._view(guest))

    # -- writes --------------------------------------------------------------------

    def write(
        self,
        guest: str,
        data: bytes | str,
        *,
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
        note: str = "",
    ) -> bool:
        """Write ``guest`` atomically, keeping a backup; return False when unchanged."""
        payload = data.encode() if isinstance(data, str) else data
        target = self.host(guest)
        before = self.read(guest)
        view = self._view(guest)
        if before == payload and not view.is_symlink() and _same_meta(view, mode, uid, gid):
            return False
        self.changes.append(Change(guest, before, payload, note))
        if self.dry_run:
            scratch = self._scratch(guest)
            scratch.parent.mkdir(parents=True, exist_ok=True)
            if scratch.is_symlink():
                scratch.unlink()
            scratch.write_bytes(payload)
            return True
        self._remember(guest, target)
        self._backup(guest, target)
        if target.is_symlink():
            target.unlink()  # replaced by a file, never written through
        self._mkdirs(target.parent)
        atomic_write(target, payload, mode=mode, uid=uid, gid=gid)
        log.info("wrote %s", guest)
        return True

    def _backup(self, guest: str, target: Path) -> None:
        """Keep what ``guest`` was before it is replaced: under the backup directory, not
        beside it in /etc (where a ``*.conf`` glob or a package tool would pick it up).
        A link is kept as a link; what it points at is never copied."""
        if self.backup_dir is None:
            return
        try:
            st = target.lstat()
        except FileNotFoundError:
            return
        if not (stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return
        self.backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        dest = self.backup_dir / guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if dest.is_symlink() or dest.is_dir():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(target), dest)
        else:
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            atomic_write(dest, target.read_bytes(), mode=mode, uid=uid, gid=gid)

    def mkdir(
        self, guest: str, *, mode: int = 0o755, uid: int | None = None, gid: int | None = None
    ) -> None:
        # Followed chroot-style: a link to a directory is that directory in the root, never
        # one on the host (chmod/chown would follow it).
        target = self.resolve(guest)
        if self.dry_run:
            if not target.is_dir():
                self.changes.append(Change(guest, None, None, "create directory"))
                self._scratch(guest).mkdir(parents=True, exist_ok=True)
            return
        if not target.is_dir():
            self._remember(guest, target)
            self._mkdirs(target.parent)
            target.mkdir(mode=mode)
            self.changes.append(Change(guest, None, None, "create directory"))
        os.chmod(target, mode)
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)

    def note(self, guest: str, what: str) -> None:
        """Record a change made by a tool (useradd...) for the report."""
        self.changes.append(Change(guest, None, None, what))

    def _mkdirs(self, directory: Path) -> None:
        missing: list[Path] = []
        d = directory
        while not d.exists() and d != self.root:
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            if self._journal:
                guest = "/" + str(m.relative_to(self.root)) if m != self.root else "/"
                self._journal[-1].setdefault(guest, _Saved("absent"))
            m.mkdir()

    # -- transactions --------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, also: Iterable[str] = ()) -> Iterator[None]:
        """Undo every write (and the files in ``also``, changed by tools) on failure."""
        saved: dict[str, _Saved] = {}
        self._journal.append(saved)
        if not self.dry_run:
            for guest in also:
                self._remember(guest, self.host(guest))
        mark = len(self.changes)
        try:
            yield
        except BaseException:
            if not self.dry_run:
                self._restore(saved)
            del self.changes[mark:]
            raise
        finally:
            self._journal.pop()
        if self._journal:  # nested: the outer transaction owns the undo
            for k, v in saved.items():
                self._journal[-1].setdefault(k, v)

    def _remember(self, guest: str, target: Path) -> None:
        if not self._journal or guest in self._journal[-1]:
            return
        self._journal[-1][guest] = _snapshot(target)

    def _restore(self, saved: dict[str, _Saved]) -> None:
        # Deepest paths first, so files go before the directories created for them.
        for guest in sorted(saved, key=lambda g: g.count("/"), reverse=True):
            state, target = saved[guest], self.host(guest)
            try:
                _put_back(target, state)
            except OSError as exc:
                log.error("could not restore %s: %s", guest, exc)
            else:
                log.info("restored %s", guest)

    # -- report --------------------------------------------------------------------

    def diff(self) -> str:
        out: list[str] = []
        first: dict[str, bytes | None] = {}
        last: dict[str, Change] = {}
        for ch in self.changes:
            first.setdefault(ch.path, ch.before)
            last[ch.path] = ch
        for path, ch in last.items():
            if ch.after is None:
                out.append(f"# {path}: {ch.note}\n")
                continue
            before = (first[path] or b"").decode(errors="replace").splitlines(keepends=True)
            after = ch.after.decode(errors="replace").splitlines(keepends=True)
            label = "/dev/null" if first[path] is None else f"a{path}"
            lines = list(difflib.unified_diff(before, after, label, f"b{path}"))
            if not lines:
                lines = [f"# {path}: mode or owner changes\n"]
            out.extend(line if line.endswith("\n") else line + "\n" for line in lines)
        return "".join(out)


def _same_meta(path: Path, mode: int, uid: int | None, gid: int | None) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return (
        stat.S_IMODE(st.st_mode) == mode
        and (uid is None or st.st_uid == uid)
        and (gid is None or st.st_gid == gid)
    )


def _snapshot(path: Path) -> _Saved:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return _Saved("absent")
    if stat.S_ISLNK(st.st_mode):
        return _Saved("link", target=os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return _Saved("dir", mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    return _Saved(
        "file",
        data=path.read_bytes(),
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
    )


def _put_back(target: Path, state: _Saved) -> None:
    if state.kind == "absent":
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    elif state.kind == "link":
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        os.symlink(state.target, target)
    elif state.kind == "file":
        if target.is_symlink():
            target.unlink()
        atomic_write(target, state.data, mode=state.mode, uid=state.uid, gid=state.gid)
    elif state.kind == "dir" and target.is_dir():
        os.chmod(target, state.mode)
        os.chown(target, state.uid, state.gid)
