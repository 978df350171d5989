"""User-data as the service hands it over: base64 and gzip layers peeled off, MIME
multipart split, each part classified. Anything we cannot make sense of is refused here,
before a single file is touched."""

from __future__ import annotations

import base64
import binascii
import email
import email.errors
import email.policy
import re
import zlib
from dataclasses import dataclass
from email.message import Message

from guestagent.userdata.errors import UserdataError

SHELL, CLOUD_CONFIG, WINDOWS = "shell", "cloud-config", "windows"
# A MIME part whose content type no handler claims: skipped with a warning (as cloud-init
# does), never sniffed for '#!' and run.
UNKNOWN = "unknown"
_SNIFFED = ("text/plain", "application/octet-stream", "text/x-not-multipart")
_MIME_START = (b"content-type:", b"mime-version:")
_B64 = re.compile(rb"^[A-Za-z0-9+/=\s]+$")
_MAX_LAYERS = 4
# cloud-init formats we recognise but leave to cloud-init itself.
_UNSUPPORTED_PREFIX = {
    b"#include": "#include (URL lists)",
    b"#cloud-boothook": "#cloud-boothook",
    b"#part-handler": "#part-handler",
    b"#upstart-job": "#upstart-job",
    b"## template: jinja": "jinja templates",
    b"#cloud-config-archive": "#cloud-config-archive",
}
_MIME_KINDS = {
    "text/x-shellscript": SHELL,
    "text/cloud-config": CLOUD_CONFIG,
}
_MIME_UNSUPPORTED = {
    "text/x-include-url",
    "text/x-include-once-url",
    "text/cloud-boothook",
    "text/part-handler",
    "text/upstart-job",
    "text/cloud-config-archive",
    "text/jinja2",
    "text/cloud-config-jsonp",
    "text/x-shellscript-per-boot",
    "text/x-shellscript-per-instance",
    "text/x-shellscript-per-once",
}


@dataclass(frozen=True)
class Part:
    kind: str  # shell, cloud-config, windows or unknown
    name: str
    content: bytes
    mime: str = ""

    def skipped_because(self) -> str:
        """Why a part of kind windows or unknown is not applied (one line)."""
        if self.kind == WINDOWS:
            return "Windows user-data ([bat]/[powershell]) is ignored on Linux"
        return f"content type {self.mime} is not handled by guestagent or cloud-init; skipped"


def decode(data: bytes, max_size: int = 32768, max_decoded: int = 1048576) -> bytes:
    """Peel base64 and gzip layers; refuse oversize, bad base64 and broken gzip.

    ``max_size`` bounds the user-data as set (after the console's base64), ``max_decoded``
    what gzip may expand it to."""
    if len(data) > max(max_decoded, max_size * 2):
        raise UserdataError(f"user-data is {len(data)} bytes, over the {max_size}-byte limit")
    if _looks_base64(data):
        data = _b64(data)
    if len(data) > max_size:
        raise UserdataError(f"user-data is {len(data)} bytes, over the {max_size}-byte limit")
    for _ in range(_MAX_LAYERS):
        if data[:2] == b"\x1f\x8b":
            data = gunzip(data, max_decoded)
        elif _looks_base64(data):
            data = _b64(data)
        else:
            return data
    raise UserdataError(f"user-data is encoded more than {_MAX_LAYERS} times over")


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserdataError(f"user-data looks base64-encoded but does not decode: {exc}") from None


def gunzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise UserdataError(f"user-data gzip is broken: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise UserdataError(f"user-data expands beyond {limit} bytes; refused")
    if not d.eof:
        raise UserdataError("user-data gzip is broken: truncated stream")
    return out


def _looks_base64(data: bytes) -> bool:
    head = data.lstrip()[:32]
    if not head or head.startswith((b"#", b"[")) or head.lower().startswith(_MIME_START):
        return False
    return bool(_B64.match(data))


def split(data: bytes) -> list[Part]:
    """The parts of decoded user-data, in order."""
    if data.lstrip()[:14].lower().startswith(_MIME_START):
        return _split_mime(data)
    return [classify(data, "part-001")]


def classify(content: bytes, name: str, mime: str = "") -> Part:
    body = content.lstrip(b"\xef\xbb\xbf")
    if mime in _MIME_KINDS:
        return Part(_MIME_KINDS[mime], name, body, mime)
    if mime in _MIME_UNSUPPORTED:
        raise UserdataError(
            f"{name}: {mime} parts are not supported by guestagent (use cloud-init)"
        )
    if mime and mime not in _SNIFFED:
        return Part(UNKNOWN, name, body, mime)
    first = body.split(b"\n", 1)[0].strip()
    if first.startswith(b"#!"):
        return Part(SHELL, name, body)
    if first.startswith(b"#cloud-config") and not first.startswith(b"#cloud-config-archive"):
        return Part(CLOUD_CONFIG, name, body)
    low = first.lower()
    if low.startswith((b"[bat]", b"[powershell]")):
        return Part(WINDOWS, name, body)
    for prefix, what in _UNSUPPORTED_PREFIX.items():
        if first.startswith(prefix):
            raise UserdataError(
                f"{name}: {what} user-data is not supported by guestagent (use cloud-init)"
            )
    raise _unknown(body, first, name)


def _unknown(body: bytes, first: bytes, name: str) -> UserdataError:
    """Why a part of no known type is refused, as the user would say it."""
    if body[:2] == b"\x1f\x8b":
        return UserdataError(
            f"{name}: gzip inside a part is not supported; gzip the whole user-data"
        )
    at = binary_at(body)
    if at is not None:  # quoting its "first line" would only print garbage
        return UserdataError(
            f"{name}: not text: binary data at byte {at} (a program, image or archive?); "
            "user-data is a #!/bin/sh script, #cloud-config or MIME multipart"
        )
    shown = first[:40].decode("utf-8", errors="replace")
    return UserdataError(
        f"{name}: unknown user-data type (first line {shown!r}); "
        "want #!/bin/sh, #cloud-config or MIME multipart"
    )


_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v")


def binary_at(data: bytes, window: int = 4096) -> int | None:
    """The offset of the first byte in ``data``'s first ``window`` bytes that text does
    not have (NUL, another control character, invalid UTF-8), or None."""
    head = data[:window]
    found = [i for i, byte in enumerate(head)
             if (byte < 0x20 and byte not in _TEXT_CONTROLS) or byte == 0x7F][:1]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut in two by the window's end is not an error in the data.
        if not (len(head) < len(data) and exc.reason == "unexpected end of data"):
            found.append(exc.start)
    return min(found, default=None)


def _split_mime(data: bytes) -> list[Part]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if not msg.is_multipart():
        body = msg.get_payload(decode=True)
        if not isinstance(body, bytes):
            raise UserdataError("user-data: MIME message without a body")
        _check_defects(msg, "user-data")
        ctype = msg.get_content_type()
        return [classify(body, msg.get_filename() or "part-001", ctype)]
    _check_defects(msg, "user-data")
    parts: list[Part] = []
    for sub in msg.walk():
        if sub.is_multipart():
            _check_defects(sub, "user-data")
            continue
        name = sub.get_filename() or f"part-{len(parts) + 1:03d}"
        _check_defects(sub, name)
        body = sub.get_payload(decode=True)
        if not isinstance(body, bytes):
            raise UserdataError(f"{name}: MIME part without a body")
        ctype = sub.get_content_type()
        if ctype in ("application/x-gzip", "application/gzip"):
            body = gunzip(body, 1048576)
            ctype = "text/plain"
        parts.append(classify(body, name, ctype))
    if not parts:
        raise UserdataError("user-data: MIME multipart with no parts")
    return parts


def _check_defects(msg: Message, where: str) -> None:
    if msg.defects:
        what = type(msg.defects[0]).__name__.replace("Defect", "")
        raise UserdataError(f"{where}: broken MIME ({what})")
    if msg.is_multipart() and not msg.get_boundary():
        raise UserdataError(f"{where}: broken MIME (multipart without a boundary)")
