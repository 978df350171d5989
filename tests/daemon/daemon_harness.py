"""The ``agent_factory`` fixture: start the real daemon process against the emulator.

Shared by tests/daemon and tests/spot (whose conftest imports it from here)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guestagent.daemon.localrun import AgentProcess, local_config

HERE = Path(__file__).parent


def fast_config(url: str, workdir: Path) -> dict[str, dict[str, Any]]:
    cfg = local_config(url, workdir)
    cfg["spot"].update(poll_interval=0.2, maintenance_interval=0.3, hook_timeout=2.0,
                       deadline_margin=1.0)
    cfg["daemon"].update(stop_timeout=5.0, restart_backoff=0.1, restart_backoff_max=0.5,
                         metadata_check_interval=0.5)
    # The real credential, first-boot and storage services are switched on by their tests.
    cfg["credentials"]["enabled"] = False
    cfg["userdata"] = {"enabled": False}
    cfg["tasks"] = {"enabled": False}
    cfg["storage"] = {"enabled": False}  # tests/storage switch it on
    return cfg


def write_hook(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def agent_factory(emulator: Any, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(
        *,
        extra: list[str] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        python_flags: tuple[str, ...] = (),
        **sections: dict[str, Any],
    ) -> AgentProcess:
        wd = workdir or tmp_path / "agent"
        cfg = fast_config(emulator.url, wd)
        if extra:
            cfg["daemon"]["extra_services"] = extra
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        full_env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                    "PROBE_DIR": str(wd / "probe"), **(env or {})}
        agent = AgentProcess(cfg, wd, full_env, python_flags=python_flags)
        started.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in started:
        agent.kill()


def subprocess_env() -> dict[str, str]:
    """The environment for a ``python -m guestagent.cli`` child: this tree first, and the
    test guard (already on PYTHONPATH) kept."""
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
