"""disable_root / ssh_pwauth: a drop-in where sshd_config includes sshd_config.d, the main
file otherwise, and the effective values checked with the real ``sshd -T``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ud_cases import apply_cli, one_clean_line

from guestagent.userdata.handlers import sshd

pytestmark = pytest.mark.skipif(
    shutil.which("sshd", path="/usr/sbin:/usr/bin") is None,
    reason="sshd not installed (Debian: openssh-server)",
)

DOC = b"#cloud-config\ndisable_root: true\nssh_pwauth: false\n"


@pytest.fixture(autouse=True)
def privsep_dir() -> None:
    # sshd -T insists on its privilege-separation directory (ssh.service makes it).
    os.makedirs(sshd.PRIVSEP_DIR, mode=0o755, exist_ok=True)


def _effective(root: Path) -> dict[str, str]:
    from guestagent.userdata.tree import Tree

    values = sshd.effective(Tree(root))
    assert values is not None
    return values


def test_a_drop_in_when_the_main_file_includes_them(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = (image_root / "etc/ssh/sshd_config").read_text()
    assert _effective(image_root)["passwordauthentication"] == "yes"
    assert apply_cli(image_root, DOC, tmp_path) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert "handler sshd: applied" in out.out and "not checked" not in out.err
    assert (image_root / "etc/ssh/sshd_config").read_text() == main
    values = _effective(image_root)
    assert (values["passwordauthentication"], values["permitrootlogin"]) == ("no", "no")


def test_the_main_file_when_there_is_no_include(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = image_root / "etc/ssh/sshd_config"
    conf.write_text("PasswordAuthentication yes\nMatch User anoncvs\n  PermitRootLogin yes\n")
    assert apply_cli(image_root, DOC, tmp_path) == 0, capsys.readouterr().err
    assert not (image_root / "etc/ssh/sshd_config.d/01-guestagent.conf").exists()
    assert conf.read_text().startswith("PasswordAuthentication no\nPermitRootLogin no\nMatch")
    values = _effective(image_root)
    assert (values["passwordauthentication"], values["permitrootlogin"]) == ("no", "no")


def test_a_setting_that_still_wins_is_a_failure_and_is_undone(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Read before ours: the main file sets it ahead of its Include line.
    conf = image_root / "etc/ssh/sshd_config"
    conf.write_text("PasswordAuthentication yes\n" + conf.read_text())
    assert apply_cli(image_root, DOC, tmp_path) == 4
    err = capsys.readouterr().err
    assert "sshd failed: sshd: another setting wins over ours" in err
    assert "PasswordAuthentication is yes, not no" in err
    assert not (image_root / "etc/ssh/sshd_config.d/01-guestagent.conf").exists()


def test_a_configuration_sshd_rejects_is_a_failure(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = image_root / "etc/ssh/sshd_config"
    conf.write_text("NoSuchKeyword yes\n")
    assert apply_cli(image_root, DOC, tmp_path) == 4
    lines = capsys.readouterr().err.splitlines()
    failed = [ln for ln in lines if "sshd failed" in ln]
    assert failed and "sshd -T rejects the configuration" in one_clean_line(failed[0] + "\n")
    assert conf.read_text() == "NoSuchKeyword yes\n"


def test_without_sshd_in_the_image_the_values_are_not_claimed(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for found in image_root.rglob("sshd"):
        if found.is_file():
            found.unlink()
    assert apply_cli(image_root, DOC, tmp_path) == 0
    assert "effective values not checked" in capsys.readouterr().err
