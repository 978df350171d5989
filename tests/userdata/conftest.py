"""Fixtures of the user-data tests: an image tree to apply into, real SSH keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

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


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """A small Debian-like tree: the account files, useradd's inputs, sudoers, chrony and
    sshd configs. Applying into it never touches this machine's /."""
    for tool in ("useradd", "groupadd", "usermod", "visudo"):
        _need(tool)
    root = tmp_path / "image"
    etc = root / "etc"
    (etc / "default").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs", "sudoers"):
        shutil.copy2(f"/etc/{name}", etc / name)
    shutil.copy2("/etc/default/useradd", etc / "default" / "useradd")
    shutil.copytree("/etc/skel", etc / "skel", symlinks=True)
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
