"""Who is on the other end of a local connection: uid, gid and supplementary groups.

Unix sockets carry the peer's credentials (``SO_PEERCRED``). For loopback TCP the kernel
is asked for the client socket by its exact address pair over netlink ``sock_diag`` (what
``ss`` uses: one lookup, ~tens of µs, whatever the number of connections), which gives
the uid owning it; groups then come from the user database. Without sock_diag the
connection table ``/proc/net/tcp{,6}`` is scanned, and as a last resort ``psutil`` walks
every process's descriptors (slow: tens to hundreds of ms). The server does this once per
connection, off the event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """A client process. ``uid`` is None when it could not be identified (then ``why``)."""

    address: str
    uid: int | None = None
    gid: int | None = None
    groups: frozenset[int] = field(default_factory=frozenset)
    pid: int | None = None
    why: str = ""

    def describe(self) -> str:
        if self.uid is None:
            return f"{self.address} (unidentified: {self.why})"
        return f"{self.address} uid={self.uid} gid={self.gid} pid={self.pid}"


def unix_peer(sock: socket.socket) -> Peer:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError as exc:
        return Peer("unix", why=f"SO_PEERCRED failed: {exc.strerror}")
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer("unix", uid, gid, _supplementary(pid), pid or None)


def tcp_peer(local: tuple[str, int], remote: tuple[str, int]) -> Peer:
    """Identify the process owning the client end of a loopback TCP connection."""
    address = f"{remote[0]}:{remote[1]}"
    if not is_loopback(remote[0]):
        return Peer(address, why="not a loopback address")
    uid = _uid_from_diag(remote, local)
    if uid is None:
        uid = _uid_from_table(remote, local)
    if uid is not None:
        return _user_peer(address, uid)
    import psutil  # last resort, rarely reached: kept out of the idle daemon

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError) as exc:
        return Peer(address, why=f"cannot read the connection table: {exc}")
    want_l = (_norm(remote[0]), remote[1])
    want_r = (_norm(local[0]), local[1])
    for conn in conns:
        if not conn.laddr or not conn.raddr or conn.pid is None:
            continue
        if (_norm(conn.laddr.ip), conn.laddr.port) == want_l and (
            _norm(conn.raddr.ip),
            conn.raddr.port,
        ) == want_r:
            return _process_peer(address, conn.pid)
    return Peer(address, why="no local process owns this connection")


_NLMSG = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, states
_DIAG_ID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
_DIAG_TAIL = struct.Struct("=III")  # interface, cookie (2 words)
_DIAG_MSG_UID = struct.Struct("=I")
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
# inet_diag_msg: 4 bytes, the 48-byte sockid, expires, rqueue, wqueue, then uid.
_UID_OFFSET = 4 + 48 + 12


def _uid_from_diag(remote: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the client socket, by an exact netlink sock_diag lookup."""
    try:
        client = ipaddress.ip_address(_norm(remote[0]))
        server = ipaddress.ip_address(_norm(local[0]))
    except ValueError:
        return None
    family = socket.AF_INET if client.version == 4 else socket.AF_INET6
    body = (
        _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
        + _DIAG_ID.pack(remote[1], local[1], client.packed.ljust(16, b"\0"),
                        server.packed.ljust(16, b"\0"))
        + _DIAG_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    request = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendto(request + body, (0, 0))
            reply = nl.recv(8192)
    except OSError:
        return None
    if len(reply) < _NLMSG.size:
        return None
    _length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(reply)
    start = _NLMSG.size + _UID_OFFSET
    if kind != SOCK_DIAG_BY_FAMILY or len(reply) < start + 4:
        return None  # NLMSG_ERROR: no such socket (or sock_diag unavailable)
    (uid,) = _DIAG_MSG_UID.unpack_from(reply, start)
    return int(uid)


def _uid_from_table(remote: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the client socket ``remote`` connected to ``local``, from /proc/net."""
    try:
        client, server = _hex_endpoint(remote), _hex_endpoint(local)
    except ValueError:
        return None
    table = "/proc/net/tcp" if len(client) == 13 else "/proc/net/tcp6"
    try:
        with open(table, encoding="ascii") as fh:
            next(fh, None)
            for line in fh:
                fields = line.split()
                if len(fields) > 7 and fields[1] == client and fields[2] == server:
                    return int(fields[7])
    except (OSError, ValueError):
        pass
    return None


def _hex_endpoint(endpoint: tuple[str, int]) -> str:
    """``/proc/net/tcp`` notation: address bytes as host-order 32-bit words in hex, port."""
    packed = ipaddress.ip_address(_norm(endpoint[0])).packed
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    text = "".join(f"{int.from_bytes(w, 'little'):08X}" for w in words)
    return f"{text}:{endpoint[1]:04X}"


def _user_peer(address: str, uid: int) -> Peer:
    # The socket's owner is the process's effective uid; its groups are the user's.
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Peer(address, uid, None, frozenset())
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Peer(address, uid, entry.pw_gid, groups)


def _process_peer(address: str, pid: int) -> Peer:
    import psutil

    try:
        proc = psutil.Process(pid)
        uid = proc.uids().effective
        gid = proc.gids().effective
    except (psutil.Error, OSError) as exc:
        return Peer(address, pid=pid, why=f"process {pid} vanished: {exc}")
    return Peer(address, uid, gid, _supplementary(pid), pid)


def _supplementary(pid: int) -> frozenset[int]:
    # Best effort: a process that already exited still has its uid/gid from the kernel.
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _norm(host: str) -> str:
    if host.startswith("::ffff:"):
        return host[7:]
    return host
