"""A lean S3 client for OSS's S3-compatible API: SigV4 over small HTTP/1.1 connections
(:mod:`guestagent.storage.http1`), pooled and kept alive, retries with backoff. No SDK:
boto3 would cost the daemon more memory (~70 MB RSS on import) than every service of the
agent together.

Only the calls transfers need: HEAD/GET/PUT/DELETE object, ranged GET into a sink,
multipart (create, part, list parts, complete, abort), ListObjectsV2, batch delete.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote_plus
from xml.etree import ElementTree

from guestagent.storage import sigv4
from guestagent.storage.endpoint import Endpoint
from guestagent.storage.errors import (
    AccessDenied,
    NotFound,
    RemoteError,
    StorageError,
    Unavailable,
)
from guestagent.storage.http1 import Connection, Disconnected, FileWriteError, ProtocolError
from guestagent.storage.http1 import Response as HttpResponse
from guestagent.storage.keys import KeyProvider

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# A 403 with one of these may just be a set that rotated under us: refresh once, retry.
KEY_CODES = frozenset({
    "InvalidAccessKeyId", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "SecurityTokenExpired", "SignatureDoesNotMatch", "AccessDenied",
})
CRC64_HEADER = "x-oss-hash-crc64ecma"
META_PREFIX = "x-amz-meta-"
# Received bytes go to the file (and the sums) in blocks of this size. 256 KiB stays in
# the CPU's cache between the socket copy, the pwrite and the MD5; 1 MiB blocks cost twice
# the system time on a 1 GiB download (bench/storage.py: 0.7 s against 1.5-2.4 s).
READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # without quotes
    mtime: float  # epoch seconds
    meta: Mapping[str, str] = field(default_factory=dict)
    crc64: str | None = None


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class FileSlice:
    """``length`` bytes of an open file from ``offset``, sent as a request body without
    holding them in memory (sent in blocks of 1 MiB)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length = fd, offset, length
        self._pos = offset

    def __len__(self) -> int:
        return self.length

    def fresh(self) -> FileSlice:
        return FileSlice(self.fd, self.offset, self.length)

    def read(self, size: int = -1) -> bytes:
        left = self.offset + self.length - self._pos
        n = left if size < 0 else min(size, left)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self._pos)
        if not data:
            raise OSError(f"file shrank while sending (at byte {self._pos})")
        self._pos += len(data)
        return data


Body = bytes | memoryview | FileSlice


@dataclass(frozen=True)
class _Request:
    method: str
    bucket: str
    key: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: Body
    sink: Callable[[HttpResponse], None] | None
    # Called with each attempt's headers: a ranged GET asks for what is still missing.
    update: Callable[[dict[str, str]], None] | None = None


class _Transient(Exception):
    """One attempt failed in a way worth retrying (connection, 5xx, throttling)."""


class _Stale(_Transient):
    """A pooled keep-alive connection the server had closed: retry at once, uncounted."""


class LocalWriteError(StorageError):
    """Writing received data locally failed (disk full, ...): never retried."""


def md5_b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _xml(body: bytes) -> ElementTree.Element:
    root = ElementTree.fromstring(body)  # noqa: S314 - answers of the configured server
    for el in root.iter():
        if "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def _text(el: ElementTree.Element, name: str, default: str = "") -> str:
    found = el.find(name)
    return found.text or default if found is not None else default


def _iso_time(text: str) -> float:
    from datetime import datetime

    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return 0.0


def _http_time(text: str) -> float:
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return 0.0


class S3Client:
    def __init__(
        self,
        endpoint: Endpoint,
        keys: KeyProvider,
        *,
        timeout: float = 60.0,
        retries: int = 8,
        backoff_base: float = 0.2,
        backoff_max: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._pool: dict[str, list[Connection]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self.requests = 0  # attempts made (for tests and status)
        self.retried = 0

    def __repr__(self) -> str:
        return f"S3Client({self.endpoint})"

    # -- connections -------------------------------------------------------------------

    def _connect(self, host: str) -> Connection:
        with self._lock:
            idle = self._pool.get(host)
            if idle:
                return idle.pop()
        name, _, port = host.partition(":")
        tls = None
        if self.endpoint.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        default = 443 if tls is not None else 80
        return Connection(name, int(port) if port else default, timeout=self.timeout, tls=tls)

    def _release(self, host: str, conn: Connection, reusable: bool) -> None:
        if not reusable:
            conn.close()
            return
        with self._lock:
            self._pool.setdefault(host, []).append(conn)

    def close(self) -> None:
        with self._lock:
            pools, self._pool = self._pool, {}
        for conns in pools.values():
            for conn in conns:
                conn.close()

    # -- one request, retried ------------------------------------------------------------

    def _attempt(self, req: _Request, refreshed: bool) -> Response:
        method, bucket, key, query, headers = (
            req.method, req.bucket, req.key, req.query, req.headers
        )
        ep = self.endpoint
        host = ep.host_for(bucket)
        path = ep.path_for(bucket, key)
        hdrs = {"host": host, **headers}
        if req.update is not None:
            req.update(hdrs)
        keys = self.keys.refresh() if refreshed else self.keys.current()
        sigv4.sign(method, path, query, hdrs, keys=keys, region=ep.region)
        target = path + ("?" + sigv4.canonical_query(query) if query else "")
        conn = self._connect(host)
        reused = conn.sock is not None
        self.requests += 1
        try:
            if not reused:
                conn.connect()
            resp, data = _exchange(conn, req, target, hdrs, reused)
            status = resp.status
        except _Stale:
            raise
        except OSError as exc:
            conn.close()
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._release(host, conn, resp.reusable)
        if status in RETRY_STATUS:
            raise _Transient(f"HTTP {status} {_error_code(data)}".strip())
        return Response(status, resp.headers, data)

    def call(
        self,
        method: str,
        bucket: str,
        key: str = "",
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Body = b"",
        ok: tuple[int, ...] = (200,),
        sink: Callable[[HttpResponse], None] | None = None,
        update: Callable[[dict[str, str]], None] | None = None,
        what: str = "",
    ) -> Response:
        """Send a request, retrying transient failures; raise a named error otherwise."""
        req = _Request(method, bucket, key, dict(query or {}), dict(headers or {}), body, sink,
                       update)
        refreshed = False
        attempt = 0
        while True:
            try:
                resp = self._attempt(req, refreshed)
            except _Stale:
                continue
            except _Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    where = what or f"oss://{bucket}/{key}"
                    raise Unavailable(
                        f"{where}: {self.endpoint.netloc} failed {attempt} times, last: {exc}"
                    ) from None
                self.retried += 1
                delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2  # noqa: S311 - jitter, not crypto
                log.info("%s %s/%s: %s; retry %d in %.1fs", method, bucket, key, exc,
                         attempt, delay)
                self._sleep(delay)
                continue
            if resp.status in ok:
                return resp
            code = _error_code(resp.body)
            if resp.status == 403 and not refreshed and code in KEY_CODES | {""}:
                refreshed = True  # a rotation between fetch and use: one fresh set, once
                continue
            raise _named_error(resp, code, bucket, key, what)

    # -- objects -------------------------------------------------------------------------

    def head_object(self, bucket: str, key: str) -> ObjectInfo | None:
        resp = self.call("HEAD", bucket, key, ok=(200, 404))
        if resp.status == 404:
            return None
        return _info_from_headers(key, resp.headers)

    def put_object(
        self, bucket: str, key: str, data: Body, md5: bytes,
        meta: Mapping[str, str] | None = None,
    ) -> Response:
        headers = {"content-md5": md5_b64(md5), "content-length": str(len(data)),
                   "content-type": content_type(key)}
        headers.update({META_PREFIX + k: v for k, v in (meta or {}).items()})
        return self.call("PUT", bucket, key, headers=headers, body=data)

    def get_range(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        write: Callable[[int, memoryview], None],
        *,
        etag: str = "",
        begin: Callable[[Mapping[str, str]], None] | None = None,
    ) -> Mapping[str, str]:
        """GET bytes ``start..end-1`` into ``write(offset, data)``, resuming after a failure
        where it stopped. ``etag`` (If-Match) fails the call if the object changed;
        ``begin`` sees each answer's headers before its body."""
        return self._get(_RangeGet(start, end, write, begin), bucket, key, etag)

    def get_range_into(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        *,
        fd: int,
        landed: Callable[[int, int], None],
        etag: str = "",
        begin: Callable[[Mapping[str, str]], None] | None = None,
    ) -> Mapping[str, str]:
        """GET bytes ``start..end-1`` into the open file ``fd`` at the same offsets (no
        copy through Python on plain HTTP), calling ``landed(offset, count)`` after each
        block is there; otherwise as :meth:`get_range`."""
        return self._get(_RangeGet(start, end, None, begin, fd=fd, landed=landed),
                         bucket, key, etag)

    def _get(self, got: _RangeGet, bucket: str, key: str, etag: str) -> Mapping[str, str]:
        headers: dict[str, str] = {}
        if etag:
            headers["if-match"] = f'"{etag}"'
        while True:
            before = got.pos
            try:
                return self.call("GET", bucket, key, headers=headers, ok=(200, 206),
                                 sink=got.sink, update=got.update).headers
            except Unavailable:
                if got.pos == before:
                    raise
                # Progress was made before the failure: keep going from there.
                continue

    def delete_object(self, bucket: str, key: str) -> None:
        self.call("DELETE", bucket, key, ok=(200, 204))

    def delete_objects(self, bucket: str, keys: list[str]) -> list[str]:
        """Delete up to 1000 keys in one request; the keys that failed."""
        from xml.sax.saxutils import escape

        body = (
            "<Delete><Quiet>true</Quiet>"
            + "".join(f"<Object><Key>{escape(k)}</Key></Object>" for k in keys)
            + "</Delete>"
        ).encode()
        import hashlib

        resp = self.call(
            "POST", bucket, "", query={"delete": ""}, body=body,
            headers={"content-md5": md5_b64(hashlib.md5(body).digest()),  # noqa: S324
                     "content-type": "application/xml"},
        )
        return [_text(e, "Key") for e in _xml(resp.body).iter("Error")] if resp.body else []

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` (the local cloud's stand-ins; an existing one is fine)."""
        resp = self.call("PUT", bucket, "", ok=(200, 409), what=f"oss://{bucket}/")
        if resp.status == 409 and _error_code(resp.body) != "BucketAlreadyOwnedByYou":
            raise _named_error(resp, _error_code(resp.body), bucket, "", f"oss://{bucket}/")

    def head_bucket(self, bucket: str) -> None:
        self.call("HEAD", bucket, "", what=f"oss://{bucket}/")

    def list_objects(
        self, bucket: str, prefix: str = "", delimiter: str = ""
    ) -> Iterator[ObjectInfo | str]:
        """Objects under ``prefix`` (and, with a delimiter, common prefixes as ``str``)."""
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url",
                     "max-keys": "1000"}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            resp = self.call("GET", bucket, "", query=query, what=f"oss://{bucket}/{prefix}")
            root = _xml(resp.body)
            encoded = _text(root, "EncodingType") == "url"

            def dec(text: str, encoded: bool = encoded) -> str:
                # Form-encoded, as botocore reads it: S3 and `rclone serve s3` send a space
                # as '+' (a '+' of the key as %2B; OSS sends %20 and %2B, read alike).
                return unquote_plus(text) if encoded else text

            for el in root.findall("Contents"):
                yield ObjectInfo(
                    key=dec(_text(el, "Key")),
                    size=int(_text(el, "Size", "0")),
                    etag=_text(el, "ETag").strip('"'),
                    mtime=_iso_time(_text(el, "LastModified")),
                )
            for el in root.findall("CommonPrefixes"):
                yield dec(_text(el, "Prefix"))
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return

    # -- multipart -----------------------------------------------------------------------

    def create_multipart(self, bucket: str, key: str, meta: Mapping[str, str]) -> str:
        headers = {META_PREFIX + k: v for k, v in meta.items()}
        headers["content-type"] = content_type(key)
        resp = self.call("POST", bucket, key, query={"uploads": ""}, headers=headers)
        return _text(_xml(resp.body), "UploadId")

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: Body,
        *, md5: bytes,
    ) -> str:
        resp = self.call(
            "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
            headers={"content-md5": md5_b64(md5), "content-length": str(len(data))},
            body=data,
        )
        return resp.headers.get("etag", "").strip('"')

    def list_parts(
        self, bucket: str, key: str, upload_id: str
    ) -> dict[int, tuple[str, int]] | None:
        """{part number: (etag, size)} the server holds for an upload; None if it is gone."""
        parts: dict[int, tuple[str, int]] = {}
        marker = ""
        while True:
            query = {"uploadId": upload_id}
            if marker:
                query["part-number-marker"] = marker
            resp = self.call("GET", bucket, key, query=query, ok=(200, 404))
            if resp.status == 404:
                return None
            root = _xml(resp.body)
            for el in root.findall("Part"):
                parts[int(_text(el, "PartNumber"))] = (
                    _text(el, "ETag").strip('"'), int(_text(el, "Size", "0"))
                )
            marker = _text(root, "NextPartNumberMarker")
            if _text(root, "IsTruncated") != "true" or not marker:
                return parts

    def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: Mapping[int, str]
    ) -> Response:
        body = (
            "<CompleteMultipartUpload>"
            + "".join(
                f'<Part><PartNumber>{n}</PartNumber><ETag>"{parts[n]}"</ETag></Part>'
                for n in sorted(parts)
            )
            + "</CompleteMultipartUpload>"
        ).encode()
        resp = self.call("POST", bucket, key, query={"uploadId": upload_id}, body=body,
                         headers={"content-type": "application/xml"})
        # S3 may answer 200 with an <Error> body after a long complete.
        if b"<Error>" in resp.body[:512]:
            raise _named_error(Response(500, resp.headers, resp.body),
                               _error_code(resp.body), bucket, key, "")
        return resp

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        self.call("DELETE", bucket, key, query={"uploadId": upload_id}, ok=(200, 204, 404))


def _exchange(
    conn: Connection, req: _Request, target: str, hdrs: dict[str, str], reused: bool
) -> tuple[HttpResponse, bytes]:
    """Send ``req`` and take the answer: its body read, or given to the request's sink.
    A pooled connection the server had closed raises ``_Stale``."""
    try:
        if isinstance(req.body, FileSlice):
            conn.send(req.method, target, hdrs, None, req.body.fresh())
        else:
            conn.send(req.method, target, hdrs, req.body)
        resp = conn.response(req.method)
    except (Disconnected, ConnectionResetError, BrokenPipeError) as exc:
        if reused:
            conn.close()
            raise _Stale(str(exc)) from exc
        raise
    if req.sink is not None and resp.status in (200, 206):
        req.sink(resp)
        return resp, b""
    return resp, resp.read()


class _RangeGet:
    """Where a ranged GET stands: each answer's body is written from ``pos`` on, and every
    attempt, also the client's own retries, asks from there. The body goes to ``write``
    through a buffer, or with ``fd`` straight into that file (then ``landed`` is told)."""

    def __init__(
        self, start: int, end: int, write: Callable[[int, memoryview], None] | None,
        begin: Callable[[Mapping[str, str]], None] | None, *, fd: int = -1,
        landed: Callable[[int, int], None] | None = None,
    ) -> None:
        self.start, self.end, self.pos = start, end, start
        self.write, self.begin, self.fd, self.landed = write, begin, fd, landed

    def update(self, headers: dict[str, str]) -> None:
        if self.end > self.start:
            headers["range"] = f"bytes={self.pos}-{self.end - 1}"

    def sink(self, resp: HttpResponse) -> None:
        _skip_to(resp, self.pos)
        if self.begin is not None:
            self.begin(resp.headers)
        try:
            if self.landed is not None:
                self._into_file(resp, self.landed)
            else:
                self._through_buffer(resp)
        except FileWriteError as exc:
            raise LocalWriteError(f"cannot write: {exc}") from None
        resp.read()  # the (empty) rest, so the connection can be reused

    def _into_file(self, resp: HttpResponse, landed: Callable[[int, int], None]) -> None:
        while self.pos < self.end:
            n = resp.take_file(self.fd, self.pos, self.end - self.pos)
            if not n:
                raise ProtocolError(f"the answer ended {self.end - self.pos} bytes short")
            landed(self.pos, n)
            self.pos += n

    def _through_buffer(self, resp: HttpResponse) -> None:
        assert self.write is not None
        view = memoryview(bytearray(min(READ_CHUNK, max(1, self.end - self.pos))))
        end, write = self.end, self.write
        while self.pos < end:
            n = resp.readinto(view[: min(len(view), end - self.pos)])
            if not n:
                raise ProtocolError(f"the answer ended {end - self.pos} bytes short")
            try:
                write(self.pos, view[:n])
            except OSError as exc:
                raise LocalWriteError(f"cannot write: {exc.strerror or exc}") from exc
            self.pos += n


def _skip_to(resp: HttpResponse, pos: int) -> None:
    """Make sure the body starts at byte ``pos`` of the object: a Content-Range must say
    so (some servers send it with a 200); a 200 without one (a server that ignored the
    Range) is the whole object, read past up to ``pos``."""
    given = resp.headers.get("content-range", "")
    if given:
        if given.partition(" ")[2].partition("-")[0] != str(pos):
            raise ProtocolError(f"asked for bytes from {pos}, got Content-Range {given!r}")
        return
    if resp.status == 206:
        return
    scratch = memoryview(bytearray(min(pos, READ_CHUNK)))
    left = pos
    while left:
        n = resp.readinto(scratch[:min(left, len(scratch))])
        if not n:
            raise ProtocolError(f"the answer ended {left} bytes before byte {pos}")
        left -= n


def _error_code(body: bytes) -> str:
    if not body or b"<" not in body[:100]:
        return ""
    try:
        return _text(_xml(body), "Code")
    except ElementTree.ParseError:
        return ""


def content_type(key: str) -> str:
    """The type by the object's name, as the AWS CLI, rclone and ossutil set it: without
    one, OSS serves ``index.html`` or ``data.json`` as an octet stream to browsers and SDKs.
    Never a Content-Encoding: ``.tar.gz`` stays the bytes it is."""
    import mimetypes  # lazily: reads the system's type tables once

    guessed, _encoding = mimetypes.guess_type(key.rsplit("/", 1)[-1])
    return guessed or "application/octet-stream"


def _info_from_headers(key: str, headers: Mapping[str, str]) -> ObjectInfo:
    meta = {k[len(META_PREFIX):]: v for k, v in headers.items() if k.startswith(META_PREFIX)}
    return ObjectInfo(
        key=key,
        size=int(headers.get("content-length", "0")),
        etag=headers.get("etag", "").strip('"'),
        mtime=_http_time(headers.get("last-modified", "")),
        meta=meta,
        crc64=headers.get(CRC64_HEADER),
    )


def _named_error(resp: Response, code: str, bucket: str, key: str, what: str) -> Exception:
    where = what or f"oss://{bucket}/{key}"
    label = f"{resp.status} {code}".strip()
    if resp.status == 403:
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            why = "the credentials were refused"
        elif code:
            why = "access denied"
        else:  # HEAD answers carry no body, hence no code
            why = "access denied: the credentials were refused or lack the permission"
        return AccessDenied(
            f"{where}: {why} ({label}); check the instance's RAM role and its OSS policy",
            resp.status, code,
        )
    if resp.status == 404:
        if code == "NoSuchBucket" or (not key and code in ("", "NotFound")):
            return NotFound(
                f"oss://{bucket}/: no such bucket ({label}); check the name and region",
                resp.status, code or "NoSuchBucket",
            )
        return NotFound(f"{where}: no such object ({label})", resp.status, code)
    detail = ""
    if resp.body:
        with contextlib.suppress(ElementTree.ParseError):
            detail = _text(_xml(resp.body), "Message")
    return RemoteError(f"{where}: {label} {detail}".strip(), resp.status, code)


def info_from_headers(key: str, headers: Mapping[str, str]) -> ObjectInfo:
    return _info_from_headers(key, headers)


def ignore(*_: Any) -> None:
    """A sink that discards (for probes)."""
