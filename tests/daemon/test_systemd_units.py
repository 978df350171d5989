"""units/ pass ``systemd-analyze verify`` (and tmpfiles/sysusers parse) where systemd is."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "units"
BINARY = "/usr/local/bin/guestagent"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (Debian: systemd)")


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at a real executable when the
    # package is not installed at its image path.
    exe = BINARY if Path(BINARY).exists() else (shutil.which("guestagent") or sys.executable)
    names = []
    for unit in sorted(UNITS.glob("*.service")):
        (tmp_path / unit.name).write_text(unit.read_text().replace(BINARY, exe))
        names.append(str(tmp_path / unit.name))
    assert len(names) >= 3
    res = subprocess.run(["systemd-analyze", "verify", *names], capture_output=True,
                         text=True, timeout=60)
    problems = [ln for ln in res.stderr.splitlines()
                if "guestagent" in ln and ("Unknown" in ln or "not executable" in ln
                                           or "Failed" in ln or "Invalid" in ln)]
    assert res.returncode == 0 and not problems, res.stderr


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_service_unit_contract() -> None:
    text = (UNITS / "guestagent.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=", f"ExecStart={BINARY} run",
                 "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed"):
        assert line in text
    settings = _settings(text)
    # Nothing that gives it a private mount namespace (its mounts must be the system's),
    # nor restrictions its hooks would inherit.
    private = [k for k in settings if k.startswith(("Private", "Protect", "ReadOnly",
                                                    "ReadWrite", "Inaccessible", "Restrict",
                                                    "SystemCall", "NoNewPrivileges",
                                                    "TemporaryFileSystem", "BindPaths"))]
    assert private == []
    after = " ".join(settings["After"]).split()
    for unit in ("network-online.target", "remote-fs.target", "docker.service",
                 "guestagent-firstboot-local.service"):
        assert unit in after  # the first three: so that at shutdown it stops before them
    # network-pre.target is for what must run before the network is configured: not us.
    assert "network-pre.target" not in text
    local = (UNITS / "guestagent-firstboot-local.service").read_text()
    for line in ("Type=oneshot", "Before=network-online.target sshd.service",
                 "After=network.target networking.service systemd-networkd-wait-online.service",
                 f"ExecStart={BINARY} userdata apply --stage local"):
        assert line in local
    final = (UNITS / "guestagent-firstboot-final.service").read_text()
    for line in ("Type=oneshot", "Wants=network-online.target",
                 "After=network-online.target guestagent-firstboot-local.service",
                 f"ExecStart={BINARY} userdata apply --stage final", "KillMode=process"):
        assert line in final
    # Nothing in the final stage may be ordered before the network is online.
    assert "Before=" not in final


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="no systemd-tmpfiles")
def test_tmpfiles_creates_the_runtime_dir(tmp_path: Path) -> None:
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                    str(UNITS / "tmpfiles.d" / "guestagent.conf")], check=True, timeout=60)
    assert (tmp_path / "run" / "guestagent").is_dir()
    assert (tmp_path / "etc" / "guestagent" / "spot.d").is_dir()


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_credential_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(UNITS / "sysusers.d" / "guestagent.conf")], check=True, timeout=60,
                   capture_output=True)
    assert "guestagent:" in (tmp_path / "etc" / "group").read_text()


def test_the_agent_unit_keeps_the_system_mount_namespace() -> None:
    # OSS and NAS mounts made by the agent must be visible to every process; any of these
    # gives the service a private mount namespace where they would be hidden.
    from pathlib import Path

    text = (Path(__file__).parents[2] / "units" / "guestagent.service").read_text()
    active = [line.split("=", 1)[0] for line in text.splitlines()
              if line and not line.startswith("#") and "=" in line]
    private = {"PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateMounts", "PrivateDevices",
               "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
               "ProtectControlGroups", "MountFlags"}
    assert not private & set(active)
