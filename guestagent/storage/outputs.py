"""OutputMapping and LogMapping uploads: at the end of a task, on a spot drain, and (when
asked) as each file is closed.

A :class:`OutputSession` remembers what it uploaded (size and mtime of each file), so a
later upload (the end of the task, a drain) sends only files that are new or changed.
Streaming sessions watch the directory with inotify (the ``watchdog`` package, imported
only when used) and upload a file as soon as its writer closes it. Symlinks are never
followed: a link in an output directory could point anywhere on the machine.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from guestagent.storage.errors import StorageError
from guestagent.storage.ossurl import OssUrl

log = logging.getLogger(__name__)


class Uploader(Protocol):
    def upload_file(self, local: Path, url: OssUrl) -> object: ...


@dataclass
class FlushReport:
    """What one upload round did, and what it could not finish."""

    uploaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> one-line reason
    unfinished: list[str] = field(default_factory=list)  # left when the deadline came
    skipped: list[str] = field(default_factory=list)  # symlinks and special files

    @property
    def complete(self) -> bool:
        return not self.failed and not self.unfinished

    def as_dict(self) -> dict[str, Any]:
        return {"uploaded": len(self.uploaded), "failed": dict(self.failed),
                "unfinished": list(self.unfinished), "skipped": list(self.skipped)}


class OutputSession:
    """One local directory (or file) whose content goes to an OSS directory (or object)."""

    def __init__(self, local: Path, dest: OssUrl, uploader: Uploader, *,
                 streaming: bool = False, kind: str = "output") -> None:
        self.local = Path(local)
        self.dest = dest
        self.uploader = uploader
        self.streaming = streaming
        self.kind = kind  # output, log
        self._done: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._lock = threading.Lock()  # one upload round at a time
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._observer: Any = None
        self._worker: threading.Thread | None = None
        self.streamed = 0
        self.last_error = ""

    def __repr__(self) -> str:
        return f"OutputSession({self.local} -> {self.dest})"

    # -- what is pending -------------------------------------------------------------------

    def _target(self, rel: str) -> OssUrl:
        if self.local.is_dir() or self.dest.is_dir:
            return self.dest.join(rel)
        return self.dest

    def _files(self, report: FlushReport) -> dict[str, tuple[int, int]]:
        if self.local.is_file() and not self.local.is_symlink():
            st = self.local.stat()
            return {self.local.name: (st.st_size, st.st_mtime_ns)}
        out: dict[str, tuple[int, int]] = {}
        if not self.local.is_dir():
            return out
        for root, dirs, files in os.walk(self.local):  # never follows symlinked dirs
            base = Path(root)
            for name in [*files, *(d for d in dirs if (base / d).is_symlink())]:
                path = base / name
                rel = str(path.relative_to(self.local))
                try:
                    st = path.lstat()
                except OSError:
                    continue  # removed meanwhile
                if not path.is_file() or path.is_symlink():
                    report.skipped.append(rel)
                    continue
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pending(self) -> list[str]:
        """Files new or changed since their last upload."""
        files = self._files(FlushReport())
        return sorted(rel for rel, sig in files.items() if self._done.get(rel) != sig)

    # -- uploading -------------------------------------------------------------------------

    def _upload(self, rel: str, report: FlushReport) -> None:
        path = self.local if self.local.is_file() else self.local / rel
        try:
            st = path.lstat()
            sig = (st.st_size, st.st_mtime_ns)
            if self._done.get(rel) == sig:
                return
            self.uploader.upload_file(path, self._target(rel))
        except FileNotFoundError:
            return  # removed before we got to it: nothing to send
        except (StorageError, OSError) as exc:
            report.failed[rel] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.last_error = report.failed[rel]
            log.warning("%s %s: upload of %s failed: %s", self.kind, self.local, rel,
                        report.failed[rel])
            return
        self._done[rel] = sig
        report.uploaded.append(rel)

    def flush(self, deadline: float | None = None) -> FlushReport:
        """Upload everything pending; stop starting new files at ``deadline`` (monotonic)."""
        report = FlushReport()
        with self._lock:
            files = self._files(report)
            todo = sorted(rel for rel, sig in files.items() if self._done.get(rel) != sig)
            for i, rel in enumerate(todo):
                if deadline is not None and time.monotonic() >= deadline:
                    report.unfinished = todo[i:]
                    break
                self._upload(rel, report)
        if report.uploaded or not report.complete:
            log.info("%s %s -> %s: %d uploaded, %d failed, %d unfinished", self.kind,
                     self.local, self.dest, len(report.uploaded), len(report.failed),
                     len(report.unfinished))
        return report

    # -- streaming -------------------------------------------------------------------------

    def start(self) -> None:
        """Begin watching (streaming sessions): a closed file is uploaded right away."""
        if not self.streaming or self._observer is not None:
            return
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.local.mkdir(parents=True, exist_ok=True)
        session = self

        class Handler(FileSystemEventHandler):
            def on_closed(self, event: FileSystemEvent) -> None:
                session._queue.put(os.fsdecode(event.src_path))

            def on_created(self, event: FileSystemEvent) -> None:
                # A new directory is watched a moment after it appears: files closed in it
                # before then sent no event, so look at what is already there.
                if event.is_directory:
                    for path in Path(os.fsdecode(event.src_path)).rglob("*"):
                        session._queue.put(str(path))

            def on_moved(self, event: FileSystemEvent) -> None:
                if not event.is_directory:
                    session._queue.put(os.fsdecode(event.dest_path))

        observer = Observer()
        observer.schedule(Handler(), str(self.local), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._worker = threading.Thread(target=self._stream, name=f"stream {self.local}",
                                        daemon=True)
        self._worker.start()

    def _stream(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path = Path(item)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                rel = str(path.relative_to(self.local))
            except ValueError:
                continue
            report = FlushReport()
            with self._lock:
                self._upload(rel, report)
                self.streamed += len(report.uploaded)

    def stop_watching(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5.0)
            self._observer = None
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(30.0)
            self._worker = None

    def finish(self, deadline: float | None = None) -> FlushReport:
        """The end of the task: stop watching, upload what changed."""
        self.stop_watching()
        return self.flush(deadline)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "local": str(self.local),
                               "dest": str(self.dest), "streaming": self.streaming,
                               "uploaded": len(self._done), "pending": len(self.pending())}
        if self.streaming:
            out["streamed"] = self.streamed
        if self.last_error:
            out["error"] = self.last_error
        return out


__all__ = ["FlushReport", "OutputSession", "Uploader"]
