"""Progress of a transfer: a bar on a terminal (tqdm, imported only then), JSON lines with
``--json``, or nothing. All sinks are thread-safe: parts and files report from workers."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

JSON_INTERVAL = 0.5


class BarProgress:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]  # lazily: only an interactive CLI run pays for it

        self._bar: Any = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                              file=stream, dynamic_ncols=True, leave=True)
        self._lock = threading.Lock()
        self._files = self._done = 0

    def expect(self, nbytes: int, files: int) -> None:
        with self._lock:
            self._bar.total = (self._bar.total or 0) + nbytes
            self._files += files
            self._bar.refresh()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def finished(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_postfix_str(f"{self._done}/{self._files} files", refresh=False)

    def close(self) -> None:
        self._bar.close()


class JsonProgress:
    """``{"event": "progress", ...}`` at most every half second, then ``"done"``."""

    def __init__(self, stream: TextIO = sys.stdout, clock: Any = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._last = 0.0
        self.total = self.nbytes = self.files = self.files_done = 0

    def _emit(self, event: str, **extra: Any) -> None:
        elapsed = max(1e-9, self._clock() - self._start)
        doc = {"event": event, "bytes": self.nbytes, "total_bytes": self.total,
               "files": self.files_done, "total_files": self.files,
               "mb_per_s": round(self.nbytes / elapsed / 1e6, 2), **extra}
        self._stream.write(json.dumps(doc) + "\n")
        self._stream.flush()

    def expect(self, nbytes: int, files: int) -> None:
        with self._lock:
            self.total += nbytes
            self.files += files

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.nbytes += nbytes
            now = self._clock()
            if now - self._last >= JSON_INTERVAL:
                self._last = now
                self._emit("progress")

    def finished(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.files_done += 1

    def close(self) -> None:
        with self._lock:
            self._emit("done")


class NoProgress:
    """Nothing shown (not a terminal, or no tqdm); what a transfer reports to by default."""

    def expect(self, nbytes: int, files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finished(self, name: str, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


def choose(
    json_lines: bool, stream: TextIO = sys.stderr
) -> BarProgress | JsonProgress | NoProgress:
    if json_lines:
        return JsonProgress()
    if stream.isatty():
        try:
            return BarProgress(stream)
        except ImportError:
            return NoProgress()
    return NoProgress()
