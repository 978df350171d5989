"""The image ``images/build`` writes: deprovisioned, and it boots the agent under systemd."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from system_harness import CACHE, SHARED_HOST_NETWORK, agent_toml

from guestagent.images import nspawn, rootfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = Path(__file__).parents[2]


def test_built_image_is_clean_and_boots_the_agent(system_layers, emulator, docker_engine):
    work = Path(tempfile.mkdtemp(prefix="guestagent-image-test.", dir="/var/tmp"))
    try:
        tarball = work / "image.tar.gz"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        res = subprocess.run(
            [str(REPO / "images" / "build"), "-o", str(tarball), "--cache", str(CACHE)],
            capture_output=True, text=True, timeout=1500, env=env,
        )
        assert res.returncode == 0, res.stderr
        assert "size_mb:" in res.stdout
        tree = work / "tree"
        tree.mkdir()
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tree)], check=True, timeout=600)

        # Deprovisioned: no machine identity, no agent state, units enabled.
        assert (tree / "etc/machine-id").read_text() == ""
        assert list((tree / "var/lib/guestagent").iterdir()) == []
        wants = tree / "etc/systemd/system/multi-user.target.wants"
        assert (wants / "guestagent.service").is_symlink()
        for stage in ("local", "final"):
            assert (wants / f"guestagent-firstboot-{stage}.service").is_symlink()
        assert os.readlink(tree / "usr/local/bin/guestagent").startswith("/opt/guestagent/")

        # The same tarball is a Docker base image (what the task launcher's tests can use).
        name = f"guestagent-image-test:{os.getpid()}"
        docker = ["docker", "-H", docker_engine.host]
        subprocess.run([*docker, "import", str(tarball), name], check=True, timeout=600,
                       capture_output=True)
        try:
            ran = subprocess.run([*docker, "run", "--rm", name, "guestagent", "--version"],
                                 capture_output=True, text=True, timeout=300)
            assert ran.returncode == 0 and ran.stdout.startswith("guestagent "), ran.stderr
        finally:
            subprocess.run([*docker, "rmi", name], capture_output=True, timeout=120)

        (tree / "etc/guestagent/agent.toml").write_text(agent_toml(emulator))
        for inside, text in SHARED_HOST_NETWORK.items():
            (tree / inside.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (tree / inside.lstrip("/")).write_text(text)
        guest = nspawn.Machine(tree, f"ga-img-{os.getpid()}", work / "boot.log")
        try:
            guest.boot()
            guest.wait_unit("guestagent.service")
            for stage in ("local", "final"):
                unit = f"guestagent-firstboot-{stage}.service"
                assert guest.wait_unit(unit)["Result"] == "success"
            assert len(guest.path("/etc/machine-id").read_text().strip()) == 32
            assert guest.run(["guestagent", "status"]).ok
        finally:
            guest.poweroff()
    finally:
        rootfs.remove_tree(work)


def test_image_build_usage_error_is_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "guestagent", "image", "build", "-o",
         str(tmp_path / "no" / "such" / "dir" / "x.tar.gz")],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1


def test_image_demo_boots_applies_and_powers_off(system_layers):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run(
        [sys.executable, "-m", "guestagent", "image", "demo", "--cache", str(CACHE)],
        capture_output=True, text=True, timeout=1200, env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "nameserver 10.0.0.2" in res.stdout
    assert "uid=1000(ops)" in res.stdout
    assert "Success STS." in res.stdout
    assert "powered off" in res.stdout
