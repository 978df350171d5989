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
import mmap
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # read back in cache-sized blocks (see s3.READ_CHUNK)
# A download's sums read the page cache through a mapping of this size at most (mapped
# pages count in the RSS while mapped).
WINDOW = 16 * 1024 * 1024
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map the window at once: no fault per page
_PLAIN_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTI_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")


def md5() -> Any:
    return hashlib.md5(usedforsecurity=False)


def file_md5(fd: int, offset: int = 0, length: int | None = None) -> bytes:
    """MD5 of ``length`` bytes of an open file from ``offset`` (to the end if None)."""
    h = md5()
    end = os.fstat(fd).st_size if length is None else offset + length
    update_from_file(h, fd, offset, end - offset)
    return bytes(h.digest())


def update_from_file(h: Any, fd: int, offset: int, length: int) -> None:
    """Feed ``length`` bytes of an open file from ``offset`` to the hash ``h``."""
    pos, end = offset, offset + length
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            raise OSError(f"file shrank while reading (at byte {pos})")
        h.update(chunk)
        pos += len(chunk)


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


class FileSums:
    """MD5 and/or OSS's CRC64 of a file that is being written in order, read back from the
    page cache as far as it has landed. The CRC64 is taken when the server is known
    (``expected``), or seen in the answer's headers (``begin``), to send one; otherwise it
    is left to :func:`check_crc64`."""

    def __init__(self, fd: int, *, want_md5: bool, expected: str | None = None) -> None:
        self.fd = fd
        self.digest = md5() if want_md5 else None
        self.crc_fn = crc64_function()
        self.crc: int | None = 0 if expected and self.crc_fn else None
        self.pos = 0  # bytes summed from the start of the file

    def begin(self, headers: Mapping[str, str]) -> None:
        if self.crc is None and self.pos == 0 and self.crc_fn and headers.get(
                "x-oss-hash-crc64ecma"):
            self.crc = 0

    @property
    def idle(self) -> bool:
        return self.digest is None and self.crc is None

    def through(self, end: int, stop: Callable[[], bool] = lambda: False) -> None:
        """Sum the file up to byte ``end`` (all of it landed), unless ``stop()``."""
        if end <= self.pos:
            return
        if self.idle:
            self.pos = end
        elif end - self.pos <= CHUNK:  # a small object: one read costs less than a mapping
            data = os.pread(self.fd, end - self.pos, self.pos)
            if len(data) != end - self.pos:
                raise OSError(f"file shrank while being checked (at byte {self.pos})")
            self._add(memoryview(data))
            self.pos = end
        else:
            self._mapped(end, stop)

    def _mapped(self, end: int, stop: Callable[[], bool]) -> None:
        """The page cache is mapped a window at a time and summed in place: no copy, and
        one call (the GIL released) per window, not per block, so other threads run."""
        while self.pos < end and not stop():
            base = self.pos - self.pos % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + WINDOW) - base
            with (mmap.mmap(self.fd, length, mmap.MAP_SHARED | _POPULATE, mmap.PROT_READ,
                            offset=base) as window,
                  memoryview(window) as view, view[self.pos - base:] as block):
                self._add(block)
            self.pos = base + length

    def feed(self, offset: int, data: memoryview) -> None:
        """Sum ``data``, just written at ``offset``, from memory (it is in order: the
        file up to it has been summed)."""
        self.through(offset)
        self._add(data)
        self.pos += len(data)

    def _add(self, block: memoryview) -> None:
        if self.digest is not None:
            self.digest.update(block)
        if self.crc is not None and self.crc_fn is not None:
            self.crc = self.crc_fn(block, self.crc)

    def md5_hex(self) -> str | None:
        return self.digest.hexdigest() if self.digest is not None else None

    def crc_problem(self, header: str | None, where: str) -> str | None:
        """The CRC64 check, from the running value when it covers the whole file."""
        if not header:
            return None
        if self.crc is not None and self.pos == os.fstat(self.fd).st_size:
            return crc64_problem(self.crc, header, where)
        return check_crc64(self.fd, header, where)
