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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
