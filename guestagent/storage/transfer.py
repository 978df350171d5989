"""Object transfers: one file up or down, resumable, verified, never half-visible.

- Upload: below ``multipart_threshold`` one PUT with ``Content-MD5`` (atomic on the
  server). Above it a multipart upload whose id and done parts are kept in the state dir;
  after kill -9 the same command resumes it (the server's ListParts is the truth, each part
  re-checked against the local bytes). A multipart object is invisible until Complete.
- Download: into ``<name>.part``, renamed over ``<name>`` only when complete and verified.
  Large objects come in parallel ranges (:mod:`guestagent.storage.ranges`) whose record
  of landed bytes lets kill -9 resume.

Trees, sync and remove live in :mod:`guestagent.storage.trees` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from xml.etree import ElementTree

from guestagent.storage import integrity, localdirs
from guestagent.storage.errors import BadInput, NotFound, StorageError
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.progress import NoProgress
from guestagent.storage.s3 import (
    CRC64_HEADER,
    FileSlice,
    LocalWriteError,
    ObjectInfo,
    S3Client,
    info_from_headers,
)
from guestagent.storage.settings import MAX_PARTS, MiB, StorageSettings
from guestagent.storage.state import Record, StateDir

log = logging.getLogger(__name__)

SMALL = 1 * MiB  # bodies up to this are read into memory; larger ones are streamed
PART_SUFFIX = ".part"


class IntegrityError(StorageError):
    """The bytes that arrived do not match the server's checksum."""


class Progress(Protocol):
    def expect(self, nbytes: int, files: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finished(self, name: str, nbytes: int) -> None: ...


@dataclass(frozen=True)
class Options:
    state_dir: Path
    part_size: int = 8 * MiB
    multipart_threshold: int = 32 * MiB
    concurrency: int = 8

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> Options:
        st: StorageSettings = settings.storage
        values: dict[str, Any] = {
            "state_dir": st.state_dir or Path(settings.daemon.state_dir) / "storage",
            "part_size": st.part_size,
            "multipart_threshold": st.multipart_threshold,
            "concurrency": st.concurrency,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def part_size_for(self, size: int) -> int:
        """The configured part size, grown (to whole MiB) if the file needs > 10,000 parts."""
        if size <= self.part_size * MAX_PARTS:
            return self.part_size
        return math.ceil(size / MAX_PARTS / MiB) * MiB


@dataclass(frozen=True)
class Outcome:
    local: Path
    url: OssUrl
    size: int
    skipped: bool = False
    resumed: bool = False


class Transfers:
    """File transfers sharing one client, one part pool and one progress sink."""

    def __init__(
        self, client: S3Client, options: Options, progress: Progress | None = None
    ) -> None:
        self.client = client
        self.options = options
        self.progress: Progress = progress or NoProgress()
        self.state = StateDir(options.state_dir)
        self._parts = ThreadPoolExecutor(options.concurrency, thread_name_prefix="oss-part")

    def close(self) -> None:
        self._parts.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def __enter__(self) -> Transfers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- upload ----------------------------------------------------------------------------

    def upload_file(self, local: Path, dest: OssUrl, *, announce: bool = True) -> Outcome:
        """Upload one file to ``dest`` (an object key; a ``/``-ending URL gets its name)."""
        if dest.is_dir:
            dest = dest.join(local.name)
        try:
            # O_NONBLOCK: opening a FIFO would wait for a writer forever (it is refused
            # below as not a regular file); reads of a regular file ignore the flag.
            fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise BadInput(f"{local}: cannot read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not _is_regular(st.st_mode):
                raise BadInput(f"{local}: not a regular file")
            if st.st_size == 0:
                localdirs.refuse_sizeless(local, fd)
            if announce:
                self.progress.expect(st.st_size, 1)
            if st.st_size < self.options.multipart_threshold:
                self._put(fd, st, local, dest)
                resumed = False
            else:
                try:
                    resumed = self._multipart(fd, st, local, dest)
                except NotFound as exc:
                    if exc.code != "NoSuchUpload":
                        raise
                    # The server forgot the upload (restarted, or aborted it): start over.
                    log.warning("%s: the server lost upload state; starting again", dest)
                    resumed = self._multipart(fd, st, local, dest)
        finally:
            os.close(fd)
        self.progress.finished(str(local), st.st_size)
        return Outcome(local, dest, st.st_size, resumed=resumed)

    def _put(self, fd: int, st: os.stat_result, local: Path, dest: OssUrl) -> None:
        size = st.st_size
        body: bytes | FileSlice
        if size <= SMALL:
            body = os.pread(fd, size, 0) if size else b""
            digest = integrity.md5()
            digest.update(body)
            md5 = bytes(digest.digest())
        else:
            md5 = integrity.file_md5(fd, 0, size)
            body = FileSlice(fd, 0, size)
        resp = self.client.put_object(dest.bucket, dest.key, body, md5, meta=_meta(st))
        etag = resp.headers.get("etag", "").strip('"')
        if integrity.is_plain(etag) and etag.lower() != md5.hex():
            raise IntegrityError(f"{dest}: the server stored different bytes (ETag {etag})")
        self.progress.advance(size)

    def _multipart(self, fd: int, st: os.stat_result, local: Path, dest: OssUrl) -> bool:
        size = st.st_size
        part = self.options.part_size_for(size)
        count = math.ceil(size / part)
        ident = (dest.bucket, dest.key, str(local.resolve()))
        with self.state.unit("uploads", *ident) as rec:
            done = self._resume_upload(rec, fd, st, part, dest)
            resumed = bool(done)
            if not done and not rec.data.get("upload_id"):
                meta = {**_meta(st), "part-size": str(part)}
                upload_id = self.client.create_multipart(dest.bucket, dest.key, meta)
                rec.data = {
                    "bucket": dest.bucket, "key": dest.key, "local": ident[2], "size": size,
                    "mtime_ns": st.st_mtime_ns, "part_size": part, "upload_id": upload_id,
                    "parts": {},
                }
                rec.save()
            upload_id = rec.data["upload_id"]
            self.progress.advance(sum(_span(n, part, size)[1] for n in done))
            lock = threading.Lock()

            def one(n: int) -> None:
                offset, length = _span(n, part, size)
                md5 = integrity.file_md5(fd, offset, length)
                body: bytes | FileSlice = FileSlice(fd, offset, length)
                etag = self.client.upload_part(
                    dest.bucket, dest.key, upload_id, n, body, md5=md5
                )
                if integrity.is_plain(etag) and etag.lower() != md5.hex():
                    raise IntegrityError(f"{dest}: part {n} stored with ETag {etag}")
                with lock:
                    done[n] = etag or md5.hex()
                    rec.data["parts"] = {str(k): v for k, v in done.items()}
                    # No fsync: on resume the server's ListParts is the truth, and the
                    # upload id (saved durably above) is what must survive.
                    rec.save(force=False, durable=False)
                self.progress.advance(length)

            self._run_all(one, [n for n in range(1, count + 1) if n not in done])
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns) != (size, st.st_mtime_ns):
                raise StorageError(f"{local}: changed while uploading; run the upload again")
            self._complete(dest, upload_id, done)
            rec.remove()
        return resumed

    def _resume_upload(
        self, rec: Record, fd: int, st: os.stat_result, part: int, dest: OssUrl
    ) -> dict[int, str]:
        """Parts of an earlier upload of the same file that the server still holds."""
        d = rec.data
        if not d.get("upload_id"):
            return {}
        same = (d.get("size"), d.get("mtime_ns"), d.get("part_size")) == (
            st.st_size, st.st_mtime_ns, part
        )
        held = self.client.list_parts(dest.bucket, dest.key, d["upload_id"]) if same else None
        if held is None:
            if not same:
                self.client.abort_multipart(dest.bucket, dest.key, d["upload_id"])
            rec.data = {}
            return {}
        recorded = {int(k): v for k, v in d.get("parts", {}).items()}
        done: dict[int, str] = {}
        for n, (etag, length) in held.items():
            offset, want = _span(n, part, st.st_size)
            if length != want:
                continue
            if recorded.get(n) == etag or integrity.file_md5(fd, offset, want).hex() == etag:
                done[n] = etag
        log.info("%s: resuming upload, %d parts already there", dest, len(done))
        return done

    def _complete(self, dest: OssUrl, upload_id: str, parts: Mapping[int, str]) -> None:
        try:
            resp = self.client.complete_multipart(dest.bucket, dest.key, upload_id, parts)
            etag = _xml_etag(resp.body)
        except NotFound:
            # A retried Complete whose first attempt succeeded: the object is there.
            info = self.client.head_object(dest.bucket, dest.key)
            if info is None:
                raise
            etag = info.etag
        want = integrity.composite(bytes.fromhex(parts[n]) for n in sorted(parts))
        if integrity.parts_of(etag) is not None and etag.lower() != want:
            raise IntegrityError(f"{dest}: multipart ETag {etag}, expected {want}")

    def _run_all(self, fn: Callable[[int], None], items: list[int]) -> None:
        """Run ``fn`` over ``items`` on the part pool; the first failure cancels the rest."""
        futures: list[Future[None]] = [self._parts.submit(fn, n) for n in items]
        finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for f in pending:
                f.cancel()
            wait(pending)
            exc = failed[0].exception()
            assert exc is not None
            raise exc

    # -- trees (guestagent.storage.trees) -----------------------------------------------------

    def upload_tree(self, local_dir: Path, url: OssUrl, **kw: Any) -> list[str]:
        """Upload every file under ``local_dir`` to the directory ``url``; the keys written."""
        from guestagent.storage import trees

        done = trees.upload_tree(self, local_dir, url, **kw)
        return [url.prefix + rel for rel in done.copied]

    def download_tree(self, url: OssUrl, local_dir: Path, **kw: Any) -> list[str]:
        """Download every object under the directory ``url`` into ``local_dir``; the keys."""
        from guestagent.storage import trees

        done = trees.download_tree(self, url, local_dir, **kw)
        return [url.prefix + rel for rel in done.copied]

    # -- download --------------------------------------------------------------------------

    def download_file(
        self, src: OssUrl, local: Path, info: ObjectInfo | None = None, *,
        announce: bool = True, into_dir: bool = True,
    ) -> Outcome:
        """Download ``src`` to ``local`` (into it, if ``local`` is a directory)."""
        if info is None:
            if src.is_dir:
                raise BadInput(f"{src}: is a directory; download it as a tree (-r)")
            info = self.client.head_object(src.bucket, src.key)
            if info is None:
                raise NotFound(f"{src}: no such object", 404, "NoSuchKey")
        elif not info.meta and not integrity.is_plain(info.etag):
            # A listing carries no metadata: the part size and mtime recorded at upload
            # (what aligned ranges and sync need) come with a HEAD.
            info = self.client.head_object(src.bucket, src.key) or info
        if local.is_dir():
            if not into_dir:
                raise BadInput(f"{local}: is a directory; cannot write {src} there")
            local = local / src.name
        if announce:
            self.progress.expect(info.size, 1)
        localdirs.make_dirs(local.parent, str(src))  # a file in the way: one line
        check_space(local.parent, info.size)
        return self.fetch(src, info, local)

    def fetch(self, src: OssUrl, info: ObjectInfo, local: Path) -> Outcome:
        """Download to exactly ``local`` whose directory exists and has room (checked by
        the caller: trees check once for all their files)."""
        partial = local.with_name(local.name + PART_SUFFIX)
        try:
            if info.size < self.options.multipart_threshold:
                # A listing has no metadata; the GET's own headers carry the mtime.
                info = _with_headers(info, self._get_whole(src, info, partial))
                resumed = False
            else:
                resumed = self._get_ranges(src, info, partial, local)
        except LocalWriteError as exc:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise StorageError(
                f"{local}: {exc}; nothing was left under that name (free space and retry)"
            ) from None
        mtime = _mtime(info)
        try:
            os.utime(partial, (mtime, mtime))
            os.replace(partial, local)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise StorageError(f"{local}: cannot put the download there: {exc.strerror}") from None
        self.progress.finished(str(local), info.size)
        return Outcome(local, src, info.size, resumed=resumed)

    def _get_whole(self, src: OssUrl, info: ObjectInfo, partial: Path) -> Mapping[str, str]:
        from guestagent.storage.ranges import whole_md5

        fd = _open_partial(partial)
        try:
            _reserve(fd, info.size)
            # One pass: each block is summed while still in the CPU's cache, right after
            # it is written (the body arrives in order). Splicing it into the file and
            # summing it back from the page cache, as large objects do, was not faster
            # here under load (bench/storage.py, 100 x 10 MiB).
            want = whole_md5(info)
            sums = integrity.FileSums(fd, want_md5=want is not None, expected=info.crc64)

            def write(offset: int, data: memoryview) -> None:
                os.pwrite(fd, data, offset)
                sums.feed(offset, data)
                self.progress.advance(len(data))

            headers = self.client.get_range(
                src.bucket, src.key, 0, info.size, write, etag=info.etag, begin=sums.begin
            )
            problem = None
            if want is not None and sums.md5_hex() != want:
                problem = f"{src}: MD5 {sums.md5_hex()} does not match ETag {info.etag}"
            problem = problem or sums.crc_problem(headers.get(CRC64_HEADER), str(src))
        finally:
            os.close(fd)
        if problem:
            partial.unlink()
            raise IntegrityError(problem)
        return headers

    def _get_ranges(self, src: OssUrl, info: ObjectInfo, partial: Path, local: Path) -> bool:
        from guestagent.storage import ranges

        resumed, problem = ranges.fetch(self, src, info, partial, local,
                                       aligned=_uploader_part(info))
        if problem:
            partial.unlink()
            raise IntegrityError(problem)
        return resumed


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _span(n: int, part: int, size: int) -> tuple[int, int]:
    offset = (n - 1) * part
    return offset, min(part, size - offset)


def _meta(st: os.stat_result) -> dict[str, str]:
    return {"mtime": f"{st.st_mtime:.6f}"}


def _with_headers(info: ObjectInfo, headers: Mapping[str, str]) -> ObjectInfo:
    """``info`` (from a listing: no metadata, Last-Modified only) completed by the GET's
    headers, which carry the object's metadata (our and rclone's ``mtime``)."""
    if info.meta:
        return info
    got = info_from_headers(info.key, headers)
    return dataclasses.replace(info, meta=got.meta, mtime=got.mtime or info.mtime)


def _mtime(info: ObjectInfo) -> float:
    with contextlib.suppress(ValueError, KeyError):
        return float(info.meta["mtime"])
    return info.mtime


def _uploader_part(info: ObjectInfo) -> int | None:
    """The part size the object was uploaded with, if it says so and it adds up."""
    n = integrity.parts_of(info.etag)
    try:
        part = int(info.meta.get("part-size", "0"))
    except ValueError:
        return None
    if n and part > 0 and math.ceil(info.size / part) == n:
        return part
    return None


def _xml_etag(body: bytes) -> str:
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - the configured server's answer
    except ElementTree.ParseError:
        return ""
    for el in root.iter():
        if el.tag.endswith("ETag"):
            return (el.text or "").strip('"')
    return ""


def _open_partial(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create: {exc.strerror}") from None


def _reserve(fd: int, size: int) -> None:
    """Give the ``.part`` file its whole size on disk before the first byte arrives, as
    rclone does: a full disk fails here, before any transfer, and the file system maps
    one extent instead of reserving block by block as the writes come (ext4: a quarter
    less system time for the writes). Where the file system cannot preallocate (NFSv3,
    FAT) the file is sized sparse, as before (never glibc's zero-writing emulation)."""
    if size <= 0:
        return
    fallocate = _fallocate()
    err = fallocate(fd, size) if fallocate is not None else errno.ENOSYS
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise LocalWriteError(f"cannot size the download: {exc.strerror}") from None
    elif err:
        raise LocalWriteError(f"cannot write: {os.strerror(err)}")


@functools.cache
def _fallocate() -> Callable[[int, int], int] | None:
    """Linux ``fallocate(fd, 0, 0, size)`` from libc, returning 0 or the errno; None
    where libc has none."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int

    def call(fd: int, size: int) -> int:
        return 0 if fn(fd, 0, 0, size) == 0 else ctypes.get_errno()

    return call


def check_space(directory: Path, size: int) -> None:
    try:
        fs = os.statvfs(directory)
    except OSError:
        return
    free = fs.f_bavail * fs.f_frsize
    if size > free:
        raise StorageError(
            f"{directory}: {size} bytes needed, {free} free; free space and retry "
            f"({os.strerror(errno.ENOSPC)})"
        )
