"""A corpus of bad user-data: each refused with one clear line, nothing changed on disk."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import pytest
from ud_cases import snapshot

from guestagent.cli import main

OK_CC = b"#cloud-config\nmanage_resolv_conf: true\nresolv_conf: {nameservers: [10.0.0.2]}\n"
MIME = (
    b'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
    b"--XX\nContent-Type: text/cloud-config\n\n" + OK_CC + b"\n"
)


def _corpus(bad_key: str) -> dict[str, tuple[bytes, str]]:
    return {
        "newline-injection": (
            b"#cloud-config\nmanage_resolv_conf: true\nresolv_conf:\n"
            b'  nameservers: ["10.0.0.2\\nnameserver 6.6.6.6"]\n',
            "control character",
        ),
        "shell-in-user-name": (
            b"#cloud-config\nusers: [{name: 'x;reboot'}]\n",
            "not a valid user/group name",
        ),
        "shell-in-baseurl": (
            b"#cloud-config\nyum_repos:\n  r: {baseurl: 'http://x/`reboot`'}\n",
            "not allowed in a URL",
        ),
        "ini-injection": (
            b'#cloud-config\nyum_repos:\n  r: {baseurl: http://x/, name: "a\\n[evil]"}\n',
            "control",
        ),
        "repo-path-escape": (
            b"#cloud-config\nyum_repos:\n  ../../etc/cron.d/x: {baseurl: http://x/}\n",
            "repository id",
        ),
        "apt-extra-command": (
            b"#cloud-config\napt:\n  sources:\n    r: {source: 'deb http://x/ $(id) main'}\n",
            "only $RELEASE",
        ),
        "write-files-escape": (
            b"#cloud-config\nwrite_files: [{path: /etc/../etc/shadow, content: x}]\n",
            "without '..'",
        ),
        "oversize": (b"#!/bin/sh\n" + b"# pad\n" * 6000, "over the 32768-byte limit"),
        "bad-base64": (b"IyFiaW4vc2gKZWNobyBoaQo=x", "base64"),
        "broken-gzip": (gzip.compress(OK_CC)[:-12], "gzip is broken"),
        "gzip-bomb": (gzip.compress(b"#!/bin/sh\n" + b"#" * 3_000_000), "expands beyond"),
        "broken-mime": (MIME, "broken MIME"),
        "mime-no-boundary": (
            b"Content-Type: multipart/mixed\nMIME-Version: 1.0\n\nhello\n",
            "broken MIME",
        ),
        "bad-ssh-key": (
            b"#cloud-config\nusers:\n - name: bob\n   ssh_authorized_keys: ['"
            + bad_key.encode()
            + b"']\n",
            "does not parse",
        ),
        "not-a-key": (
            b"#cloud-config\nusers: [{name: bob, ssh_authorized_keys: [hello]}]\n",
            "not an OpenSSH public key",
        ),
        "unknown-type": (b"hello there, please configure DNS\n", "unknown user-data type"),
        "include-url": (b"#include\nhttp://example.com/x\n", "not supported"),
        "bad-yaml": (b"#cloud-config\nntp: [\n", "not valid YAML"),
        "not-a-mapping": (b"#cloud-config\n- a\n- b\n", "must be a mapping"),
        "password": (
            b"#cloud-config\nusers: [{name: bob, plain_text_passwd: hunter2}]\n",
            "passwords are not applied",
        ),
        "sudo-rule": (
            b"#cloud-config\nusers: [{name: bob, sudo: 'ALL=(ALL NOPASSWD ALL'}]\n",
            "visudo",
        ),
        "shell-syntax": (b"#!/bin/sh\nif then fi\n", "shell syntax error"),
    }


CASES = list(_corpus("").keys())


def _apply_offline(root: Path, user_data: Path, instance_id: str) -> int:
    """``guestagent userdata apply`` as image preparation runs it: no metadata service."""
    return main(["userdata", "apply", "--root", str(root), "--file", str(user_data),
                 "--instance-id", instance_id, "--no-defaults"])


@pytest.mark.parametrize("case", CASES)
def test_bad_user_data_is_refused_and_nothing_changes(
    case: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rsa_key: str
) -> None:
    # A real RSA key, truncated (as a paste cut short would be).
    bad_key = f"ssh-rsa {rsa_key.split()[1][:-24]} x"
    data, why = _corpus(bad_key)[case]
    ud = tmp_path / "user-data"
    ud.write_bytes(data)
    (image_root / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    before = snapshot(image_root, times=True)
    rc = _apply_offline(image_root, ud, "i-bad")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and why in err[0], err
    assert err[0].startswith("guestagent: user-data refused, nothing changed:")
    assert snapshot(image_root, times=True) == before

    rc = main(["userdata", "validate", str(ud)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and why in err[-1]


def test_windows_user_data_is_ignored_with_a_message(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ud = tmp_path / "user-data"
    ud.write_bytes(base64.b64encode(b"[powershell]\nWrite-Host hi\n"))
    before = snapshot(image_root)
    rc = _apply_offline(image_root, ud, "i-win")
    captured = capsys.readouterr()
    assert rc == 0
    assert "Windows user-data ([bat]/[powershell]) is ignored on Linux" in captured.err
    after = {k: v for k, v in snapshot(image_root).items() if not k.startswith("var")}
    assert after == before
