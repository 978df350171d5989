"""Validation of every value that reaches a file or a command line.

Each check returns the normalised value or raises :class:`UserdataError` naming the field.
They refuse control characters outright, so no newline or quote can smuggle a second
directive into a config file or a second command into a script.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from guestagent.userdata.errors import UserdataError, bad_char

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# An IPv6 zone (scope) id is an interface name (or index): nothing a config line could
# read as a second word or a comment.
_ZONE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
# shadow's useradd default (NAME_REGEX of Debian is stricter; this is the portable subset).
_ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+~-]{0,63}$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+@-]*$")
_OPTION = re.compile(r"^[a-z][a-z0-9_-]*(:[0-9]{1,4})?$")
SSH_KEY_TYPES = (
    "ssh-rsa",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-dss",
)


def text(value: object, where: str, *, max_len: int = 1024) -> str:
    """A one-line string: no control characters (newline, CR, NUL, escape, line separators)."""
    if not isinstance(value, str):
        raise UserdataError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise UserdataError(f"{where}: longer than {max_len} characters")
    for ch in value:
        if bad_char(ch):
            raise UserdataError(f"{where}: control character {ch!r} is not allowed")
    return value


def ip(value: object, where: str) -> str:
    """An IPv4 or IPv6 address; an IPv6 zone id only on a link-local address and only as
    an interface name (``fe80::1%eth0``)."""
    s = text(value, where, max_len=64).strip()
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        raise UserdataError(f"{where}: {s!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        if not _ZONE.fullmatch(addr.scope_id):
            raise UserdataError(
                f"{where}: {s!r}: the zone id after '%' must be an interface name such as eth0"
            )
        if not addr.is_link_local:
            raise UserdataError(f"{where}: {s!r}: a zone id ('%') is only valid on fe80::/10")
    return str(addr)


def hostname(value: object, where: str) -> str:
    s = text(value, where, max_len=253).strip().rstrip(".")
    labels = s.split(".")
    if not s or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise UserdataError(f"{where}: {s!r} is not a valid host name")
    if labels[-1].isdigit():
        # 1.2.3.999 or 10.1: an address gone wrong, not a name (no top-level domain is numeric).
        raise UserdataError(f"{where}: {s!r} is neither an IP address nor a host name")
    return s.lower()


def host(value: object, where: str) -> str:
    """A host name or an IP address (NTP servers, mirrors)."""
    s = text(value, where, max_len=253).strip()
    if ":" in s or "%" in s:
        return ip(s, where)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        return hostname(s, where)


def url(value: object, where: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    s = text(value, where, max_len=2048).strip()
    if any(c in s for c in " \"'`\\<>{}|^$;"):
        raise UserdataError(f"{where}: {s!r} contains a character not allowed in a URL")
    try:
        parts = urlsplit(s)
        _ = parts.port
    except ValueError as exc:
        raise UserdataError(f"{where}: bad URL {s!r}: {exc}") from None
    if parts.scheme not in schemes:
        raise UserdataError(f"{where}: bad URL {s!r}: want {' or '.join(schemes)}")
    if parts.scheme == "file":
        if parts.netloc or not _SAFE_PATH.fullmatch(parts.path):
            raise UserdataError(f"{where}: bad file URL {s!r}: want file:///absolute/path")
    elif not parts.hostname:
        raise UserdataError(f"{where}: bad URL {s!r}: no host")
    else:
        host(parts.hostname, where)
    return s


def account(value: object, where: str) -> str:
    """A user or group name that useradd/groupadd accept everywhere."""
    s = text(value, where, max_len=32)
    if not _ACCOUNT.fullmatch(s):
        raise UserdataError(
            f"{where}: {s!r} is not a valid user/group name "
            "(lower-case letters, digits, '_' and '-', starting with a letter or '_')"
        )
    return s


def repo_id(value: object, where: str) -> str:
    s = text(value, where, max_len=100)
    if not _REPO_ID.fullmatch(s) or ".." in s:
        raise UserdataError(f"{where}: {s!r} is not a valid repository id")
    return s


def word(value: object, where: str) -> str:
    """A single token such as an apt suite or component."""
    s = text(value, where, max_len=64)
    if s != "$RELEASE" and not _WORD.fullmatch(s):
        raise UserdataError(f"{where}: {s!r} is not a valid word")
    return s


def abs_path(value: object, where: str) -> str:
    """An absolute path without '..' or characters a shell or config would interpret."""
    s = text(value, where, max_len=4096)
    if not _SAFE_PATH.fullmatch(s) or "/../" in s + "/" or s.endswith("/.."):
        raise UserdataError(f"{where}: {s!r} must be an absolute path without '..' or spaces")
    return s


def resolv_option(value: object, where: str) -> str:
    s = text(value, where, max_len=64)
    if not _OPTION.fullmatch(s):
        raise UserdataError(f"{where}: {s!r} is not a resolver option (e.g. rotate, timeout:2)")
    return s


def ssh_key(value: object, where: str) -> str:
    """An OpenSSH public key line ``type base64 [comment]``, parsed with cryptography."""
    s = text(value, where, max_len=16384).strip()
    fields = s.split(None, 2)
    if len(fields) < 2 or fields[0] not in SSH_KEY_TYPES:
        raise UserdataError(
            f"{where}: not an OpenSSH public key (want '<type> <base64> [comment]', "
            f"type one of {', '.join(SSH_KEY_TYPES)})"
        )
    try:
        load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, TypeError) as exc:
        raise UserdataError(f"{where}: {fields[0]} key does not parse: {exc}") from None
    return s


def octal_mode(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value.strip()):
        mode = int(value.strip().replace("o", ""), 8)
    else:
        raise UserdataError(f"{where}: {value!r} is not an octal mode such as '0644'")
    if not 0 <= mode <= 0o7777:
        raise UserdataError(f"{where}: {value!r} is out of range")
    return mode


def boolean(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "no", "0", "off"}:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise UserdataError(f"{where}: expected true or false, got {value!r}")


def str_list(value: object, where: str) -> list[str]:
    """A list of strings; cloud-init also accepts one comma-separated string."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserdataError(f"{where}: expected a list of strings")
    return list(value)
