"""One large object downloaded in ranges: resumable to the byte, checked as it lands.

- Ranges are fetched in order, ``concurrency`` at a time, into the ``.part`` file. They
  start at the part size and double every ``concurrency`` ranges up to ``SPAN_MAX``: the
  first bytes land soon (the check below starts at once), and the rest comes in few, long
  GETs (each GET costs the server CPU; on a small machine that CPU is the client's too).
  A multipart object uploaded by us (part size in its metadata) is fetched part by part
  instead, each part's MD5 taken as it arrives, for the multipart ETag.
- The resume record holds how many bytes of each range have landed (written at most every
  ``state.SAVE_INTERVAL``, always after the bytes it counts): after kill -9 only what had
  not landed is fetched again. Trusted within one boot only (see ``state.boot_id``).
- A whole-object MD5 (a plain ETag, or the ``md5chksum`` metadata rclone and ossutil give
  multipart objects) and OSS's CRC64 are summed by one thread that follows the landed
  bytes in order, from the page cache, while later ranges still arrive.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guestagent.storage import integrity
from guestagent.storage.errors import StorageError
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.s3 import ObjectInfo
from guestagent.storage.settings import MiB
from guestagent.storage.state import Record, boot_id

if TYPE_CHECKING:
    from guestagent.storage.transfer import Transfers

log = logging.getLogger(__name__)

SPAN_MAX = 64 * MiB  # one GET at most; rclone's multi-thread chunk is the same size
STEP = 4 * MiB  # the summer wakes when this much more has landed
Span = tuple[int, int]  # offset, length


def plan(size: int, first: int, streams: int) -> list[Span]:
    """The ranges of a ``size``-byte object: ``streams`` of ``first`` bytes, then each
    group of ``streams`` twice as long as the last, up to ``SPAN_MAX``."""
    spans: list[Span] = []
    span, pos = first, 0
    cap = max(first, SPAN_MAX)
    while pos < size:
        spans.append((pos, min(span, size - pos)))
        pos += span
        if len(spans) % streams == 0:
            span = min(cap, span * 2)
    return spans


def aligned_plan(size: int, part: int) -> list[Span]:
    return [(off, min(part, size - off)) for off in range(0, size, part)]


class Landed:
    """How many bytes of each range are in the ``.part`` file, shared by the writers, the
    summing thread and the resume record (saved under the same lock, so it never claims a
    byte before its write returned)."""

    def __init__(self, spans: list[Span], got: list[int], rec: Record) -> None:
        self.spans, self.got, self.rec = spans, got, rec
        self.cond = threading.Condition()
        self.front = 0  # the first range not complete
        self.ended = self.failed = False
        self.wanted = 0  # the prefix the summer waits for
        self._advance_front()

    def _advance_front(self) -> None:
        while self.front < len(self.spans) and self.got[self.front] == self.spans[self.front][1]:
            self.front += 1

    def prefix(self) -> int:
        """Bytes from the start of the object that have all landed."""
        if self.front == len(self.spans):
            return self.spans[-1][0] + self.spans[-1][1] if self.spans else 0
        return self.spans[self.front][0] + self.got[self.front]

    def add(self, i: int, n: int) -> None:
        with self.cond:
            self.got[i] += n
            if i == self.front:
                self._advance_front()
                if self.prefix() >= self.wanted:
                    self.cond.notify_all()
            self.rec.save(force=False, durable=False)

    def wait_past(self, pos: int, step: int) -> int | None:
        """The landed prefix once it is ``step`` bytes past ``pos`` (or all landed); None
        if nothing more will land. Waking for every block cost more than the summing."""
        with self.cond:
            self.wanted = pos + step
            while not self.ended and self.prefix() < self.wanted:
                self.cond.wait()
            end = self.prefix()
            return end if end > pos and not self.failed else None

    def end(self, *, failed: bool = False) -> None:
        """No more bytes will land: all did, or the download failed (stop summing)."""
        with self.cond:
            self.ended, self.failed = True, failed
            self.cond.notify_all()


class Summer(threading.Thread):
    """Sums the file in order as far as it has landed (MD5 and/or CRC64) on its own
    thread: the sums are the longest serial work of a download, so they start with the
    first bytes and never wait for a whole range."""

    def __init__(self, fd: int, landed: Landed, size: int, *, want_md5: bool,
                 expected_crc: str | None) -> None:
        super().__init__(name="oss-sum", daemon=True)
        self.landed, self.size = landed, size
        self.sums = integrity.FileSums(fd, want_md5=want_md5, expected=expected_crc)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.sums.pos < self.size:
                end = self.landed.wait_past(self.sums.pos, STEP)
                if end is None:
                    return
                self.sums.through(end, stop=lambda: self.landed.failed)
        except BaseException as exc:  # re-raised by the caller, in its thread
            self.error = exc

    def result(self) -> integrity.FileSums:
        """The sums, over the whole file."""
        if self.is_alive():
            self.join()
        if self.error is not None:
            raise self.error
        if not self.sums.idle and self.sums.pos != self.size:
            raise StorageError("the download ended before every byte was checked")
        return self.sums


def whole_md5(info: ObjectInfo) -> str | None:
    """The whole object's MD5 (hex) when the server says it: a plain ETag, or for a
    multipart object the ``md5chksum`` metadata (base64) that rclone and ossutil record."""
    if integrity.is_plain(info.etag):
        return info.etag.lower()
    given = info.meta.get("md5chksum", "")
    try:
        raw = base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def fetch(t: Transfers, src: OssUrl, info: ObjectInfo, partial: Path, local: Path, *,
          aligned: int | None) -> tuple[bool, str | None]:
    """Download ``src`` into ``partial``; (resumed, a problem found by the checks)."""
    from guestagent.storage.transfer import _open_partial, _reserve

    size = info.size
    streams = t.options.concurrency
    first = t.options.part_size_for(size)
    spans = aligned_plan(size, aligned) if aligned else plan(size, first, streams)
    shape = f"aligned/{aligned}" if aligned else f"{first}/{streams}/{SPAN_MAX}"
    with t.state.unit("downloads", src.bucket, src.key, str(local.resolve())) as rec:
        d = rec.data
        counts = _counts(d.get("got"), spans)
        resumed = (
            (d.get("etag"), d.get("size"), d.get("plan"), d.get("boot"))
            == (info.etag, size, shape, boot_id())
            and counts is not None
            and partial.exists() and partial.stat().st_size == size
        )
        if resumed and counts is not None:
            fd = os.open(partial, os.O_RDWR)
            got = counts
        else:
            fd = _open_partial(partial)
            got = [0] * len(spans)
        try:
            if not resumed:
                _reserve(fd, size)
            rec.data = {"bucket": src.bucket, "key": src.key, "etag": info.etag, "size": size,
                        "plan": shape, "boot": boot_id(), "got": got}
            rec.save(durable=False)
            if resumed:
                t.progress.advance(sum(got))
                log.info("%s: resuming download, %d of %d bytes already here", src,
                         sum(got), size)
            problem = _Download(t, src, info, fd, Landed(spans, got, rec)).run(bool(aligned))
        finally:
            os.close(fd)
        rec.remove()
    return resumed, problem


def _counts(recorded: Any, spans: list[Span]) -> list[int] | None:
    """The landed byte counts of a record, if they fit the ranges (else start over)."""
    if not isinstance(recorded, list) or len(recorded) != len(spans):
        return None
    if not all(type(g) is int and 0 <= g <= n for g, (_, n) in zip(recorded, spans,
                                                                    strict=True)):
        return None
    return list(recorded)


class _Download:
    """The ranges of one object fetched on the transfers' part pool, and its checks."""

    def __init__(self, t: Transfers, src: OssUrl, info: ObjectInfo, fd: int,
                 landed: Landed) -> None:
        self.t, self.src, self.info, self.fd, self.landed = t, src, info, fd, landed
        self.part_md5: dict[int, bytes] = {}

    def run(self, per_part: bool) -> str | None:
        info = self.info
        want = None if per_part else whole_md5(info)
        summer = Summer(self.fd, self.landed, info.size, want_md5=want is not None,
                        expected_crc=info.crc64)
        if not summer.sums.idle:
            summer.start()
        try:
            self.t._run_all(self._range_job(per_part), list(range(len(self.landed.spans))))
        except BaseException:
            self.landed.end(failed=True)
            if summer.is_alive():
                summer.join()  # before the caller closes the file it reads
            raise
        self.landed.end()
        sums = summer.result()
        where = str(self.src)
        problem = None
        if per_part:
            problem = self._composite_problem(where)
        elif want is not None and sums.md5_hex() != want:
            problem = f"{where}: MD5 {sums.md5_hex()} does not match the server's {want}"
        return problem or sums.crc_problem(info.crc64, where)

    def _range_job(self, per_part: bool) -> Callable[[int], None]:
        """Fetch what is missing of range ``i``; ``per_part``: also take its MD5 (what had
        landed before a resume is read back from the file)."""

        def one(i: int) -> None:
            offset, length = self.landed.spans[i]
            have = self.landed.got[i]
            if not per_part:
                if have < length:
                    self._into_file(i, offset + have, offset + length)
                return
            digest = integrity.md5()
            integrity.update_from_file(digest, self.fd, offset, have)
            if have < length:
                self._through_python(i, offset + have, offset + length, digest)
            self.part_md5[i] = bytes(digest.digest())

        return one

    def _into_file(self, i: int, start: int, end: int) -> None:
        landed, advance = self.landed, self.t.progress.advance

        def done(pos: int, n: int) -> None:
            landed.add(i, n)
            advance(n)

        self.t.client.get_range_into(self.src.bucket, self.src.key, start, end, fd=self.fd,
                                     landed=done, etag=self.info.etag)

    def _through_python(self, i: int, start: int, end: int, digest: Any) -> None:
        fd, landed, advance = self.fd, self.landed, self.t.progress.advance

        def write(pos: int, data: memoryview) -> None:
            os.pwrite(fd, data, pos)
            digest.update(data)
            landed.add(i, len(data))
            advance(len(data))

        self.t.client.get_range(self.src.bucket, self.src.key, start, end, write,
                                etag=self.info.etag)

    def _composite_problem(self, where: str) -> str | None:
        count, etag = len(self.landed.spans), self.info.etag
        if integrity.parts_of(etag) != count or len(self.part_md5) != count:
            return None
        got = integrity.composite(self.part_md5[i] for i in range(count))
        return None if got == etag.lower() else f"{where}: multipart ETag {etag}, computed {got}"
