"""The daemon's ``storage`` service: mounts declared in ``[storage] mounts`` made at start and
kept healthy (and the CLI's mounts supervised too), the output directories of ``[storage]
outputs`` uploaded (streamed as files close, flushed on a drain), and both shown by
``guestagent status``.

Life cycle of the mounts (rclone runs outside the agent: a transient unit under systemd):

- the agent restarts (``systemctl restart``, an upgrade, a kill -9, a crash, a watchdog
  abort): the daemon does not drain (see :mod:`guestagent.daemon.restart`), ``run`` ends and
  leaves the mounts; the next agent adopts them from their records — the same rclone, no
  remount, so a task reading a mount never sees it go;
- the agent stops (``systemctl stop``, shutdown, SIGTERM without systemd) or the instance
  drains (spot notice): :meth:`StorageService.drain` flushes the pending uploads within the
  deadline, then unmounts lazily (open files keep working until closed) and ends rclone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from guestagent.service import Service
from guestagent.storage.api import Storage, mount_options, unmount_record
from guestagent.storage.errors import StorageError, Unavailable
from guestagent.storage.keys import Keys, SourceKeys
from guestagent.storage.mappings import (
    MountEntry,
    NasSource,
    parse_mount_spec,
    parse_output_spec,
)
from guestagent.storage.mountrefs import Record
from guestagent.storage.ossurl import OssUrl

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 2.0, 60.0
# Mount users (see storage.mountrefs) that outlive a process on purpose: the daemon's
# declared mounts are adopted by the next agent; a CLI mount lasts until ``storage umount``.
SETTINGS_USER, CLI_USER = "settings", "cli"
UNMOUNT_RESERVE = 3.0  # seconds of a drain kept for the lazy unmounts


class _Declared:
    """A mount from the settings, and when to try it again after a failure."""

    def __init__(self, entry: MountEntry) -> None:
        self.entry = entry
        self.error = ""
        self.state = "pending"
        self.failures = 0
        self.next_try = 0.0

    def failed(self, message: str) -> None:
        if message != self.error:
            log.warning("storage mount %s: %s", self.entry.destination, message)
        self.error = message
        self.state = "error"
        self.failures += 1
        self.next_try = time.monotonic() + min(RETRY_MAX, RETRY_MIN * 2 ** (self.failures - 1))


class _DaemonKeys:
    """Keys from the credential service's Source, found through the daemon when first
    needed (the service is required, so it is ready by then)."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self._source = source
        self._keys: SourceKeys | None = None

    def _get(self) -> SourceKeys:
        if self._keys is None:
            try:
                self._keys = SourceKeys(self._source())
            except LookupError as exc:
                raise Unavailable(f"credentials: {exc}") from None
        return self._keys

    def current(self) -> Keys:
        return self._get().current()

    def refresh(self) -> Keys:
        return self._get().refresh()


class StorageService(Service):
    name = "storage"
    ready_on_start = False  # ready once the declared mounts were tried

    def __init__(self, settings: Any, storage: Storage | None = None,
                 source: Callable[[], Any] | None = None) -> None:
        """``source`` returns the credential service's Source (in the daemon); without it
        transfers use the credential server's socket, as the CLI does."""
        self.settings = settings
        if storage is None:
            keys = _DaemonKeys(source) if source is not None else None
            storage = Storage.from_settings(settings, keys=keys)
        self.storage = storage
        self.declared = [_Declared(parse_mount_spec(s, "storage.mounts"))
                         for s in settings.storage.mounts]
        self.outputs = [parse_output_spec(s, "storage.outputs")
                        for s in settings.storage.outputs]
        self.interval = float(settings.storage.mount_check_interval)
        self.last_drain: dict[str, Any] | None = None
        self._wake = threading.Event()
        # The loop's mounting and the drain's unmounting never overlap, and nothing is
        # (re)mounted once a drain began: the loop would remake what the drain just ended.
        self._mounting = threading.Lock()
        self._drained = False

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._open_outputs()
        self._adopt_recorded()
        self._tend()
        self.mark_ready()
        while not self.wait(stop, self.interval):
            self._tend(check=True)
        # Leave the mounts: a restarted agent adopts them (see the module docstring).
        for session in list(self.storage.sessions):
            self.storage.close_output(session)
        self.storage.mounts.let_go_all()

    def _tend(self, check: bool = False) -> None:
        with self._mounting:
            if self._drained:
                return
            self._ensure()
            if check:
                self.storage.mounts.check_all()

    def _open_outputs(self) -> None:
        st = self.settings.storage
        opened = {str(s.local) for s in self.storage.sessions}
        for out in self.outputs:
            if str(out.local) in opened:
                continue
            try:
                Path(out.local).mkdir(parents=True, exist_ok=True)
                self.storage.open_output(Path(out.local), out.dest,
                                         streaming=st.output_streaming)
            except (OSError, StorageError) as exc:
                log.warning("storage output %s: %s", out.local, exc)

    def _ensure(self) -> None:
        now = time.monotonic()
        mounted = {m.dest for m in self.storage.mounts.mounts()}
        for d in self.declared:
            dest = Path(d.entry.destination)
            if d.state == "ok" and (d.entry.is_nas or dest in mounted):
                continue
            if now < d.next_try:
                continue
            try:
                if isinstance(d.entry.source, NasSource):
                    self._nas(d)
                else:
                    self.storage.mount(d.entry.source, dest, origin="settings",
                                       user=SETTINGS_USER)
                d.state, d.error, d.failures = "ok", "", 0
            except StorageError as exc:
                d.failed(str(exc))

    def _nas(self, d: _Declared) -> None:
        from guestagent.storage import nas

        st = self.settings.storage
        plan = nas.plan(d.entry, version=st.nas_version, lock=st.nas_lock,
                        automount=st.nas_automount)
        if not nas.kernel_has_nfs():
            raise StorageError("this kernel has no NFS client; the mount unit would be "
                               f"{plan.start_unit} (see 'guestagent storage nas plan')")
        nas.check_preflight(nas.preflight(plan.source), plan.source)
        nas.install(plan)

    def _adopt_recorded(self) -> None:
        """Supervise mounts made by ``storage mount`` (and by an earlier agent)."""
        from guestagent.storage.mounts import records

        declared = {Path(d.entry.destination) for d in self.declared}
        options = mount_options(self.settings)
        for record in records(options.run_dir):
            dest = Path(str(record.get("dest")))
            origin = str(record.get("origin", "cli"))
            if dest in declared or origin == "task":
                continue  # _ensure adopts it through the table; a task's, its scheduler
            try:
                self._adopt_one(record, dest, origin, options)
            except StorageError as exc:
                log.warning("storage: cannot supervise the mount at %s: %s", dest, exc)

    def _adopt_one(self, record: dict[str, Any], dest: Path, origin: str,
                   options: Any) -> None:
        from guestagent.storage.mounts import Mount

        user = SETTINGS_USER if origin == "settings" else CLI_USER
        users = options.refs.users(str(dest))
        if options.refs.record(str(dest)) is not None and user not in users:
            return  # counted out already (``storage umount``): the mount is its users'
        source = OssUrl.parse(str(record.get("source")))
        if origin == "settings":
            # Declared by the settings an earlier agent ran with, not by ours: counted
            # out; unmounted unless another user still reads it.
            undo = partial(unmount_record, options.run_dir)
            if options.refs.release(str(dest), SETTINGS_USER, undo) is None:
                undo(Record(str(dest), str(source), "ro"))
            log.warning("storage: %s no longer in [storage] mounts: counted out (users "
                        "left: %s)", dest, ", ".join(options.refs.users(str(dest))) or "none")
            return
        mount = Mount(source, dest, self.storage.rclone_remote(), options, origin=origin)
        self.storage.mounts.add(mount, CLI_USER)

    # -- drain -----------------------------------------------------------------------------

    def drain(self, deadline: float) -> None:
        """Flush every pending output/log upload, then unmount; report what is left."""
        started = time.monotonic()
        reports = self.storage.flush_all(deadline - UNMOUNT_RESERVE)
        left = {local: r.as_dict() for local, r in reports.items() if not r.complete}
        self.last_drain = {
            "seconds": round(time.monotonic() - started, 3),
            "uploaded": sum(len(r.uploaded) for r in reports.values()),
            "incomplete": left,
        }
        if left:
            log.error("storage drain: uploads not finished: %s", left)
        for session in list(self.storage.sessions):
            self.storage.close_output(session)
        with self._mounting:
            self._drained = True
            self.storage.mounts.stop_all(grace=max(0.5, min(5.0, deadline - time.monotonic())))

    # -- reporting -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        rows = self.storage.mounts.describe()
        made = {r["dest"] for r in rows}
        for d in self.declared:
            dest = str(d.entry.destination)
            if dest in made:
                continue
            row: dict[str, Any] = {"source": str(d.entry.source), "dest": dest,
                                   "kind": "nas" if d.entry.is_nas else "oss",
                                   "origin": "settings", "health": d.state}
            if d.error:
                row["error"] = d.error
            rows.append(row)
        out: dict[str, Any] = {
            "mounts": rows,
            "pending_uploads": self.storage.pending_uploads(),
            "outputs": [s.describe() for s in list(self.storage.sessions)],
        }
        if self.last_drain is not None:
            out["drain"] = self.last_drain
        return out

    def summary(self) -> str | None:
        rows = self.status()["mounts"]
        ok = sum(1 for r in rows if r.get("health") == "ok")
        text = f"{ok}/{len(rows)} mount(s) ok, {self.storage.pending_uploads()} pending upload(s)"
        bad = [f"{r['dest']} {r.get('health')}" for r in rows if r.get("health") != "ok"]
        return text + (f"; {', '.join(bad)}" if bad else "")

    def problem(self) -> str | None:
        for d in self.declared:
            if d.error:
                return f"{d.entry.destination}: {d.error}"
        for m in self.storage.mounts.mounts():
            if m.health not in ("ok", "new"):
                return f"{m.dest}: {m.health}" + (f" ({m.last_error})" if m.last_error else "")
        return None

    def healthy(self) -> bool:
        return all(d.state != "error" for d in self.declared) and all(
            m.health in ("ok", "new") for m in self.storage.mounts.mounts())


__all__ = ["StorageService"]
