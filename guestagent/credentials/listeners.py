"""The credential server's listening sockets and who may open them.

Under systemd, ``guestagent.socket`` holds the Unix socket and the loopback TCP port
(``FileDescriptorName=credentials``) across daemon restarts, so nobody can take the port
while the agent is down; without systemd the server binds them itself.

Access to the Unix socket (and the token file) follows the allow-list: the file stays
``socket_mode`` with ``socket_group``, and each ``allow_users``/``allow_groups`` entry gets
a POSIX ACL entry (read/write) — one setting, one effect. Where the file system has no
ACLs the socket is opened to everyone instead, and ``SO_PEERCRED`` (checked on every
connection) alone keeps others out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from guestagent import activation

log = logging.getLogger(__name__)

FD_NAME = "credentials"  # FileDescriptorName= in units/guestagent.socket
BACKLOG = 512

# The kernel's POSIX ACL xattr (linux/posix_acl_xattr.h): a version word, then entries of
# (tag, permissions, id), sorted by tag and then id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_ENTRY = struct.Struct("<HHI")


@dataclass(frozen=True)
class Access:
    """Who may open a file: its mode and group, plus extra users and groups (ACL)."""

    mode: int = 0o660
    gid: int | None = None
    uids: frozenset[int] = field(default_factory=frozenset)
    gids: frozenset[int] = field(default_factory=frozenset)
    perm: int = 0o6  # what the extra users and groups get: rw (a socket), r (a file)

    def apply(self, path: Path) -> None:
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        os.chmod(path, self.mode)
        if not self.uids and not self.gids:
            return
        try:
            os.setxattr(path, _ACL_XATTR,
                        acl_bytes(self.mode, self.uids, self.gids, self.perm))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            # No ACLs here: open the file to all; the peer check still decides.
            log.warning("%s: file system has no POSIX ACLs; opening it to every user "
                        "(the allow-list is still checked on each connection)", path)
            os.chmod(path, self.mode | self.perm)


def acl_bytes(mode: int, uids: Iterable[int], gids: Iterable[int], perm: int = 0o6) -> bytes:
    """The ACL xattr value: the mode's owner/group/other bits plus ``perm`` for each id."""
    rw = perm
    entries = [(_USER_OBJ, (mode >> 6) & 7, _NO_ID)]
    entries += [(_USER, rw, uid) for uid in sorted(set(uids))]
    entries.append((_GROUP_OBJ, (mode >> 3) & 7, _NO_ID))
    entries += [(_GROUP, rw, gid) for gid in sorted(set(gids))]
    entries.append((_MASK, rw | ((mode >> 3) & 7), _NO_ID))
    entries.append((_OTHER, mode & 7, _NO_ID))
    return struct.pack("<I", _ACL_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


@dataclass
class Listeners:
    """What the server listens on, and whether it owns the Unix socket's file."""

    unix: socket.socket | None = None
    unix_path: Path | None = None
    owns_path: bool = False
    tcp: socket.socket | None = None
    tcp_error: str = ""

    def close(self) -> None:
        for sock in (self.unix, self.tcp):
            if sock is not None:
                sock.close()
        if self.owns_path and self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()


def open_listeners(
    socket_path: Path | None, access: Access, tcp: tuple[str, int] | None, *, inherit: bool
) -> Listeners:
    """Take systemd's sockets when it passed them, else bind (TCP failure is reported,
    not fatal: the Unix socket still serves)."""
    passed = activation.inherited(FD_NAME) if inherit else []
    unix_passed = [s for s in passed if s.family == socket.AF_UNIX]
    tcp_passed = [s for s in passed if s.family in (socket.AF_INET, socket.AF_INET6)]
    out = Listeners()
    if socket_path is not None:
        if unix_passed:
            out.unix = unix_passed.pop(0)
            out.unix_path = Path(out.unix.getsockname())
            if out.unix_path != socket_path:
                log.warning("guestagent.socket holds %s, settings say %s: serving %s (edit "
                            "the unit to move it)", out.unix_path, socket_path, out.unix_path)
        else:
            out.unix, out.unix_path, out.owns_path = bind_unix(socket_path), socket_path, True
        access.apply(out.unix_path)
    if tcp is not None:
        if tcp_passed:
            out.tcp = tcp_passed.pop(0)
            held = out.tcp.getsockname()[:2]
            if (held[0], held[1]) != tcp and tcp[1] != 0:
                log.warning("guestagent.socket holds %s:%s, settings say %s:%s: serving "
                            "%s:%s", *held, *tcp, *held)
        else:
            try:
                out.tcp = bind_tcp(*tcp)
            except OSError as exc:
                out.tcp_error = f"cannot listen on {tcp[0]}:{tcp[1]}: {exc.strerror or exc}"
                log.error("credential server: %s; serving the Unix socket only", out.tcp_error)
    for unused in unix_passed + tcp_passed:
        log.warning("guestagent.socket passes %s, which settings do not use (tcp_enabled?)",
                    unused.getsockname())
        unused.close()
    return out


def bind_unix(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created with no access at all, opened up only once mode, group and ACL are right.
    old = os.umask(0o777)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(BACKLOG)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
