"""``guestagent userdata render|combine|validate|list`` as a user runs them."""

from __future__ import annotations

import base64
import email
from pathlib import Path

import pytest

from guestagent.cli import main
from guestagent.userdata import parts


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["userdata", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_render_base64_decodes_to_the_cloud_config(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "render", "ntp", "--param", "servers=ntp1.aliyun.com", "--base64")
    assert rc == 0
    assert base64.b64decode(out).startswith(b"#cloud-config\n")


def test_render_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "render", "dns", "--param", "nameservers=1.1.1.1;id")
    assert rc == 2 and err.count("\n") == 1 and "not an IP address" in err
    rc, _, err = _run(capsys, "render", "nosuch")
    assert rc == 2 and "no template 'nosuch'" in err
    rc, _, err = _run(capsys, "render", "dns", "--param", "colour=blue")
    assert rc == 2 and "takes nameservers" in err


def test_combine_mixed_formats_makes_mime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sh, cc, out = tmp_path / "a.sh", tmp_path / "b.yaml", tmp_path / "ud"
    _run(capsys, "render", "dns", "-p", "nameservers=1.1.1.1", "--format", "shell", "-o", str(sh))
    _run(capsys, "render", "ntp", "-p", "servers=ntp1.aliyun.com", "-o", str(cc))
    rc, _, _ = _run(capsys, "combine", str(sh), str(cc), "-o", str(out))
    assert rc == 0
    msg = email.message_from_bytes(out.read_bytes())
    assert [p.get_content_type() for p in msg.walk() if not p.is_multipart()] == [
        "text/x-shellscript",
        "text/cloud-config",
    ]
    assert [p.kind for p in parts.split(out.read_bytes())] == ["shell", "cloud-config"]
    rc, stdout, _ = _run(capsys, "validate", str(out))
    assert rc == 0 and "valid (1 shell, 1 cloud-config)" in stdout


def test_combine_enforces_the_size_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.sh"
    big.write_bytes(b"#!/bin/sh\n" + b"echo padding padding padding\n" * 1500)
    rc, _, err = _run(capsys, "combine", str(big), str(big))
    assert rc == 2 and "over the 32768-byte limit; try --gzip" in err
    out = tmp_path / "ud.gz"
    rc, _, _ = _run(capsys, "combine", str(big), str(big), "--gzip", "-o", str(out))
    assert rc == 0
    split = parts.split(parts.decode(out.read_bytes()))
    assert [p.content for p in split] == [big.read_bytes()] * 2


def test_validate_warns_about_keys_only_cloud_init_applies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ud = tmp_path / "ud"
    ud.write_text("#cloud-config\npackages: [htop]\nntp: {servers: [ntp1.aliyun.com]}\n")
    rc, _, err = _run(capsys, "validate", str(ud))
    assert rc == 0 and "packages: not supported by guestagent" in err


def test_list_shows_templates(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "list")
    assert rc == 0
    for name in ("dns:", "ntp:", "repo:", "sudo-account:"):
        assert name in out


def test_an_instance_id_with_a_final_newline_is_refused(capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    # It keys the semaphores; ``^...$`` with re.match let it through ($ matches before a
    # final newline).
    script = tmp_path / "ud.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    rc, _, err = _run(capsys, "apply", "--instance-id", "i-1\n", "--dry-run",
                      "--file", str(script), "--root", str(tmp_path))
    assert rc == 2 and err.count("\n") == 1 and "\\n" in err, err
