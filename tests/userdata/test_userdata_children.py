"""Children of the user-data code (cloud-init's schema check, sh -n, visudo) are bounded in
memory and time and never outlive the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from polling import gone, wait_for

from guestagent import process
from guestagent.userdata import cloudconfig

HOG = "#!{python}\nimport sys\nblob = bytearray({size})\nprint('schema ok')\n"


def test_a_child_over_its_memory_limit_fails_instead_of_growing() -> None:
    res = process.run(
        [sys.executable, "-c", "x = bytearray(1 << 30)"], memory_limit=256 << 20, timeout=60
    )
    assert res.returncode != 0 and b"MemoryError" in res.stderr
    ok = process.run([sys.executable, "-c", "x = bytearray(1 << 20)"], memory_limit=256 << 20)
    assert ok.ok


def test_a_schema_check_that_wants_gigabytes_is_stopped(tmp_path: Path) -> None:
    fake = tmp_path / "cloud-init"
    fake.write_text(HOG.format(python=sys.executable, size=4 << 30))
    fake.chmod(0o755)
    errors = cloudconfig.schema_errors("#cloud-config\n{}\n", str(fake))
    assert errors == [f"cloud-init schema needed more than {cloudconfig.SCHEMA_MEMORY >> 20} MiB"]


def test_a_helper_dies_with_the_agent(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = (
        "from guestagent import process\n"
        f"process.run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 300'],"
        " timeout=300, die_with_parent=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    agent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 60))
        assert not gone(pid)
        agent.send_signal(signal.SIGKILL)
        agent.wait(60)
        wait_for(lambda: gone(pid), 30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
