"""``oss://bucket/key`` URLs and OSS's rules for bucket and object names.

Rules (OSS documentation): a bucket name is 3-63 characters of lowercase letters, digits
and hyphens, starting and ending with a letter or digit; an object key is UTF-8, at most
1023 bytes, each ``/``-separated segment at most 255 bytes, no control characters
(0x00-0x1F, 0x7F), and does not start with ``/`` or ``\\``. We also refuse ``.`` and ``..``
segments in keys a user names: on download they would escape the destination directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from guestagent.storage.errors import BadInput

SCHEME = "oss://"
MAX_KEY_BYTES = 1023
MAX_SEGMENT_BYTES = 255
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_bucket(bucket: str, where: str = "bucket") -> str:
    if not _BUCKET.fullmatch(bucket):
        shown = (repr(bucket) if len(bucket) <= 80
                 else f"{bucket[:40]!r}... ({len(bucket)} characters)")
        raise BadInput(
            f"{where}: bad bucket name {shown}: use 3-63 lowercase letters, digits and "
            "hyphens, starting and ending with a letter or digit"
        )
    return bucket


def check_key(key: str, where: str = "key", *, allow_dots: bool = False) -> str:
    """Return ``key`` if OSS would accept it (and it has no ``.``/``..`` segment)."""
    shown = key[:80]  # shown with !r, which escapes control characters (once)
    if _CONTROL.search(key):
        raise BadInput(f"{where}: object key {shown!r} contains a control character")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{where}: object key {shown!r} is not valid UTF-8") from None
    if len(raw) > MAX_KEY_BYTES:
        raise BadInput(
            f"{where}: object key is {len(raw)} bytes; OSS allows at most {MAX_KEY_BYTES}"
        )
    if key.startswith(("/", "\\")):
        raise BadInput(f"{where}: object key {shown!r} must not start with '/' or '\\'")
    for segment in key.split("/"):
        size = len(segment.encode("utf-8"))
        if size > MAX_SEGMENT_BYTES:
            # The segment's start and its size: the whole of it may be kilobytes long.
            raise BadInput(
                f"{where}: object key segment {segment[:40]!r}... ({size} bytes) is over "
                f"{MAX_SEGMENT_BYTES} bytes: OSS allows at most that between two '/'"
            )
        if not allow_dots and segment in (".", ".."):
            raise BadInput(
                f"{where}: object key {shown!r} has a {segment!r} segment; "
                "name the object without relative segments"
            )
    return key


@dataclass(frozen=True)
class OssUrl:
    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, text: str, where: str = "URL") -> OssUrl:
        """``oss://bucket[/key]``; the key may be empty or end in ``/`` (a directory)."""
        if not text.startswith(SCHEME):
            raise BadInput(f"{where}: {text!r} is not an OSS URL; want oss://bucket/key")
        rest = text[len(SCHEME):]
        bucket, _, key = rest.partition("/")
        check_bucket(bucket, where)
        if key:
            check_key(key, where)
            if "//" in key:
                raise BadInput(f"{where}: {text!r} has an empty path segment ('//')")
        return cls(bucket, key)

    @staticmethod
    def is_oss(text: str) -> bool:
        return text.startswith(SCHEME)

    @property
    def is_dir(self) -> bool:
        """The URL names a directory (a prefix): empty key or a trailing ``/``."""
        return not self.key or self.key.endswith("/")

    @property
    def prefix(self) -> str:
        """The key as a directory prefix (with a trailing ``/``, or empty for the bucket)."""
        return self.key if self.is_dir else self.key + "/"

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def join(self, relative: str) -> OssUrl:
        """The object ``relative`` (a ``/``-separated path) under this directory."""
        key = self.prefix + relative.lstrip("/")
        check_key(key, str(self))
        return OssUrl(self.bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"
