"""Fixtures of the user-data tests: an image tree to apply into, real SSH keys."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from imagetree import account_files, tool_tree

from guestagent.userdata.settings import UserdataSettings

CHRONY = (
    "pool 2.debian.pool.ntp.org iburst\nsourcedir /run/chrony-dhcp\n"
    "driftfile /var/lib/chrony/chrony.drift\n"
)
SSHD = (
    "Include /etc/ssh/sshd_config.d/*.conf\n#PermitRootLogin prohibit-password\n"
    "PasswordAuthentication yes\nMatch User anoncvs\n  PasswordAuthentication no\n"
)
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_CODENAME=bookworm\n'


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt-get install passwd sudo)")


# What user-data scripts (and the shell form of the templates) use inside an image.
TOOLS = (
    "sh", "bash", "awk", "mktemp", "mkdir", "dirname", "cat", "chmod", "chown", "cmp", "cp",
    "mv", "rm", "grep", "sed", "tr", "head", "touch", "sleep", "id", "env", "ls", "true",
    "printf", "useradd", "groupadd", "usermod", "visudo", "sshd",
)


@pytest.fixture(scope="session")
def chroot_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's shell, coreutils and account tools with their libraries, copied
    once: enough for a script to run chrooted into a test image."""
    return tool_tree(tmp_path_factory.mktemp("chroot-tools"), TOOLS)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links of ``src`` (the session's copies, never this machine's files) into dst."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(dst / rel, os.stat(dirpath).st_mode & 0o7777)
        for name in dirnames + filenames:
            s, d = Path(dirpath) / name, dst / rel / name
            if s.is_symlink():
                d.symlink_to(os.readlink(s))
            elif s.is_file() or s.is_char_device():
                os.link(s, d)


@pytest.fixture
def image_root(tmp_path: Path, chroot_tools: Path) -> Path:
    """A small Debian-like tree: the account files, useradd's inputs, sudoers, chrony and
    sshd configs, and a shell with the tools scripts use (they run chrooted into it).
    Applying into it never touches this machine's /."""
    for tool in ("useradd", "groupadd", "usermod", "visudo", "chroot"):
        _need(tool)
    root = tmp_path / "image"
    _link_tree(chroot_tools, root)
    etc = root / "etc"
    account_files(etc)
    (etc / "sudoers.d").mkdir(mode=0o755)
    (etc / "chrony").mkdir()
    (etc / "chrony" / "chrony.conf").write_text(CHRONY)
    (etc / "ssh").mkdir()
    (etc / "ssh" / "sshd_config").write_text(SSHD)
    (etc / "os-release").write_text(OS_RELEASE)
    (etc / "yum.repos.d").mkdir()
    (etc / "apt" / "sources.list.d").mkdir(parents=True)
    (root / "home").mkdir()
    return root


@pytest.fixture
def ssh_key() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " builder@example"


@pytest.fixture
def rsa_key() -> str:
    pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    raw = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode() + " rsa-key-20170217"


@pytest.fixture
def settings() -> UserdataSettings:
    return UserdataSettings(script_timeout=30)
