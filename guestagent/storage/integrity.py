"""Checks that what arrived is what was sent: MD5 / multipart ETag, and OSS's CRC64.

- A single-PUT object's ETag is the hex MD5 of its bytes.
- A multipart object's ETag is ``md5(md5(part1) + md5(part2) + ...)-N``; it can be checked
  when the part boundaries are known (our uploads record their part size in the object's
  metadata, so our downloads align their ranges with the parts and hash each range).
- OSS adds ``x-oss-hash-crc64ecma`` (CRC-64/XZ, decimal) to its answers; it is checked
  when the C-accelerated ``crcmod`` is importable (a pure-Python CRC would cap a transfer
  at a few MB/s), otherwise skipped with a debug line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
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
    return bool(_PLAIN_ETAG.match(etag.lower()))


def parts_of(etag: str) -> int | None:
    """N of a multipart ETag ``...-N``, else None."""
    match = _MULTI_ETAG.match(etag.lower())
    return int(match.group(1)) if match else None


def composite(digests: Iterable[bytes]) -> str:
    parts = list(digests)
    joined = md5()
    for d in parts:
        joined.update(d)
    return f"{joined.hexdigest()}-{len(parts)}"


def crc64_function() -> Callable[[bytes, int], int] | None:
    """CRC-64/XZ (OSS's crc64ecma) as ``f(data, crc) -> crc`` if a fast one exists."""
    try:
        import crcmod  # type: ignore[import-untyped]
        import crcmod._crcfunext  # type: ignore[import-untyped]  # the C version
    except ImportError:
        return None
    fn = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)

    def update(data: bytes, crc: int) -> int:
        return int(fn(data, crc))

    return update


def file_crc64(fd: int) -> int | None:
    update = crc64_function()
    if update is None:
        return None
    crc, pos, end = 0, 0, os.fstat(fd).st_size
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            break
        crc = update(chunk, crc)
        pos += len(chunk)
    return crc


def check_crc64(fd: int, header: str | None, where: str) -> str | None:
    """An error message if OSS sent a CRC64 that the file does not match."""
    if not header:
        return None
    got = file_crc64(fd)
    if got is None:
        log.debug("%s: crcmod not available; CRC64 not checked", where)
        return None
    if str(got) != header.strip():
        return f"{where}: CRC64 mismatch (server {header}, local {got})"
    return None
