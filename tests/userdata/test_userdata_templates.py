"""Templates render to valid #cloud-config (cloud-init's own schema) and valid #!/bin/sh,
and refuse parameters that would inject anything."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml
from ud_cases import template_cases

from guestagent.userdata import cloudconfig, shell, templates
from guestagent.userdata.cli import render_template
from guestagent.userdata.errors import UserdataError

CASES = list(template_cases("").keys())


@pytest.fixture
def cases(ssh_key: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return template_cases(ssh_key)


def test_all_four_templates_are_found() -> None:
    assert templates.names() == ["dns", "ntp", "repo", "sudo-account"]
    for name in templates.names():
        tpl = templates.load(name)
        assert tpl.description and all(p.help for p in tpl.params.values())


@pytest.mark.parametrize("case", CASES)
def test_cloud_config_passes_cloud_init_schema(case: str, cases: Any) -> None:
    if shutil.which("cloud-init") is None:
        pytest.skip("cloud-init not installed (apt-get install cloud-init)")
    name, params = cases[case]
    text = render_template(name, params, "cloud-config")
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text)
    assert cloudconfig.schema_errors(text) == []


@pytest.mark.parametrize("case", CASES)
def test_shell_form_is_valid_sh(case: str, cases: Any) -> None:
    name, params = cases[case]
    text = render_template(name, params, "shell")
    assert text.startswith("#!/bin/sh\n")
    res = subprocess.run(["sh", "-n"], input=text.encode(), capture_output=True)
    assert res.returncode == 0, res.stderr


def test_cli_params_from_strings(ssh_key: str, tmp_path: Any) -> None:
    keyfile = tmp_path / "id.pub"
    keyfile.write_text(ssh_key + "\n")
    tpl = templates.load("sudo-account")
    values = templates.parse_params(
        tpl, ["user=ops", "groups=wheel,adm", f"ssh_keys=@{keyfile}", "nopasswd=no"]
    )
    doc = templates.render(tpl, values)
    user = doc["users"][0]
    assert user["ssh_authorized_keys"] == [ssh_key]
    assert user["sudo"] == "ALL=(ALL) ALL"
    assert doc["groups"] == ["wheel", "adm"]
    assert "disable_root" not in doc


def test_apt_disabled_and_unsigned_variants() -> None:
    tpl = templates.load("repo")
    base = {"kind": "apt", "id": "r", "baseurl": "https://deb.example.com/debian"}
    off = templates.render(tpl, {**base, "enabled": False})
    assert off["apt"]["sources"]["r"]["source"].startswith("# deb ")
    trusted = templates.render(tpl, {**base, "gpgcheck": False})
    assert "[trusted=yes]" in trusted["apt"]["sources"]["r"]["source"]
    with pytest.raises(UserdataError, match="file:///"):
        templates.render(tpl, {**base, "gpgkey": "https://example.com/key.gpg"})


@pytest.mark.parametrize(
    ("name", "params", "why"),
    [
        ("dns", {"nameservers": ["1.1.1.1\nnameserver 6.6.6.6"]}, "control character"),
        ("dns", {"nameservers": ["1.1.1.1; reboot"]}, "not an IP address"),
        ("dns", {"nameservers": ["1.1.1.1"], "search": ["a.com b.com"]}, "not a valid host name"),
        ("dns", {"nameservers": ["1.1.1.1"], "options": ["rotate\noptions debug"]}, "control"),
        ("ntp", {"servers": ["$(reboot)"]}, "not a valid host name"),
        ("ntp", {"servers": ["ntp.example.com"], "client": "systemd"}, "one of"),
        ("repo", {"kind": "yum", "id": "x", "baseurl": "http://x/\n[evil]"}, "control"),
        ("repo", {"kind": "yum", "id": "x", "baseurl": "http://x/';reboot;'"}, "not allowed"),
        (
            "repo",
            {"kind": "yum", "id": "../../etc/passwd", "baseurl": "http://x/"},
            "repository id",
        ),
        ("repo", {"kind": "apt", "id": "x", "baseurl": "http://x/", "suite": "a b"}, "valid word"),
        ("repo", {"kind": "zypper", "id": "x", "baseurl": "http://x/"}, "one of"),
        ("sudo-account", {"user": "bob;id", "ssh_keys": ["KEY"]}, "user/group name"),
        ("sudo-account", {"user": "root\n", "ssh_keys": ["KEY"]}, "control"),
        ("sudo-account", {"user": "bob", "ssh_keys": ["ssh-rsa AAAAnotakey x"]}, "does not parse"),
        ("sudo-account", {"user": "bob", "ssh_keys": ["hello"]}, "not an OpenSSH public key"),
        ("sudo-account", {"user": "bob"}, "required"),
        (
            "sudo-account",
            {"user": "bob", "ssh_keys": ["KEY"], "shell": "/bin/sh -c id"},
            "absolute path",
        ),
        ("dns", {"nameservers": ["1.1.1.1"], "bogus": "1"}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_refused(
    name: str, params: dict[str, Any], why: str, ssh_key: str
) -> None:
    if params.get("ssh_keys") == ["KEY"]:
        params = {**params, "ssh_keys": [ssh_key]}
    with pytest.raises(UserdataError, match=why):
        render_template(name, params, "cloud-config")


def test_shell_quotes_everything(ssh_key: str) -> None:
    doc = templates.render(
        templates.load("sudo-account"),
        {"user": "ops", "ssh_keys": [ssh_key.replace("builder@example", "it's me")]},
    )
    text = shell.render(doc)
    assert "it'\"'\"'s me'" in text  # the comment survives, quoted
