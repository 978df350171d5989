"""Checks that what arrived is what was sent: MD5 / multipart ETag, and OSS's CRC64.

- A single-PUT object's ETag is the hex MD5 of its bytes.
- A multipart object's ETag is ``md5(md5(part1) + md5(part2) + ...)-N``; it can be checked
  when the part boundaries are known (our uploads record their part size in the object's
  metadata, so our downloads align their ranges with the parts and hash each range).
- OSS adds ``x-oss-hash-crc64ecma`` (CRC-64/XZ, decimal) to its answers; it is checked
  with ``fastcrc`` (a dependency: a compiled wheel, several GB/s, the GIL released while it
  runs, so computing it as the bytes arrive costs little), or crcmod's C extension where
  fastcrc is missing. A pure-Python CRC would cap a transfer at a few MB/s: with neither,
  the check is skipped with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from guestagent.storage.errors import StorageError

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # read back in cache-sized blocks (see s3.READ_CHUNK)
_PLAIN_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTI_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")


def md5() -> Any:
    return hashlib.md5(usedforsecurity=False)


def file_md5(fd: int, offset: int = 0, length: int | None = None) -> bytes:
    """MD5 of ``length`` bytes of an open file from ``offset`` (to the end if None)."""
    h = md5()
    end = os.fstat(fd).st_size if length is None else offset + length
    pos = offset
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            raise OSError(f"file shrank while reading (at byte {pos})")
        h.update(chunk)
        pos += len(chunk)
    return bytes(h.digest())


def is_plain(etag: str) -> bool:
    """The ETag is a whole-object MD5 (single PUT)."""
    return bool(_PLAIN_ETAG.fullmatch(etag.lower()))


def parts_of(etag: str) -> int | None:
    """N of a multipart ETag ``...-N``, else None."""
    match = _MULTI_ETAG.fullmatch(etag.lower())
    return int(match.group(1)) if match else None


def composite(digests: Iterable[bytes]) -> str:
    parts = list(digests)
    joined = md5()
    for d in parts:
        joined.update(d)
    return f"{joined.hexdigest()}-{len(parts)}"


Crc64 = Callable[[bytes | bytearray | memoryview, int], int]


@functools.cache
def crc64_function() -> Crc64 | None:
    """CRC-64/XZ (OSS's crc64ecma) as ``f(data, crc) -> crc`` (chainable: ``f(b, f(a, 0))
    == f(a + b, 0)``) from a compiled implementation, or None."""
    try:
        from fastcrc import crc64

        xz = crc64.xz

        def fast(data: bytes | bytearray | memoryview, crc: int) -> int:
            return xz(data, crc)

        return fast
    except ImportError:
        pass
    try:
        import crcmod  # type: ignore[import-untyped]
        import crcmod._crcfunext  # type: ignore[import-untyped]  # the C version
    except ImportError:
        log.warning("neither fastcrc nor crcmod's C extension is installed: OSS's CRC64 "
                    "is not checked (pip install fastcrc)")
        return None
    fn = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)

    def update(data: bytes | bytearray | memoryview, crc: int) -> int:
        return int(fn(data, crc))

    return update


def file_crc64(fd: int, offset: int = 0, length: int | None = None) -> int | None:
    update = crc64_function()
    if update is None:
        return None
    end = os.fstat(fd).st_size if length is None else offset + length
    crc, pos = 0, offset
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            break
        crc = update(chunk, crc)
        pos += len(chunk)
    return crc


def file_crc64_of(data: bytes) -> int:
    """CRC64 of bytes in memory (tests, small bodies); 0 without an implementation."""
    update = crc64_function()
    return update(data, 0) if update is not None else 0


def crc64_problem(got: int | None, header: str | None, where: str) -> str | None:
    """An error message if OSS sent a CRC64 (``header``) that ``got`` does not match."""
    if not header or got is None:
        return None
    if str(got) != header.strip():
        return f"{where}: CRC64 mismatch (server {header.strip()}, local {got})"
    return None


def check_crc64(fd: int, header: str | None, where: str) -> str | None:
    """An error message if OSS sent a CRC64 that the file does not match."""
    if not header:
        return None
    return crc64_problem(file_crc64(fd), header, where)


class StreamCrc:
    """OSS's CRC64 of a body written in order, taken as it arrives when the server is
    known (or seen, in the answer's headers) to send one; else checked from the file."""

    def __init__(self, expected: str | None) -> None:
        self.update_fn = crc64_function()
        self.value: int | None = 0 if expected and self.update_fn else None
        self.next = 0  # the offset the running value has reached

    def begin(self, headers: Mapping[str, str]) -> None:
        if self.value is None and self.next == 0 and self.update_fn and headers.get(
                "x-oss-hash-crc64ecma"):
            self.value = 0

    def update(self, offset: int, data: memoryview) -> None:
        if self.value is not None and self.update_fn is not None:
            if offset != self.next:  # not in order after all: check from the file
                self.value = None
                return
            self.value = self.update_fn(data, self.value)
            self.next += len(data)

    def problem(self, fd: int, header: str | None, where: str) -> str | None:
        if not header:
            return None
        if self.value is not None and self.next == os.fstat(fd).st_size:
            return crc64_problem(self.value, header, where)
        return check_crc64(fd, header, where)


class Follower:
    """Sums a file being downloaded in parts (MD5 and/or OSS's CRC64), in order, as far as
    the done parts reach. One thread sums at a time; the others go back to downloading.
    It reads the page cache into one reused buffer (no allocation per chunk)."""

    def __init__(self, fd: int, part: int, size: int, done: Mapping[int, str], *,
                 want_md5: bool, want_crc: bool) -> None:
        self.fd, self.part, self.size, self.done = fd, part, size, done
        self.digest = md5() if want_md5 else None
        self.crc_fn = crc64_function() if want_crc else None
        self.crc = 0
        self.next = 1
        self._lock = threading.Lock()
        self._buf = bytearray(CHUNK)

    def catch_up(self, *, wait: bool) -> None:
        if not self._lock.acquire(blocking=wait):
            return
        try:
            view = memoryview(self._buf)
            while self.next in self.done:
                pos = (self.next - 1) * self.part
                end = min(pos + self.part, self.size)
                while pos < end:
                    n = os.preadv(self.fd, [view[:min(len(view), end - pos)]], pos)
                    if not n:
                        raise StorageError("download shrank while being checked")
                    if self.digest is not None:
                        self.digest.update(view[:n])
                    if self.crc_fn is not None:
                        self.crc = self.crc_fn(view[:n], self.crc)
                    pos += n
                self.next += 1
        finally:
            self._lock.release()

    def finish(self) -> str:
        self.catch_up(wait=True)
        return str(self.digest.hexdigest()) if self.digest is not None else ""

    def crc_problem(self, fd: int, header: str | None, where: str) -> str | None:
        """The CRC64 check, from the running value when this follower took it."""
        if self.crc_fn is None:
            return check_crc64(fd, header, where)
        self.catch_up(wait=True)
        return crc64_problem(self.crc, header, where)
