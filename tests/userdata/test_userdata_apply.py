"""First-boot apply into an image tree with the real tools: every template in both forms,
idempotence, per-instance semaphores, dry run, and a handler failing half-way."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from ud_cases import snapshot, template_cases

from guestagent.userdata.apply import Applier, Defaults
from guestagent.userdata.cli import combine, render_template
from guestagent.userdata.settings import UserdataSettings

CASES = list(template_cases("").keys())


def _apply(
    root: Path, data: bytes | None, settings: UserdataSettings, iid: str = "i-first", **kw: Any
) -> Any:
    return Applier(settings, root=root, **kw).apply(data, iid)


def _check(case: str, root: Path, key: str) -> None:
    """The files each template is meant to produce."""
    etc = root / "etc"
    if case == "dns":
        text = (etc / "resolv.conf").read_text()
        assert "nameserver 100.100.2.136\nnameserver 100.100.2.138\n" in text
        assert "search example.internal\n" in text and "options rotate timeout:2\n" in text
    elif case == "ntp":
        text = (etc / "chrony/chrony.conf").read_text()
        assert "#guestagent# pool 2.debian.pool.ntp.org iburst" in text
        assert "server ntp1.aliyun.com iburst\nserver ntp2.aliyun.com iburst\n" in text
        assert "driftfile /var/lib/chrony/chrony.drift" in text
        backup = root / "var/lib/guestagent/userdata/backup/etc/chrony/chrony.conf"
        assert backup.read_text().startswith("pool 2.debian")
        assert not list(etc.rglob("*.guestagent.bak"))
    elif case == "repo-yum":
        text = (etc / "yum.repos.d/myrepo.repo").read_text()
        assert (
            "[myrepo]\nname=my repo\nbaseurl=http://mirrors.cloud.aliyuncs.com/centos/7/os/x86_64/\n"
            in text
        )
        assert "enabled=1\ngpgcheck=0\n" in text
    elif case == "repo-apt":
        text = (etc / "apt/sources.list.d/myrepo.list").read_text()
        assert (
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            "http://mirrors.cloud.aliyuncs.com/debian bookworm main\n"
        ) in text
    elif case == "sudo-account":
        passwd = (etc / "passwd").read_text().splitlines()
        entry = next(line for line in passwd if line.startswith("ops:")).split(":")
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
        assert home == "/home/ops" and entry[6] == "/bin/bash"
        groups = {
            line.split(":")[0]: line.split(":")[3]
            for line in (etc / "group").read_text().splitlines()
        }
        assert "ops" in groups["wheel"].split(",") and "ops" in groups["adm"].split(",")
        shadow = next(
            line for line in (etc / "shadow").read_text().splitlines() if line.startswith("ops:")
        )
        assert shadow.split(":")[1].startswith("!")  # no password: keys only
        keys = root / "home/ops/.ssh/authorized_keys"
        assert keys.read_text() == key + "\n"
        st = keys.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (uid, gid)
        assert stat.S_IMODE((root / "home/ops/.ssh").stat().st_mode) == 0o700
        rules = etc / "sudoers.d/90-guestagent-users"
        assert "ops ALL=(ALL) NOPASSWD:ALL\n" in rules.read_text()
        assert stat.S_IMODE(rules.stat().st_mode) == 0o440
        # Debian's sshd_config includes sshd_config.d: a drop-in, the main file as it was.
        assert (etc / "ssh/sshd_config").read_text().startswith("Include /etc/ssh/sshd_config.d")
        assert "PermitRootLogin no" not in (etc / "ssh/sshd_config").read_text()
        dropin = (etc / "ssh/sshd_config.d/01-guestagent.conf").read_text().splitlines()
        assert dropin[1:] == ["PermitRootLogin no", "PasswordAuthentication no"]
    else:  # pragma: no cover
        raise AssertionError(case)


@pytest.mark.parametrize("fmt", ["cloud-config", "shell"])
@pytest.mark.parametrize("case", CASES)
def test_every_template_applies(
    case: str, fmt: str, image_root: Path, ssh_key: str, settings: UserdataSettings
) -> None:
    name, params = template_cases(ssh_key)[case]
    data = render_template(name, params, fmt).encode()
    report = _apply(image_root, data, settings)
    assert not report.failed, report.outcomes
    _check(case, image_root, ssh_key)


def test_both_forms_make_the_same_tree(
    image_root: Path, ssh_key: str, settings: UserdataSettings, tmp_path: Path
) -> None:
    import subprocess

    other = tmp_path / "other"
    subprocess.run(["cp", "-a", str(image_root), str(other)], check=True, timeout=120)
    cases = template_cases(ssh_key)
    for root, fmt in ((image_root, "cloud-config"), (other, "shell")):
        items = [(c, render_template(*cases[c], fmt).encode()) for c in CASES if c != "repo-yum"]
        report = _apply(root, combine(items), settings)
        assert not report.failed, report.outcomes

    def strip(snap: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in snap.items() if not k.startswith("var/lib/guestagent")}

    assert strip(snapshot(image_root)) == strip(snapshot(other))


def test_second_apply_changes_nothing_and_new_instance_reapplies(
    image_root: Path, ssh_key: str, settings: UserdataSettings
) -> None:
    cases = template_cases(ssh_key)
    items = [
        (c, render_template(*cases[c], "cloud-config").encode()) for c in CASES if c != "repo-apt"
    ]
    items.append(("hello.sh", b'#!/bin/sh\necho run >> "$GUESTAGENT_ROOT/runs"\n'))
    data = combine(items)
    first = _apply(image_root, data, settings, "i-one")
    assert {o.status for o in first.outcomes} == {"applied"}
    before = snapshot(image_root, times=True)
    second = _apply(image_root, data, settings, "i-one")
    assert {o.status for o in second.outcomes} == {"skipped"}
    after = snapshot(image_root, times=True)
    changed = {
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k)
        and not k.endswith(("last-run.json", "stage-all.json", "apply.lock"))
    }
    assert changed == set()
    assert (image_root / "runs").read_text() == "run\n"

    # A new instance from the same image: everything applies again, files already right.
    third = _apply(image_root, data, settings, "i-two")
    assert {o.name: o.status for o in third.outcomes if o.kind == "handler"} == {
        "dns": "unchanged",
        "ntp": "unchanged",
        "repos": "unchanged",
        "accounts": "unchanged",
        "sshd": "unchanged",
    }
    assert (image_root / "runs").read_text() == "run\nrun\n"
    passwd = (image_root / "etc/passwd").read_text()
    assert passwd.count("\nops:") == 1


def test_frequencies_once_and_always(image_root: Path, settings: UserdataSettings) -> None:
    data = b'#cloud-config\nruncmd:\n - echo x >> "$GUESTAGENT_ROOT/count"\n'
    always = UserdataSettings(frequencies=["runcmd=always"])
    for iid in ("i-a", "i-a"):
        _apply(image_root, data, always, iid)
    assert (image_root / "count").read_text() == "x\nx\n"
    once = UserdataSettings(frequencies=["runcmd=once"])
    for iid in ("i-b", "i-c"):
        _apply(image_root, data, once, iid)
    assert (image_root / "count").read_text() == "x\nx\nx\n"


def test_dry_run_prints_diff_and_changes_nothing(
    image_root: Path, ssh_key: str, settings: UserdataSettings
) -> None:
    cases = template_cases(ssh_key)
    data = combine(
        [(c, render_template(*cases[c], "cloud-config").encode()) for c in ("dns", "sudo-account")]
    )
    before = snapshot(image_root, times=True)
    report = _apply(image_root, data, settings, dry_run=True)
    assert snapshot(image_root, times=True) == before
    assert "+nameserver 100.100.2.136" in report.diff
    assert "+ops:x:" in report.diff and "/etc/sudoers.d/90-guestagent-users" in report.diff
    assert "+PasswordAuthentication no" in report.diff


def test_failing_handler_leaves_its_files_as_they_were(image_root: Path) -> None:
    # groupadd succeeds, then useradd fails (uid 1 is taken): the new group must go again.
    settings = UserdataSettings(script_timeout=30, allow_system_accounts=True)
    data = (
        b"#cloud-config\nmanage_resolv_conf: true\nresolv_conf: {nameservers: [10.0.0.2]}\n"
        b"users:\n - name: clash\n   groups: [newgrp]\n   uid: 1\n"
    )
    accounts = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")
    before = {
        k: v for k, v in snapshot(image_root).items() if k in accounts or k.startswith("home")
    }
    report = _apply(image_root, data, settings)
    status = {o.name: o.status for o in report.outcomes}
    assert status == {"dns": "applied", "accounts": "failed"}
    assert "useradd" in report.failed[0].detail
    after = {k: v for k, v in snapshot(image_root).items() if k in accounts or k.startswith("home")}
    assert after == before
    assert (
        not (image_root / "etc/group-").exists()
        or "newgrp" not in (image_root / "etc/group").read_text()
    )
    # Not marked: the next boot tries again.
    assert not (image_root / "var/lib/guestagent/userdata/sem/instance-i-first/accounts").exists()


def test_write_files_and_runcmd(image_root: Path, settings: UserdataSettings) -> None:
    import base64
    import gzip

    blob = base64.b64encode(gzip.compress(b"compressed\n")).decode()
    data = (
        "#cloud-config\nusers: [{name: app}]\nwrite_files:\n"
        " - {path: /etc/motd, content: \"hello\\n\", permissions: '0640'}\n"
        f" - {{path: /opt/app/blob, content: {blob}, encoding: gz+b64}}\n"
        " - {path: /home/app/conf, content: \"x\\n\", owner: 'app:app', defer: true}\n"
        'runcmd:\n - [sh, -c, \'cat "$GUESTAGENT_ROOT/etc/motd" > "$GUESTAGENT_ROOT/ran"\']\n'
    ).encode()
    report = _apply(image_root, data, settings)
    assert not report.failed, report.outcomes
    assert (image_root / "etc/motd").read_text() == "hello\n"
    assert stat.S_IMODE((image_root / "etc/motd").stat().st_mode) == 0o640
    assert (image_root / "opt/app/blob").read_bytes() == b"compressed\n"
    conf = (image_root / "home/app/conf").stat()
    assert conf.st_uid != 0
    assert (image_root / "ran").read_text() == "hello\n"


def test_script_exit_code_and_timeout_are_recorded(image_root: Path) -> None:
    fast = UserdataSettings(script_timeout=0.5)
    data = combine(
        [
            ("bad.sh", b"#!/bin/sh\nexit 7\n"),
            ("slow.sh", b"#!/bin/sh\nsleep 30\n"),
            ("ok.sh", b"#!/bin/sh\ntrue\n"),
        ]
    )
    report = _apply(image_root, data, fast)
    got = {o.name: (o.status, o.exit_code) for o in report.outcomes}
    assert got == {"bad.sh": ("failed", 7), "slow.sh": ("failed", -9), "ok.sh": ("applied", 0)}
    assert "exited 7" in (image_root / "var/lib/guestagent/userdata/last-run.json").read_text()


def test_metadata_defaults_when_user_data_is_silent(
    image_root: Path, settings: UserdataSettings
) -> None:
    defaults = Defaults(
        nameservers=("100.100.2.136",),
        ntp_servers=("ntp.cloud.aliyuncs.com",),
        mirrors=("http://mirrors.cloud.aliyuncs.com",),
    )
    with_mirror = UserdataSettings(default_mirror=True)
    data = b"#cloud-config\nntp: {servers: [time.example.com]}\n"
    Applier(with_mirror, root=image_root).apply(data, "i-d", defaults)
    assert "nameserver 100.100.2.136" in (image_root / "etc/resolv.conf").read_text()
    chrony = (image_root / "etc/chrony/chrony.conf").read_text()
    assert "time.example.com" in chrony and "ntp.cloud.aliyuncs.com" not in chrony
    mirror = (image_root / "etc/apt/sources.list.d/guestagent-mirror.list").read_text()
    assert "deb http://mirrors.cloud.aliyuncs.com/debian/ bookworm main" in mirror
    off = UserdataSettings(default_dns=False, default_ntp=False)
    root2 = image_root
    (root2 / "etc/resolv.conf").unlink()
    Applier(off, root=root2).apply(None, "i-e", defaults)
    assert not (root2 / "etc/resolv.conf").exists()


def test_cloud_config_left_to_an_enabled_cloud_init(
    image_root: Path, settings: UserdataSettings
) -> None:
    (image_root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (image_root / "usr/bin/cloud-init").write_text("#!/bin/sh\n")
    wants = image_root / "etc/systemd/system/cloud-init.target.wants"
    wants.mkdir(parents=True)
    (wants / "cloud-init.service").symlink_to("/lib/systemd/system/cloud-init.service")
    data = b"#cloud-config\nmanage_resolv_conf: true\nresolv_conf: {nameservers: [10.0.0.2]}\n"
    report = _apply(image_root, data, settings)
    assert [o.status for o in report.outcomes] == ["deferred"]
    assert not (image_root / "etc/resolv.conf").exists()
    (image_root / "etc/cloud").mkdir()
    (image_root / "etc/cloud/cloud-init.disabled").touch()
    report = _apply(image_root, data, settings, "i-other")
    assert [o.status for o in report.outcomes] == ["applied"]
