"""Classes of hostile user-data that once got through (issue 9), each with a small corpus:
every case refused with one line (control characters escaped) and an unchanged tree, or
handled the safe way (unknown MIME types skipped, reads kept inside --root)."""

from __future__ import annotations

import base64
import gzip
import os
import socket
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from ud_cases import apply_cli, one_clean_line, snapshot

from guestagent.cli import main
from guestagent.userdata.cli import render_template
from guestagent.userdata.errors import UserdataError


def _refused(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, why: str
) -> str:
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    before = snapshot(root, times=True)
    rc = apply_cli(root, data, tmp_path)
    line = one_clean_line(capsys.readouterr().err)
    assert rc == 2, line
    assert line.startswith("guestagent: user-data refused, nothing changed:"), line
    assert why in line, line
    assert snapshot(root, times=True) == before
    rc = main(["userdata", "validate", str(tmp_path / "user-data")])
    vline = one_clean_line(capsys.readouterr().err)
    # validate may be stopped first by cloud-init's own schema check (when installed).
    assert rc == 2 and (why in vline or "cloud-init schema" in vline), vline
    return line


def _cc(body: str) -> bytes:
    return ("#cloud-config\n" + body).encode()


# -- addresses and host names: nothing after a zone id reaches a config line ---------------

ZONE_CASES = {
    "resolv-zone-word": (
        "manage_resolv_conf: true\nresolv_conf: {nameservers: ['fe80::1%eth0 options x']}\n",
        "zone id",
    ),
    "resolv-zone-comment": (
        "manage_resolv_conf: true\nresolv_conf: {nameservers: ['fe80::1%eth0#x']}\n",
        "zone id",
    ),
    "resolv-zone-global": (
        "manage_resolv_conf: true\nresolv_conf: {nameservers: ['2001:db8::1%eth0']}\n",
        "only valid on fe80::/10",
    ),
    "ntp-server-zone": ("ntp: {servers: ['fe80::1%lo minpoll 0']}\n", "zone id"),
    "ntp-pool-zone": ("ntp: {pools: ['fe80::1%eth0;reboot']}\n", "zone id"),
    "ntp-server-zone-tab": ('ntp: {servers: ["fe80::1%eth0\\tkey 1"]}\n', "control character"),
    "numeric-host": ("ntp: {servers: ['1.2.3.999']}\n", "neither an IP address nor a host"),
    "apt-url-zone": (
        "apt:\n  sources:\n    r: {source: 'deb http://[fe80::1%25eth0%20x]/ bookworm main'}\n",
        "bad URL",
    ),
}


@pytest.mark.parametrize("case", sorted(ZONE_CASES))
def test_address_classes_are_refused(
    case: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body, why = ZONE_CASES[case]
    _refused(image_root, tmp_path, capsys, _cc(body), why)


def test_a_link_local_nameserver_with_an_interface_is_written(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _cc("manage_resolv_conf: true\nresolv_conf: {nameservers: ['fe80::1%eth0']}\n")
    assert apply_cli(image_root, data, tmp_path) == 0
    assert "nameserver fe80::1%eth0\n" in (image_root / "etc/resolv.conf").read_text()


@pytest.mark.parametrize("bad", ["fe80::1%eth0 x", "fe80::1%", "10.0.0.1%eth0"])
def test_templates_refuse_zone_text(bad: str) -> None:
    with pytest.raises(UserdataError) as exc:
        render_template("dns", {"nameservers": [bad]}, "cloud-config")
    assert "\n" not in str(exc.value)


# -- YAML bombs: bounded before anything is expanded ---------------------------------------


def _laughs(width: int = 9, levels: int = 9) -> str:
    lines = ["a: &a [" + ",".join(['"lol"'] * width) + "]"]
    prev = "a"
    for n in "bcdefghijklmnop"[: levels - 1]:
        lines.append(f"{n}: &{n} [" + ",".join([f"*{prev}"] * width) + "]")
        prev = n
    return "\n".join(lines) + "\n"


def _mime(*parts: tuple[str, bytes]) -> bytes:
    msg = MIMEMultipart()
    for ctype, body in parts:
        maintype, subtype = ctype.split("/")
        sub = MIMEText(body.decode(), subtype)
        if maintype != "text":
            sub.replace_header("Content-Type", ctype)
        msg.attach(sub)
    return msg.as_bytes()


YAML_CASES = {
    "billion-laughs": (_cc(_laughs()), "expand it to more than"),
    "laughs-in-merge-keys": (
        _cc("a: &a {x: 1, y: 2}\n" + "".join(f"k{i}: {{<<: *a}}\n" for i in range(120))),
        "more than 100 aliases",
    ),
    "recursive-alias": (_cc("ntp: &n {servers: [*n]}\n"), "recursive"),
    "deep-nesting": (_cc("ntp: " + "[" * 5000 + "]" * 5000 + "\n"), "deeper than"),
    "deep-through-aliases": (
        _cc("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n"),
        "deeper than",
    ),
    "laughs-in-mime": (_mime(("text/cloud-config", _cc(_laughs()))), "expand it to more than"),
    "laughs-gzip-base64": (
        base64.b64encode(gzip.compress(_cc(_laughs(12, 7)))),
        "expand it to more than",
    ),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_yaml_bombs_are_refused_before_expanding(
    case: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, why = YAML_CASES[case]
    assert len(data) < 32768
    _refused(image_root, tmp_path, capsys, data, why)


def test_ordinary_anchors_still_work(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _cc(
        "x-servers: &s [ntp1.aliyun.com, ntp2.aliyun.com]\nntp: {servers: *s}\n"
        "x-dns: &d {nameservers: [10.0.0.2]}\nmanage_resolv_conf: true\n"
        "resolv_conf: {<<: *d, searchdomains: [example.internal]}\n"
    )
    assert apply_cli(image_root, data, tmp_path) == 0, capsys.readouterr().err
    assert "server ntp2.aliyun.com iburst" in (image_root / "etc/chrony/chrony.conf").read_text()
    assert "nameserver 10.0.0.2" in (image_root / "etc/resolv.conf").read_text()


# -- MIME parts of unknown types are skipped, never run -------------------------------------

RUN_ME = b'#!/bin/sh\ntouch "${GUESTAGENT_ROOT:-}/ran-$$"\n'


@pytest.mark.parametrize(
    "ctype", ["text/x-unknown", "application/x-foo", "text/html", "text/x-shellscript-extra"]
)
def test_unknown_mime_parts_are_skipped_with_a_warning(
    ctype: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _mime(
        (ctype, RUN_ME),
        ("text/cloud-config", _cc("ntp: {servers: [ntp1.aliyun.com]}\n")),
    )
    rc = apply_cli(image_root, data, tmp_path)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    warning = one_clean_line(captured.err)
    assert f"content type {ctype} is not handled" in warning and "skipped" in warning
    assert not list(image_root.rglob("ran-*"))
    assert "ntp1.aliyun.com" in (image_root / "etc/chrony/chrony.conf").read_text()
    rc = main(["userdata", "validate", str(tmp_path / "user-data")])
    assert rc == 0 and ctype in capsys.readouterr().err


# -- under --root, reads stay inside the root -----------------------------------------------


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    """A file of 'the host' (outside the image tree) that must never reach the image."""
    secret = tmp_path / "host-only"
    secret.mkdir()
    (secret / "file").write_text("server host-secret.invalid iburst\nHOST-ONLY-LINE\n")
    return secret


def _assert_no_leak(root: Path, host_secret: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"HOST-ONLY" not in path.read_bytes(), path
            assert b"host-secret" not in path.read_bytes(), path
    assert "HOST-ONLY" in (host_secret / "file").read_text()  # and the host file untouched


def _escape_links(root: Path, host_secret: Path) -> dict[str, tuple[Path, str]]:
    depth = len(root.parts)
    up = "../" * (depth + 2)
    return {
        "absolute": (root / "etc/chrony/chrony.conf", str(host_secret / "file")),
        "relative-up": (root / "etc/chrony/chrony.conf", up + str(host_secret / "file")[1:]),
        "chain": (root / "etc/chrony/chrony.conf", "chain-2"),
        "parent-dir": (root / "etc/chrony", str(host_secret)),
    }


@pytest.mark.parametrize("case", ["absolute", "relative-up", "chain", "parent-dir"])
def test_reads_under_root_never_follow_links_out(
    case: str, image_root: Path, tmp_path: Path, host_secret: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    link, target = _escape_links(image_root, host_secret)[case]
    if link.is_dir():
        import shutil

        shutil.rmtree(link)
    else:
        link.unlink()
    link.symlink_to(target)
    if case == "chain":
        (image_root / "etc/chrony/chain-2").symlink_to(str(host_secret / "file"))
    rc = apply_cli(image_root, _cc("ntp: {servers: [ntp1.aliyun.com]}\n"),
                   tmp_path)
    assert rc == 0, capsys.readouterr().err
    _assert_no_leak(image_root, host_secret)


def test_authorized_keys_link_to_a_host_file_is_not_merged(
    image_root: Path, tmp_path: Path, host_secret: Path, ssh_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (host_secret / "file").write_text("ssh-ed25519 AAAAHOST-ONLY host-only-key\n")
    ssh_dir = image_root / "home/bob/.ssh"
    ssh_dir.mkdir(parents=True)
    (ssh_dir / "authorized_keys").symlink_to(str(host_secret / "file"))
    host_dir_mode = os.stat(host_secret).st_mode
    data = _cc(f"users: [{{name: bob, ssh_authorized_keys: ['{ssh_key}']}}]\n")
    rc = apply_cli(image_root, data, tmp_path)
    assert rc == 0, capsys.readouterr().err
    assert (ssh_dir / "authorized_keys").read_text() == ssh_key + "\n"
    _assert_no_leak(image_root, host_secret)
    assert os.stat(host_secret).st_mode == host_dir_mode


def test_ssh_dir_link_to_a_host_dir_is_not_chmodded(
    image_root: Path, tmp_path: Path, host_secret: Path, ssh_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    os.chmod(host_secret, 0o755)
    (image_root / "home/bob").mkdir(parents=True)
    (image_root / "home/bob/.ssh").symlink_to(str(host_secret))
    data = _cc(f"users: [{{name: bob, ssh_authorized_keys: ['{ssh_key}']}}]\n")
    rc = apply_cli(image_root, data, tmp_path)
    assert rc == 0, capsys.readouterr().err
    st = os.stat(host_secret)
    assert (st.st_mode & 0o777, st.st_uid) == (0o755, os.getuid())
    assert not (host_secret / "authorized_keys").exists()
    _assert_no_leak(image_root, host_secret)


# -- system accounts -------------------------------------------------------------------------

SYSTEM_CASES = {
    "root-mapping": "users: [{name: root, sudo: 'ALL=(ALL) NOPASSWD:ALL'}]\n",
    "root-string": "users: [root]\n",
    "uid-zero": "users: [{name: toor, uid: 0}]\n",
    "uid-below-min": "users: [{name: svc, uid: 999}]\n",
    "system-flag": "users: [{name: svc, system: true}]\n",
    "existing-daemon": "users: [{name: daemon, sudo: 'ALL=(ALL) NOPASSWD:ALL'}]\n",
    "existing-nobody": "users: [{name: nobody}]\n",
    "root-into-group": "groups: [{adm: [root]}]\n",
    "daemon-into-sudo": "groups: [{sudo: [daemon]}]\n",
}


@pytest.mark.parametrize("case", sorted(SYSTEM_CASES))
def test_system_accounts_are_refused(
    case: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused(image_root, tmp_path, capsys, _cc(SYSTEM_CASES[case]), "system account")
    assert "allow_system_accounts" in line


def test_system_accounts_only_with_the_setting(
    image_root: Path, tmp_path: Path, ssh_key: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (image_root / "root").mkdir()
    data = _cc(f"users: [{{name: root, lock_passwd: false, ssh_authorized_keys: ['{ssh_key}']}}]\n")
    monkeypatch.setenv("GUESTAGENT_USERDATA_ALLOW_SYSTEM_ACCOUNTS", "true")
    rc = apply_cli(image_root, data, tmp_path)
    assert rc == 0, capsys.readouterr().err
    assert ssh_key in (image_root / "root/.ssh/authorized_keys").read_text()


def test_the_shell_form_refuses_root_too(ssh_key: str) -> None:
    with pytest.raises(UserdataError, match="system account"):
        render_template("sudo-account", {"user": "root", "ssh_keys": [ssh_key]}, "shell")


# -- errors are one line --------------------------------------------------------------------

LINE_CASES = {
    "newline-in-key": ('manage_resolv_conf: true\nresolv_conf: {"a\\nb": 1}\n', "a\\nb"),
    "line-separator-in-user": ('users: [{name: "bob\\u2028x"}]\n', "control character"),
    "nel-in-repo-name": ('yum_repos: {"r\\x85x": {baseurl: "http://x/"}}\n', "r\\x85x: control"),
    "escape-in-sudo": ('users: [{name: bob, sudo: "ALL\\e[2J"}]\n', "control character"),
    "cr-in-write-files-key": ('write_files: [{path: /x, "own\\rer": root}]\n', "own\\rer"),
}


@pytest.mark.parametrize("case", sorted(LINE_CASES))
def test_errors_are_one_line_with_control_characters_escaped(
    case: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body, why = LINE_CASES[case]
    _refused(image_root, tmp_path, capsys, _cc(body), why)


def test_a_mime_file_name_with_a_newline_stays_on_one_line(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (
        b'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n--XX\n'
        b"Content-Type: text/x-shellscript\n"
        b"Content-Disposition: attachment; filename*=utf-8''evil%0Aguestagent%3A%20ok\n\n"
        b"#!/bin/sh\nif then fi\n--XX--\n"
    )
    _refused(image_root, tmp_path, capsys, data, "evil\\nguestagent: ok")


# -- write_files owners are resolved in the plan --------------------------------------------

OWNER_CASES = {
    "no-such-user": ("write_files: [{path: /etc/x, content: x, owner: 'ghost:root'}]\n",
                     "no user 'ghost'"),
    "no-such-group": ("write_files: [{path: /etc/x, content: x, owner: 'root:ghosts'}]\n",
                      "no group 'ghosts'"),
    "created-but-not-deferred": (
        "users: [{name: app}]\nwrite_files: [{path: /home/app/x, content: x, owner: 'app:app'}]\n",
        "add 'defer: true'",
    ),
    "deferred-but-never-created": (
        "write_files: [{path: /etc/x, content: x, owner: 'app', defer: true}]\n",
        "no user 'app'",
    ),
}


@pytest.mark.parametrize("case", sorted(OWNER_CASES))
def test_write_files_owner_is_checked_before_anything_is_written(
    case: str, image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body, why = OWNER_CASES[case]
    _refused(image_root, tmp_path, capsys, _cc(body), why)


# -- offline image preparation never touches the network ------------------------------------


def test_apply_with_file_and_instance_id_never_asks_metadata(
    image_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    monkeypatch.setenv("GUESTAGENT_METADATA_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    ud = tmp_path / "ud"
    ud.write_bytes(_cc("ntp: {servers: [ntp1.aliyun.com]}\n"))
    try:
        rc = main(["userdata", "apply", "--root", str(image_root), "--file", str(ud),
                   "--instance-id", "i-offline"])
        assert rc == 0, capsys.readouterr().err
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert "ntp1.aliyun.com" in (image_root / "etc/chrony/chrony.conf").read_text()
    assert not (image_root / "etc/resolv.conf").exists()
