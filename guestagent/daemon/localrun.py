"""Start a real ``guestagent run`` process on a private config and talk to it.

Used by ``guestagent demo``, ``bench/daemon.py`` and the end-to-end tests: they all need the
same thing, the daemon exactly as the image runs it, pointed at the local cloud.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guestagent.daemon import control
from guestagent.files import atomic_write

Config = dict[str, dict[str, Any]]


def local_config(metadata_url: str, workdir: Path) -> Config:
    """Settings for a daemon living entirely under ``workdir``, fast enough for a demo."""
    return {
        "metadata": {"url": metadata_url, "timeout": 0.5, "retries": 2, "backoff_base": 0.05,
                     "backoff_max": 0.2},
        "daemon": {"state_dir": str(workdir / "state"), "run_dir": str(workdir / "run"),
                   "stop_timeout": 10.0, "restart_backoff": 0.2, "restart_backoff_max": 2.0},
        "spot": {"poll_interval": 1.0, "deadline_margin": 2.0,
                 "hooks_dir": str(workdir / "spot.d"), "hook_timeout": 5.0,
                 "maintenance_hooks_dir": str(workdir / "maintenance.d"),
                 "maintenance_interval": 1.0},
        # An ephemeral TCP port: several local daemons (tests, demos) may run at once.
        "credentials": {"socket_path": str(workdir / "run" / "credentials.sock"), "tcp_port": 0},
    }


def to_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    """The small TOML subset settings need: tables of scalars and lists of scalars."""
    out = []
    for section, table in config.items():
        out.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                continue
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


class AgentProcess:
    """One daemon process; its output goes to ``workdir/agent.log``."""

    def __init__(self, config: Config, workdir: Path, env: Mapping[str, str] | None = None,
                 verbose: int = 1, python_flags: tuple[str, ...] = ()) -> None:
        self.config = config
        self.workdir = workdir
        self.config_path = workdir / "agent.toml"
        self.log_path = workdir / "agent.log"
        self.socket = Path(config["daemon"]["run_dir"]) / control.SOCKET_NAME
        self.state_dir = Path(config["daemon"]["state_dir"])
        self.env = dict(env or {})
        self.verbose = verbose
        self.python_flags = python_flags  # e.g. ("-X", "importtime")
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        atomic_write(self.config_path, to_toml(self.config))

    def start(self, wait: float | None = 15.0) -> AgentProcess:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTAGENT_")}
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.env)
        # Run this very copy of the package, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        verbose = ["-v"] * self.verbose
        argv = [sys.executable, *self.python_flags, "-m", "guestagent", *verbose, "run",
                "--config", str(self.config_path)]
        # A long-lived child we signal and watch: process.run() is for programs that run
        # to completion, so this development harness starts it itself.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        if wait is not None:
            self.wait_ready(wait)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited {self.proc.returncode} while starting:\n{self.log()}"
                )
            try:
                if control.ask(self.socket, "ping", timeout=1.0).get("pid") == self.pid:
                    return
            except control.ControlError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"the daemon did not answer in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return control.ask(self.socket, "status")

    def service(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["services"] if s["name"] == name), None)

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not go in time; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""
