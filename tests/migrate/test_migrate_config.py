"""user_config.json: every rule of the guide's tables refused with one line naming the field,
before anything is contacted or written; pre-checks of `migrate check` with their keywords."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mig_tree import KVER, build_tree, user_config, write

from guestagent.migrate import prechecks, userconfig
from guestagent.migrate.errors import ConfigInvalid

GOOD = {
    "access_id": "LTAI5tMigrateTest01", "secret_key": "s3cr3t-Migrate-Key-0001",
    "region_id": "cn-hangzhou", "image_name": "CLIENT_IMAGE_DEBIAN12_01",
    "system_disk_size": 40, "platform": "Debian", "architecture": "x86_64",
    "data_disks": [], "bandwidth_limit": 0,
}
DISK = {"data_disk_index": 1, "data_disk_size": 5, "src_path": "/mnt/disk1"}

# (what is wrong, the change, a fragment the one line must carry)
CORPUS = [
    ("missing access_id", {"access_id": None}, "access_id: required field missing"),
    ("empty secret", {"secret_key": ""}, "secret_key: empty"),
    ("secret with spaces", {"secret_key": "a b"}, "secret_key: must be"),
    ("secret with escape", {"secret_key": "abc\x1b[2Jdef"}, "secret_key: must be"),
    ("access_id wrong type", {"access_id": 12345}, "access_id: must be a string"),
    ("bad region", {"region_id": "Hangzhou"}, "region_id: 'Hangzhou' is not a region ID"),
    ("empty region", {"region_id": ""}, "region_id: empty"),
    ("image name too short", {"image_name": "a"}, "image_name: must be 2 to 128"),
    ("image name too long", {"image_name": "a" * 129}, "image_name: must be 2 to 128"),
    ("image name digit first", {"image_name": "1abc"}, "image_name: must start with a letter"),
    ("image name bad char", {"image_name": "my image"}, "image_name: may hold only"),
    ("image name url", {"image_name": "http://x"}, "image_name: must not start with http://"),
    ("image name https", {"image_name": "https://img"}, "must not start with http"),
    ("system disk small", {"system_disk_size": 39}, "system_disk_size: must be 40 to 500"),
    ("system disk big", {"system_disk_size": 501}, "system_disk_size: must be 40 to 500"),
    ("system disk float", {"system_disk_size": 40.5}, "system_disk_size: must be an integer"),
    ("system disk string", {"system_disk_size": "40"}, "system_disk_size: must be an integer"),
    ("system disk bool", {"system_disk_size": True}, "system_disk_size: must be an integer"),
    ("platform case", {"platform": "centos"}, "did you mean 'CentOS'?"),
    ("platform unknown", {"platform": "Arch"}, "platform: 'Arch' is not one of"),
    ("architecture", {"architecture": "arm64"}, "architecture: 'arm64' must be i386 or x86_64"),
    ("bandwidth negative", {"bandwidth_limit": -1}, "bandwidth_limit: must be >= 0"),
    ("unknown field", {"secret": "x"}, "secret: unknown field"),
    ("data_disks not a list", {"data_disks": {}}, "data_disks: must be a list"),
    ("too many disks", {"data_disks": [dict(DISK, data_disk_index=i % 16 + 1) for i in range(17)]},
     "data_disks: at most 16"),
    ("disk index 0", {"data_disks": [dict(DISK, data_disk_index=0)]},
     "data_disks[0].data_disk_index: must be 1 to 16"),
    ("disk index 17", {"data_disks": [dict(DISK, data_disk_index=17)]}, "must be 1 to 16"),
    ("disk size 4", {"data_disks": [dict(DISK, data_disk_size=4)]},
     "data_disks[0].data_disk_size: must be 5 to 2000"),
    ("disk size 2001", {"data_disks": [dict(DISK, data_disk_size=2001)]}, "must be 5 to 2000"),
    ("disk unknown field", {"data_disks": [dict(DISK, mount="/x")]},
     "data_disks[0].mount: unknown field"),
    ("disk missing path", {"data_disks": [{"data_disk_index": 1, "data_disk_size": 5}]},
     "data_disks[0].src_path: required field missing"),
    ("disk windows letter", {"data_disks": [dict(DISK, src_path="D:")]},
     "data_disks[0].src_path: 'D:' must be an absolute path"),
    ("disk relative", {"data_disks": [dict(DISK, src_path="mnt/disk2")]}, "must be an absolute"),
    ("disk not there", {"data_disks": [dict(DISK, src_path="/data9")]},
     "data_disks[0].src_path: /data9 does not exist"),
    ("disk not a mount", {"data_disks": [dict(DISK, src_path="/srv")]},
     "data_disks[0].src_path: /srv is not a mount point"),
    ("disk is /", {"data_disks": [dict(DISK, src_path="/")]}, "/ is the system disk"),
    ("disk path NUL", {"data_disks": [dict(DISK, src_path="/mnt\x00x")]},
     "data_disks[0].src_path: '/mnt\\x00x' contains a control character"),
    ("disk path too long", {"data_disks": [dict(DISK, src_path="/" + "a" * 5000)]},
     "File name too long"),  # was an OSError traceback
    ("disk twice", {"data_disks": [DISK, dict(DISK, src_path="/srv")]},
     "data_disks[1].data_disk_index: 1 is used twice"),
]


JSON_ERRORS = [
    ('{\n  "access_id": "x",\n  "secret_key": "y"\n  "region_id": "cn-hangzhou"\n}',
     "line 4 column 3"),
    ('{\n  "access_id": "x",\n}\n', "line 3 column 1"),
    ('{"access_id": "x", "access_id": "y"}', "field 'access_id' appears twice"),
    ("[]", "must be a JSON object"),
    ("", "line 1 column 1"),
    ("[" * 100_000, "invalid JSON: nested too deeply"),  # json recurses per level
    ('{"bandwidth_limit": ' + "9" * 5000 + "}", "invalid JSON: a number has too many digits"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tree(tmp_path_factory.mktemp("server") / "root", big="sparse")


def _write(tmp_path: Path, change: dict[str, object]) -> Path:
    tmp_path = tmp_path / "migration"
    tmp_path.mkdir(exist_ok=True)
    data = dict(GOOD)
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "user_config.json"
    path.write_text(json.dumps(data, indent=2))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(("what", "change", "fragment"), CORPUS, ids=[c[0] for c in CORPUS])
def test_each_rule_is_one_line_naming_the_field(tree: Path, tmp_path: Path, what: str,
                                                 change: dict[str, object],
                                                 fragment: str) -> None:
    path = _write(tmp_path, change)
    with pytest.raises(ConfigInvalid) as err:
        userconfig.load(path, tree, prechecks.used_space)
    assert any(fragment in line for line in err.value.problems), err.value.problems
    assert all("\n" not in line for line in err.value.problems)
    assert GOOD["secret_key"] not in " ".join(err.value.problems)


def test_all_violations_reported_at_once(tree: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, {"image_name": "1", "system_disk_size": 7, "platform": "debian"})
    with pytest.raises(ConfigInvalid) as err:
        userconfig.load(path, tree)
    fields = sorted(line.split(":", 1)[0] for line in err.value.problems)
    assert fields == ["image_name", "platform", "system_disk_size"]


@pytest.mark.parametrize(("text", "where"), JSON_ERRORS, ids=lambda v: repr(v)[:24])
def test_json_errors_name_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "user_config.json"
    path.write_text(text)
    with pytest.raises(ConfigInvalid) as err:
        userconfig.load(path)
    assert len(err.value.problems) == 1 and where in err.value.problems[0]


def test_guide_template_and_scenario_accepted(tree: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, {"platform": "", "architecture": ""})
    config = userconfig.load(path, tree, prechecks.used_space)
    assert config.platform is None and config.bandwidth_limit == 0
    assert GOOD["secret_key"] not in repr(config)


def test_disk_sizes_must_exceed_used_space(tree: Path, tmp_path: Path) -> None:
    mnt = tree / "mnt/disk1"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "migcfg", str(mnt)], check=True)
    try:
        write(mnt / "fill", os.urandom(2 * 1024**2))
        path = _write(tmp_path, {"data_disks": [DISK]})
        config = userconfig.load(path, tree, lambda p, skip: 6 * 1024**3 if p == mnt else 0)
        pytest.fail(f"accepted {config}")
    except ConfigInvalid as err:
        assert err.problems == ["data_disks[0].data_disk_size: must be larger than the space "
                                "used on /mnt/disk1 (6.0 GB), got 5"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    with pytest.raises(ConfigInvalid, match="problem"):
        userconfig.load(_write(tmp_path, {}), tree, lambda p, skip: 41 * 1024**3)


def test_world_readable_config_warns(tree: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    path.chmod(0o644)
    warning = userconfig.warn_if_readable(path)
    assert warning and "chmod 600" in warning and GOOD["secret_key"] not in warning


@pytest.fixture
def listener() -> Iterator[tuple[str, list[object]]]:
    """A TCP port that records every connection: nothing may knock on it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    hits: list[object] = []

    def accept() -> None:
        while True:
            try:
                conn, addr = srv.accept()
            except OSError:
                return
            hits.append(addr)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", hits
    srv.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guestagent", "migrate", *args],
                          capture_output=True, text=True, timeout=120, env=env, check=False)


def _refused(cli: str, path: Path, tree: Path, url: str) -> str:
    out = _cli(cli, "--config", str(path), "--root", str(tree),
               env={**os.environ, "GUESTAGENT_MIGRATE_ENDPOINT": url,
                    "GUESTAGENT_DAEMON_STATE_DIR": str(path.parent / "state")})
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stderr


def test_run_and_start_refuse_every_bad_config_before_contacting_anything(
        tree: Path, tmp_path: Path, listener: tuple[str, list[object]]) -> None:
    """The whole corpus and the JSON errors through the command a user types: one line per
    problem, exit 2, no connection, nothing written beside the config, no job queued."""
    url, hits = listener
    cases = []
    for what, change, fragment in CORPUS:
        (tmp_path / what).mkdir()
        cases.append((what, _write(tmp_path / what, change), fragment))
    for n, (text, where) in enumerate(JSON_ERRORS):
        path = tmp_path / f"json{n}" / "user_config.json"
        path.parent.mkdir()
        path.write_text(text)
        path.chmod(0o600)
        cases.append((f"json {n}", path, where))
    for what, path, fragment in cases:
        for cli in ("run", "start") if what in ("missing access_id", "json 0") else ("run",):
            err = _refused(cli, path, tree, url)
            assert fragment in err, (what, cli, err)
            assert all(ln.startswith("guestagent: ") for ln in err.splitlines()), err
            assert GOOD["secret_key"] not in err
            assert sorted(p.name for p in path.parent.iterdir()) == ["user_config.json"], what
    assert hits == []


def test_check_passes_on_a_good_server_and_contacts_nothing(
        tree: Path, tmp_path: Path, listener: tuple[str, list[object]]) -> None:
    url, hits = listener
    path = user_config(tmp_path)
    out = _cli("check", "--config", str(path), "--root", str(tree),
               env={**os.environ, "GUESTAGENT_MIGRATE_ENDPOINT": url})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "virtio drivers present for kernel 6.1.0-13-amd64" in out.stdout
    assert "check: passed (nothing was contacted)" in out.stdout
    assert hits == []


@pytest.mark.parametrize(("breakage", "keyword", "advice"), [
    ("selinux", "check selinux failed", "SELINUX=disabled"),
    ("virtio", "check virtio failed", "virtio_blk"),
    ("rsync", "check rsync failed", "apt-get install rsync"),
    ("grub", "GRUB older than 1.9", "update GRUB"),
    ("root", "root:", "run `guestagent migrate` as root"),
])
def test_check_names_keyword_and_advice(tmp_path: Path, breakage: str, keyword: str,
                                        advice: str) -> None:
    if breakage == "root":  # somewhere an unprivileged user can reach
        tmp_path = Path(tempfile.mkdtemp(prefix="migcheck-"))
        tmp_path.chmod(0o755)
    tree = build_tree(tmp_path / "root", big="none")
    env = dict(os.environ)
    argv = [sys.executable, "-m", "guestagent", "migrate", "check"]
    if breakage == "selinux":
        write(tree / "etc/selinux/config", "SELINUX=enforcing\n")
    elif breakage == "virtio":
        (tree / f"boot/initrd.img-{KVER}").unlink()
    elif breakage == "rsync":
        env["PATH"] = str(tmp_path / "empty-bin")
    elif breakage == "grub":
        (tree / "boot/grub/grub.cfg").unlink()
        write(tree / "boot/grub/menu.lst", "title old\nkernel /vmlinuz root=/dev/sda1\n")
    elif breakage == "root":
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    cfg_dir = tmp_path / "cfg"
    path = user_config(cfg_dir)
    if breakage == "root":
        os.chown(cfg_dir, 65534, 65534)
        os.chown(path, 65534, 65534)
    out = subprocess.run([*argv, "--config", str(path), "--root", str(tree)],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert keyword in out.stdout, out.stdout + out.stderr
    assert advice in out.stdout
    fatal = breakage != "grub"
    assert out.returncode == (1 if fatal else 0), out.stdout + out.stderr


def test_check_free_space_beside_the_config(tmp_path: Path) -> None:
    """client_data and Logs/ live beside user_config.json: too little room there is a
    failed pre-check with what to do."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    tree = build_tree(tmp_path / "root", big="none")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "migfree", str(cfg_dir)],
                   check=True)
    try:
        path = user_config(cfg_dir)
        out = _cli("check", "--config", str(path), "--root", str(tree))
    finally:
        subprocess.run(["umount", str(cfg_dir)], check=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "free space: only" in out.stdout and "MB needed" in out.stdout
    assert "free some space beside user_config.json" in out.stdout
