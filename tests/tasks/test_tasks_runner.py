"""The host runner's traces: an instance started just before the agent died (its pid not
yet in the state store) is found again, running or ended, never started twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from polling import wait_for

from guestagent.tasks.runner import HostRunner, Launch


def _launch(tmp_path: Path, argv: list[str]) -> Launch:
    (tmp_path / "work").mkdir(exist_ok=True)
    return Launch(name="j.t.0", argv=argv, env={"PATH": "/usr/bin:/bin"},
                  workdir=tmp_path / "work", stdout=tmp_path / "out", stderr=tmp_path / "err",
                  state_dir=tmp_path / "run")


def test_adopt_without_a_saved_ref_finds_the_running_attempt(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    launch = _launch(tmp_path, ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.1; done; exit 3"])
    runner = HostRunner()
    first = runner.start(launch)
    wait_for(lambda: (launch.state_dir / "pid").exists())
    found = runner.adopt("", launch)  # as a restarted agent that never saved first.ref
    assert found is not None and found.wait(0.2) is None
    gate.touch()
    assert found.wait(30) == 3
    assert first.wait(5) == 3


def test_adopt_without_traces_is_none(tmp_path: Path) -> None:
    assert HostRunner().adopt("", _launch(tmp_path, ["true"])) is None


def test_registry_factory_needs_the_credential_listener(tmp_path: Path) -> None:
    from guestagent.config import from_mapping
    from guestagent.tasks.errors import TaskError
    from guestagent.tasks.registries import factory

    settings = from_mapping({"credentials": {"tcp_enabled": False},
                             "storage": {"endpoint": "http://127.0.0.1:9", "path_style": True}})
    with pytest.raises(TaskError, match=r"tcp_enabled = true"):
        factory(settings, tmp_path / "registries")("oss://bucket-a/dockers/")
    assert not (tmp_path / "registries").exists()  # nothing started, nothing written
