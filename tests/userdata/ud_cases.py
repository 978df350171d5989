"""Shared helpers of the user-data tests (plain functions; fixtures are in conftest)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any


def snapshot(root: Path, *, times: bool = False) -> dict[str, Any]:
    """Everything a user would notice in a tree: paths, contents, modes, owners."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            data = (
                p.read_bytes()
                if stat.S_ISREG(st.st_mode)
                else os.readlink(p)
                if p.is_symlink()
                else None
            )
            entry: tuple[Any, ...] = (data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if times and stat.S_ISREG(st.st_mode):
                entry += (st.st_mtime_ns, st.st_ino)
            out[rel] = entry
    return out


def template_cases(key: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """One parameter set per template (repo twice: yum and apt)."""
    return {
        "dns": (
            "dns",
            {
                "nameservers": ["100.100.2.136", "100.100.2.138"],
                "search": ["example.internal"],
                "options": ["rotate", "timeout:2"],
            },
        ),
        "ntp": ("ntp", {"servers": ["ntp1.aliyun.com", "ntp2.aliyun.com"]}),
        "repo-yum": (
            "repo",
            {
                "kind": "yum",
                "id": "myrepo",
                "name": "my repo",
                "baseurl": "http://mirrors.cloud.aliyuncs.com/centos/7/os/x86_64/",
                "gpgcheck": False,
            },
        ),
        "repo-apt": (
            "repo",
            {
                "kind": "apt",
                "id": "myrepo",
                "baseurl": "http://mirrors.cloud.aliyuncs.com/debian",
                "gpgkey": "file:///usr/share/keyrings/debian-archive-keyring.gpg",
            },
        ),
        "sudo-account": (
            "sudo-account",
            {
                "user": "ops",
                "groups": ["wheel", "adm"],
                "ssh_keys": [key],
                "disable_root": True,
                "disable_password_auth": True,
            },
        ),
    }


def apply_cli(root: Path, data: bytes, tmp_path: Path, *extra: str) -> int:
    """``guestagent userdata apply --root ROOT --file F --instance-id i-holes --no-defaults``."""
    from guestagent.cli import main

    ud = tmp_path / "user-data"
    ud.write_bytes(data)
    argv = ["userdata", "apply", "--root", str(root), "--file", str(ud)]
    argv += ["--instance-id", "i-holes", "--no-defaults", *extra]
    return main(argv)


def one_clean_line(err: str) -> str:
    """The single line of ``err``: exactly one newline, at the end, and no other control
    character or line separator anywhere."""
    import unicodedata

    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    body = err[:-1]
    bad = [c for c in body if unicodedata.category(c) in ("Cc", "Zl", "Zp") and c != "\t"]
    assert not bad, repr(err)
    assert len(body.splitlines()) == 1, repr(err)
    return body
