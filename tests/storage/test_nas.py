"""NAS entries: the plan (options, units, fstab, mount command) checked by systemd itself,
and the preflight against a real NFS server (nfs-ganesha on loopback, reached with libnfs).
This machine's kernel has no NFS client, so nothing is mounted here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import PurePosixPath

import pytest

from guestagent.storage import nas
from guestagent.storage.errors import StorageError
from guestagent.storage.mappings import MountEntry, NasSource, parse_mount_entries

SOURCE = "nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/share/"
V3 = ("vers=3,nolock,proto=tcp,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,"
      "noresvport")
V4 = "vers=4,minorversion=0,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"


def entry(write: bool = True, dest: str = "/home/admin/nas data/") -> MountEntry:
    (e,) = parse_mount_entries({"Entries": [{"Source": SOURCE, "Destination": dest,
                                             "WriteSupport": write}]})
    return e


def test_nfsv3_plan_has_alibabas_options_and_a_mount_command():
    p = nas.plan(entry())
    assert ",".join(p.options) == V3 + ",_netdev"
    assert p.mount_argv() == ["mount", "-t", "nfs", "-o", V3,
                              "0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/share/",
                              "/home/admin/nas data"]
    assert p.fstab_line() == ("0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/share/ "
                              "/home/admin/nas\\040data nfs " + V3 + ",_netdev 0 0")


def test_nfsv4_read_only_with_locks_and_automount():
    p = nas.plan(entry(write=False), version="4.0", lock=True, automount=True)
    assert ",".join(p.options) == V4 + ",ro,_netdev"
    assert p.fstab_line().endswith(V4 + ",ro,_netdev,x-systemd.automount 0 0")
    assert set(p.units) == {r"home-admin-nas\x20data.mount", r"home-admin-nas\x20data.automount"}
    assert p.start_unit == r"home-admin-nas\x20data.automount"


def test_lock_true_drops_nolock_on_v3():
    assert "nolock" not in nas.options("3", lock=True)
    assert "nolock" in nas.options("3", lock=False)


@pytest.mark.parametrize("where", ["/home/admin/nas data", "/mnt/a-b/c.d", "/srv/_x:y", "/mnt/ü"])
def test_unit_names_match_systemd_escape(where):
    out = subprocess.run(["systemd-escape", "-p", "--suffix=mount", where], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert nas.unit_name(PurePosixPath(where)) == out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze")
@pytest.mark.parametrize("automount", [False, True])
def test_systemd_accepts_the_units(tmp_path, automount):
    p = nas.plan(entry(dest="/mnt/nas/"), automount=automount)
    written = nas.install(p, unit_dir=tmp_path, start=False)
    assert sorted(w.name for w in written) == sorted(p.units)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, written)],
                            capture_output=True, text=True, timeout=120)
    # verify may warn about the machine (no network-online provider); never about our units.
    bad = [line for line in result.stderr.splitlines()
           if "mnt-nas" in line and ("nknown" in line or "rror" in line or "nvalid" in line)]
    assert not bad, result.stderr
    text = (tmp_path / "mnt-nas.mount").read_text()
    assert "What=0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/share/\n" in text
    assert "Where=/mnt/nas\n" in text and "Options=" + V3 + ",_netdev\n" in text
    assert ("WantedBy=remote-fs.target" in text) is not automount


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze")
@pytest.mark.parametrize("automount", [False, True])
def test_a_percent_sign_is_not_a_systemd_specifier(tmp_path, automount):
    # Unescaped, systemd reads Where=/mnt/50%b as /mnt/50<boot id> and refuses the unit.
    (e,) = parse_mount_entries({"Entries": [{"Source": SOURCE + "100%real/",
                                             "Destination": "/mnt/50%b"}]})
    p = nas.plan(e, automount=automount)
    written = nas.install(p, unit_dir=tmp_path, start=False)
    result = subprocess.run(["systemd-analyze", "verify", *map(str, written)],
                            capture_output=True, text=True, timeout=120)
    bad = [line for line in result.stderr.splitlines() if "mnt-50" in line]
    assert not bad, result.stderr
    text = (tmp_path / p.unit_name).read_text()
    assert "Where=/mnt/50%%b\n" in text and "/share/100%%real/\n" in text


def test_plan_cli_prints_the_units(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "guestagent", "storage", "nas", "plan", SOURCE,
                          "/mnt/nas", "--version", "4.0"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Options=" + V4 + ",_netdev" in out.stdout
    assert "mount -t nfs -o " + V4 in out.stdout


def test_mount_without_a_kernel_nfs_client_says_so(tmp_path):
    if nas.kernel_has_nfs():
        pytest.skip("this kernel has an NFS client")
    with pytest.raises(StorageError, match="this kernel has no NFS client"):
        nas.install(nas.plan(entry(dest="/mnt/nas/")), unit_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "agent.toml"]


# -- preflight against ganesha -------------------------------------------------------------

def test_preflight_passes_against_a_real_export(ganesha):
    src = NasSource("127.0.0.1", f"{ganesha.export_dir}/")
    steps = nas.preflight(src, port=ganesha.nfs_port, mount_port=ganesha.mount_port)
    assert [(s.name, s.ok) for s in steps] == [("resolve", True), ("connect", True),
                                               ("export", True)]
    nas.check_preflight(steps, src)


def test_the_export_is_readable_with_libnfs(ganesha):
    out = subprocess.run(["nfs-cat", f"nfs://127.0.0.1{ganesha.export_dir}/hello.txt?nfsport="
                          f"{ganesha.nfs_port}&mountport={ganesha.mount_port}"],
                         capture_output=True, timeout=60)
    assert out.stdout == b"hello from NAS\n", out.stderr


def hosts_only(host, port, **kw):
    import socket

    if host not in ("127.0.0.1", "localhost"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return socket.getaddrinfo(host, port, **kw)


@pytest.mark.parametrize(("source", "port", "step"), [
    (NasSource("no-such-host.invalid", "/anything/"), None, "resolve"),
    (NasSource("127.0.0.1", "/anything/"), "closed", "connect"),
    (NasSource("127.0.0.1", "/not-exported/"), None, "export"),
])
def test_preflight_names_the_step_that_failed(ganesha, source, port, step):
    import socket

    if port == "closed":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: refused
            steps = nas.preflight(source, port=port, timeout=2)
    else:
        # Names resolve through /etc/hosts only: a test sends no DNS query off this machine.
        steps = nas.preflight(source, port=ganesha.nfs_port, mount_port=ganesha.mount_port,
                              timeout=10, resolve=hosts_only)
    assert steps[-1].name == step and not steps[-1].ok
    with pytest.raises(StorageError, match=f"step '{step}' failed"):
        nas.check_preflight(steps, source)
