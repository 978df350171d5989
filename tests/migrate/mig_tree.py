"""A prepared server tree to migrate, and a comparison of two trees (bytes and metadata)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

KVER = "6.1.0-13-amd64"
CACHE = Path("/var/cache/guestagent-test/migrate")
BIG = 1024**3
EXCLUDED_TOP = ("dev", "sys", "proc", "media", "lost+found", "mnt", "var/lib/lxcfs")

OS_RELEASE = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
              'VERSION_ID="12"\nID=debian\n')
FSTAB = ("# /etc/fstab\nUUID=5f1c7a3e-0d1e-4c1b-9f3e-1234567890ab / ext4 errors=remount-ro 0 1\n"
         "UUID=0aa1 none swap sw 0 0\n/dev/sdb1 /mnt/disk1 ext4 defaults 0 2\n"
         "tmpfs /tmp tmpfs defaults 0 0\n")
GRUB = ("set default=0\nmenuentry 'Debian' {\n"
        "  linux /boot/vmlinuz-6.1.0-13-amd64 "
        "root=UUID=5f1c7a3e-0d1e-4c1b-9f3e-1234567890ab ro quiet\n"
        "  initrd /boot/initrd.img-6.1.0-13-amd64\n}\n")


def newc(members: dict[str, bytes]) -> bytes:
    """A newc cpio archive (what an initramfs is) holding ``members``."""
    out = bytearray()
    for ino, (name, data) in enumerate([*members.items(), ("TRAILER!!!", b"")], 1):
        mode = 0o100644 if name != "TRAILER!!!" else 0
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08x" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def build_tree(root: Path, big: str = "sparse") -> Path:
    """A Debian-like server: kernel + initramfs with virtio, GRUB 2, SELinux off, hard links,
    ACLs, xattrs, sparse files, a 1 GB file (``big``: "sparse", "real" or "none"), and
    content in every default-excluded directory."""
    write(root / "etc/os-release", OS_RELEASE)
    write(root / "etc/fstab", FSTAB)
    write(root / "etc/selinux/config", "SELINUX=disabled\nSELINUXTYPE=targeted\n")
    write(root / "etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640)
    write(root / "boot/grub/grub.cfg", GRUB)
    write(root / f"boot/vmlinuz-{KVER}", os.urandom(4096))
    mods = f"usr/lib/modules/{KVER}/kernel/drivers"
    initrd = newc({f"{mods}/block/virtio_blk.ko": b"\x7fELF blk",
                   f"{mods}/virtio/virtio_pci.ko": b"\x7fELF pci", "init": b"#!/bin/sh\n"})
    write(root / f"boot/initrd.img-{KVER}", gzip.compress(initrd))
    moddir = root / "lib/modules" / KVER
    write(moddir / "kernel/drivers/net/virtio_net.ko", b"\x7fELF net")
    write(moddir / "modules.builtin", "kernel/drivers/virtio/virtio.ko\n")
    for i in range(40):
        write(root / f"usr/share/doc/pkg{i}/README", f"package {i}\n" * (i + 1))
    tool = write(root / "usr/bin/tool", os.urandom(20000), 0o755)
    os.link(tool, root / "usr/bin/tool-alias")
    os.symlink("tool", root / "usr/bin/tool-link")
    acl = write(root / "srv/shared/report.txt", "quarterly\n")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:2345:r", str(acl)], check=True)
    os.setxattr(root / "srv/shared/report.txt", "user.origin", b"on-premises")
    owned = write(root / "home/app/data.bin", os.urandom(3000))
    os.chown(owned, 1500, 1501)
    sparse = root / "var/lib/db/sparse.img"
    sparse.parent.mkdir(parents=True)
    with sparse.open("wb") as fh:
        fh.truncate(64 * 1024**2)
        fh.seek(10 * 1024**2)
        fh.write(b"middle" * 1000)
    if big == "sparse":
        with (root / "var/big.img").open("wb") as fh:
            fh.truncate(BIG)
            fh.write(b"head")
    elif big == "real":
        shutil.copyfile(real_big_file(), root / "var/big.img")
    for top in EXCLUDED_TOP:
        write(root / top / "excluded-content" / "file", "must not travel\n")
    (root / "tmp").mkdir(mode=0o1777)
    return root


def real_big_file() -> Path:
    """1 GB of random bytes, made once and kept outside the checkout."""
    path = CACHE / "big-1g.bin"
    if path.exists() and path.stat().st_size == BIG:
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        for _ in range(BIG // 2**24):
            fh.write(os.urandom(2**24))
    tmp.rename(path)
    return path


def _entry(path: Path) -> dict[str, object]:
    st = path.lstat()
    info: dict[str, object] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
    if path.is_symlink():
        info["link"] = os.readlink(path)
        return info
    try:
        info["xattrs"] = {k: os.getxattr(path, k, follow_symlinks=False).hex()
                          for k in sorted(os.listxattr(path, follow_symlinks=False))}
    except OSError:
        info["xattrs"] = {}
    if path.is_file():
        info["size"] = st.st_size
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(2**22):
                digest.update(chunk)
        info["sha256"] = digest.hexdigest()
    return info


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """Every entry under ``root`` with its metadata and content hash; hard-link groups."""
    entries: dict[str, object] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*dirnames, *filenames]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if any(rel.startswith(s + "/") for s in skip) or rel.startswith(".go2aliyun"):
                continue
            path = Path(dirpath, name)
            entries[rel] = _entry(path)
            st = path.lstat()
            if st.st_nlink > 1 and path.is_file() and not path.is_symlink():
                inodes.setdefault(st.st_ino, []).append(rel)
    links = sorted(sorted(v) for v in inodes.values())
    return {"entries": entries, "hardlinks": links}


def diff(a: dict[str, object], b: dict[str, object]) -> list[str]:
    ea, eb = a["entries"], b["entries"]
    assert isinstance(ea, dict) and isinstance(eb, dict)
    out = [f"only in source: {k}" for k in sorted(ea.keys() - eb.keys())]
    out += [f"only in target: {k}" for k in sorted(eb.keys() - ea.keys())]
    out += [f"differs: {k}: {json.dumps(ea[k])} != {json.dumps(eb[k])}"
            for k in sorted(ea.keys() & eb.keys()) if ea[k] != eb[k]]
    if a["hardlinks"] != b["hardlinks"]:
        out.append(f"hard links: {a['hardlinks']} != {b['hardlinks']}")
    return out


def user_config(directory: Path, **overrides: object) -> Path:
    data: dict[str, object] = {
        "access_id": "LTAI5tMigrateTest01", "secret_key": "s3cr3t-Migrate-Key-0001",
        "region_id": "cn-hangzhou", "image_name": "CLIENT_IMAGE_DEBIAN12_01",
        "system_disk_size": 40, "platform": "Debian", "architecture": "x86_64",
        "data_disks": [], "bandwidth_limit": 0,
    }
    data.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "user_config.json"
    path.write_text(json.dumps(data, indent=2))
    path.chmod(0o600)
    return path
