"""Directory trees: upload, download, sync (only what changed), remove.

Everything a tree operation will do is planned and checked first; a bad entry (a key that
would escape the destination, a control character, a symlink out of the upload tree)
refuses the whole operation with one line before any byte moves. Files then go in
parallel; each one is atomic on its own (see :mod:`guestagent.storage.transfer`).

"Changed" means: sizes differ, or for a single-PUT object (ETag = MD5) the local MD5
differs, or for a multipart object the local mtime differs from the one recorded in the
object's metadata at upload (rclone's whole-file MD5 or, for other writers, the object's
time when there is none: see :func:`_same_multipart`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from guestagent.storage import integrity, localdirs
from guestagent.storage.errors import BadInput, NotFound, StorageError
from guestagent.storage.ossurl import OssUrl, check_key
from guestagent.storage.s3 import ObjectInfo, S3Client
from guestagent.storage.transfer import PART_SUFFIX, Transfers, check_space

log = logging.getLogger(__name__)

DELETE_BATCH = 1000


@dataclass(frozen=True)
class LocalFile:
    path: Path  # what to read (a symlink inside the tree is read through)
    rel: str  # '/'-separated path under the root
    size: int
    mtime: float


@dataclass
class Summary:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    nbytes: int = 0


# -- planning ------------------------------------------------------------------------------


def scan_local(root: Path) -> list[LocalFile]:
    """Regular files under ``root``, checked as object keys. Symlinks are followed only
    when they stay inside ``root``; one that leaves it (or dangles) refuses the upload."""
    if not root.is_dir():
        raise BadInput(f"{root}: not a directory")
    real_root = os.path.realpath(root)
    found: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                _inside(full, real_root, root)
                log.info("%s: symlink to a directory inside the tree; not followed", full)
        for name in sorted(filenames):
            local = _local_file(os.path.join(dirpath, name), real_root, root)
            if local is not None:
                found.append(local)
    return found


def _local_file(full: str, real_root: str, root: Path) -> LocalFile | None:
    """The file at ``full`` with its checked key; None for what an upload skips (a symlink
    to a directory, a fifo, socket or device)."""
    rel = os.path.relpath(full, root).replace(os.sep, "/")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(
            f"{full!r}: file name is not UTF-8; OSS keys must be UTF-8 (rename it)"
        ) from None
    check_key(rel, full)
    if os.path.islink(full):
        _inside(full, real_root, root)
    try:
        st = os.stat(full)
    except OSError as exc:
        raise BadInput(f"{full}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        log.warning("%s: not a regular file (fifo, socket or device); skipped", full)
        return None
    return LocalFile(Path(full), rel, st.st_size, st.st_mtime)


def _inside(link: str, real_root: str, root: Path) -> None:
    target = os.path.realpath(link)
    if not os.path.exists(target):
        raise BadInput(f"{link}: symlink to {os.readlink(link)!r} points nowhere; "
                       "remove it or copy the file into the tree")
    if target != real_root and not target.startswith(real_root + os.sep):
        raise BadInput(f"{link}: symlink to {target} points outside {root}; not followed "
                       "(copy the file into the tree to upload it)")


def list_remote(client: S3Client, src: OssUrl) -> dict[str, ObjectInfo]:
    """Objects under the directory ``src`` by relative key (directory markers left out)."""
    client.head_bucket(src.bucket)  # a missing bucket is named as such, not "empty"
    prefix = src.prefix
    out: dict[str, ObjectInfo] = {}
    for item in client.list_objects(src.bucket, prefix):
        if isinstance(item, str):
            continue
        rel = item.key[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        out[rel] = item
    return out


def safe_target(root: Path, rel: str, where: str) -> Path:
    """``root/rel`` if it stays under ``root`` (no ``..``, absolute or symlinked escape)."""
    check_key(rel, where)  # control characters, '.'/'..' segments, limits
    target = root.joinpath(*rel.split("/"))
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    if not real.startswith(real_root + os.sep):
        raise BadInput(f"{where}: would be written outside {root} (at {real}); refused")
    return target


class Targets:
    """:func:`safe_target` for many keys at once: a symlink can only lead out of ``root``
    through a directory on the way or the file's own name, so each directory is resolved
    once (not every file: two ``realpath`` calls a file cost more than the download of a
    4 KiB object) and listed once for symlinked names; only those take the full check."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self._links: dict[str, frozenset[str]] = {}

    def target(self, rel: str, where: str) -> Path:
        check_key(rel, where)
        parent, _, name = rel.rpartition("/")
        links = self._links.get(parent)
        if links is None:
            links = self._links[parent] = self._directory(parent, where)
        if name in links:
            return safe_target(self.root, rel, where)
        return self.root.joinpath(*rel.split("/"))

    def _directory(self, parent: str, where: str) -> frozenset[str]:
        path = self.root.joinpath(*parent.split("/")) if parent else self.root
        real = os.path.realpath(path)
        if real != self.real_root and not real.startswith(self.real_root + os.sep):
            raise BadInput(f"{where}: would be written outside {self.root} (at {real}); "
                           "refused")
        try:
            with os.scandir(path) as entries:
                return frozenset(e.name for e in entries if e.is_symlink())
        except OSError:  # not there yet (made later, empty) or not a directory (mkdir says)
            return frozenset()


def plan_download(remote: dict[str, ObjectInfo], src: OssUrl, root: Path
                  ) -> list[tuple[ObjectInfo, Path]]:
    targets = Targets(root)
    plan = []
    for rel, info in sorted(remote.items()):
        where = f"oss://{src.bucket}/{info.key}"
        if "//" in rel:  # 'a//b' and 'a/b' would both land on a/b, one over the other
            raise BadInput(f"{where}: has an empty path segment ('//'); it cannot be "
                           "downloaded as a tree")
        plan.append((info, targets.target(rel, where)))
    dirs: set[str] = set()
    for rel in remote:
        parts = rel.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for rel in remote:
        if rel in dirs:
            raise BadInput(f"oss://{src.bucket}/{src.prefix}{rel}: is both an object and a "
                           "directory prefix; it cannot be downloaded as a tree")
        if rel + PART_SUFFIX in remote:  # its download's .part file is another's target
            raise BadInput(f"oss://{src.bucket}/{src.prefix}{rel}{PART_SUFFIX}: would be "
                           f"overwritten by the partial download of {rel}; download the two "
                           "separately")
    return plan


def _check_local(plan: list[tuple[ObjectInfo, Path]], root: Path, where: str) -> None:
    """Files where directories go, or directories where files go: named before any
    directory is made (else the tree fails half-way, after others landed)."""
    targets = [target for _, target in plan]
    localdirs.check_dirs(sorted({root, *(t.parent for t in targets)}), where)
    localdirs.check_files(targets, where)


# -- unchanged? ----------------------------------------------------------------------------


def same(local: Path, size: int, mtime: float, info: ObjectInfo,
         head: Callable[[], ObjectInfo | None], *, upload: bool = False) -> bool:
    if size != info.size:
        return False
    if integrity.is_plain(info.etag):
        return _md5_hex(local) == info.etag.lower()
    return _same_multipart(local, mtime, head() or info, upload=upload)


def _same_multipart(local: Path, mtime: float, full: ObjectInfo, *, upload: bool) -> bool:
    """A multipart ETag is no MD5 of the bytes: what the writer recorded decides. We and
    rclone record the source's mtime (``mtime``), rclone also the whole MD5 (``md5chksum``,
    base64). Objects with neither (the AWS CLI, ossutil) are judged as the AWS CLI's sync
    judges them: a download is unchanged while its mtime is still the object's (set at
    download; HTTP dates have whole seconds), a local file while it is no newer than the
    object (else every sync would copy them all again)."""
    recorded = full.meta.get("mtime")
    if recorded is not None:
        try:
            return abs(float(recorded) - mtime) < 0.001
        except ValueError:
            return False
    md5 = full.meta.get("md5chksum")
    if md5:
        try:
            return base64.b64decode(md5, validate=True).hex() == _md5_hex(local)
        except binascii.Error:
            return False
    if upload:
        return mtime <= full.mtime
    return abs(mtime - full.mtime) < 1.0


def _md5_hex(local: Path) -> str:
    fd = os.open(local, os.O_RDONLY)
    try:
        return integrity.file_md5(fd).hex()
    finally:
        os.close(fd)


# -- operations ----------------------------------------------------------------------------


def _run(fns: list[Callable[[], object]], workers: int) -> None:
    """Run every job; report how many failed with the first error (others still ran).
    Plain threads taking the next job from a shared iterator: a pool's future per file
    cost more than a small file's download (bench/storage.py)."""
    errors: list[BaseException] = []
    jobs = iter(fns)
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with lock:
                fn = next(jobs, None)
            if fn is None:
                return
            try:
                fn()
            except BaseException as exc:  # reported below, as a future would
                errors.append(exc)

    threads = [threading.Thread(target=work, name=f"oss-file-{i}", daemon=True)
               for i in range(max(1, min(workers, len(fns))))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        stop.set()  # interrupted (^C): the threads take no new job
    if errors:
        first = errors[0]
        if len(errors) == 1 and isinstance(first, StorageError):
            raise first
        raise StorageError(f"{len(errors)} of {len(fns)} files failed; first: {first}")


def upload_tree(
    t: Transfers, root: Path, dest: OssUrl, *, only_changed: bool = False,
    delete: bool = False, dry_run: bool = False,
) -> Summary:
    """Upload every file under ``root`` to the directory ``dest``."""
    files = scan_local(root)
    for f in files:
        dest.join(f.rel)  # the whole key within OSS's limits, checked before any upload
    remote = list_remote(t.client, dest) if (only_changed or delete) else {}
    summary = Summary()
    todo: list[LocalFile] = []
    for f in files:
        info = remote.get(f.rel)
        if info is not None and only_changed and same(
            f.path, f.size, f.mtime, info, partial(t.client.head_object, dest.bucket, info.key),
            upload=True,
        ):
            summary.skipped.append(f.rel)
        else:
            todo.append(f)
    summary.copied = [f.rel for f in todo]
    summary.nbytes = sum(f.size for f in todo)
    if delete:
        local = {f.rel for f in files}
        summary.deleted = sorted(dest.prefix + rel for rel in remote if rel not in local)
    if dry_run:
        return summary
    t.progress.expect(summary.nbytes, len(todo))
    _run([_upload_job(t, f, dest) for f in todo], _workers(t, upload=True))
    if summary.deleted:
        _delete_keys(t.client, dest.bucket, summary.deleted)
    return summary


def _upload_job(t: Transfers, f: LocalFile, dest: OssUrl) -> Callable[[], object]:
    return lambda: t.upload_file(f.path, dest.join(f.rel), announce=False)


def download_tree(
    t: Transfers, src: OssUrl, root: Path, *, only_changed: bool = False,
    delete: bool = False, dry_run: bool = False,
) -> Summary:
    """Download every object under the directory ``src`` into ``root``."""
    remote = list_remote(t.client, src)
    plan = plan_download(remote, src, root)  # every key checked before anything is made
    _check_local(plan, root, str(src))
    if not dry_run:
        localdirs.make_dirs(root, str(src))
    summary = Summary()
    todo: list[tuple[ObjectInfo, Path]] = []
    for info, target in plan:
        rel = info.key[len(src.prefix):]
        if only_changed and target.is_file():
            st = target.stat()
            if same(target, st.st_size, st.st_mtime, info,
                    partial(t.client.head_object, src.bucket, info.key)):
                summary.skipped.append(rel)
                continue
        todo.append((info, target))
    summary.copied = [info.key[len(src.prefix):] for info, _ in todo]
    summary.nbytes = sum(info.size for info, _ in todo)
    if delete and root.is_dir():
        wanted = {target for _, target in plan}
        summary.deleted = sorted(
            str(p) for p in _local_files(root) if p not in wanted
        )
    if dry_run:
        return summary
    check_space(root, summary.nbytes)
    for parent in sorted({target.parent for _, target in todo}):
        localdirs.make_dirs(parent, str(src))
    t.progress.expect(summary.nbytes, len(todo))
    _run([_download_job(t, src, info, target) for info, target in todo],
         _workers(t, upload=False))
    for name in summary.deleted:
        Path(name).unlink()
    return summary


def _download_job(t: Transfers, src: OssUrl, info: ObjectInfo, target: Path
                  ) -> Callable[[], object]:
    url = OssUrl(src.bucket, info.key)
    if not info.meta and not integrity.is_plain(info.etag):
        # Multipart objects need their metadata (part size, mtime): the full path HEADs.
        return lambda: t.download_file(url, target, info, announce=False, into_dir=False)
    return lambda: t.fetch(url, info, target)


def _local_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            if not name.endswith(".part"):
                yield Path(dirpath) / name


def _workers(t: Transfers, *, upload: bool) -> int:
    """Files in flight. Uploads of small files wait on the server: twice the part pool
    keeps it busy. Downloads spend their time in Python (headers, hashing, renames):
    past a few threads the GIL hand-offs cost more than they overlap (measured, bench/)."""
    if upload:
        return max(4, t.options.concurrency * 2)
    return max(2, min(4, t.options.concurrency))


def remove(client: S3Client, url: OssUrl, *, recursive: bool = False,
           dry_run: bool = False) -> list[str]:
    """Delete the object ``url`` (or with ``recursive`` everything under it); the keys."""
    if not recursive:
        if url.is_dir:
            raise BadInput(f"{url}: is a directory; use -r to remove everything under it")
        if client.head_object(url.bucket, url.key) is None:
            raise NotFound(f"{url}: no such object", 404, "NoSuchKey")
        if not dry_run:
            client.delete_object(url.bucket, url.key)
        return [url.key]
    client.head_bucket(url.bucket)
    keys = [i.key for i in client.list_objects(url.bucket, url.prefix) if isinstance(i, ObjectInfo)]
    if not dry_run:
        _delete_keys(client, url.bucket, keys)
    return keys


def _delete_keys(client: S3Client, bucket: str, keys: list[str]) -> None:
    failed: list[str] = []
    for i in range(0, len(keys), DELETE_BATCH):
        failed += client.delete_objects(bucket, keys[i:i + DELETE_BATCH])
    if failed:
        raise StorageError(f"oss://{bucket}/: {len(failed)} objects could not be deleted, "
                           f"first {failed[0]!r}")
