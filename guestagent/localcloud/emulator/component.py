"""The metadata emulator as a ``localcloud up`` component."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from guestagent.localcloud.emulator.instance import Emulator
from guestagent.localcloud.emulator.scenario import load_scenario


class MetadataComponent:
    name = "metadata"

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        scenario = env.get("GUESTAGENT_LOCALCLOUD_SCENARIO")
        self._emulator = Emulator(load_scenario(scenario) if scenario else None)

    def start(self) -> dict[str, str]:
        emu = self._emulator.start()
        return {
            "GUESTAGENT_METADATA_URL": emu.url,
            "GUESTAGENT_LOCALCLOUD_CONTROL_URL": emu.control_url,
        }

    def stop(self) -> None:
        self._emulator.stop()
