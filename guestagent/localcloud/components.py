"""The stand-ins ``guestagent localcloud up`` can start, by name.

Each entry names a ``module:class``; the class is built with the work directory and the
environment gathered so far (a later component can read an earlier one's URL), and has
``start() -> dict[str, str]`` (the environment a user sets to use it) and ``stop()``.
Modules are imported only when asked for, so a missing optional tool only matters to the
component that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class Component(Protocol):
    name: str

    def start(self) -> dict[str, str]: ...

    def stop(self) -> None: ...


class ComponentFactory(Protocol):
    def __call__(self, workdir: Path, env: Mapping[str, str]) -> Component: ...


# Start order is this order; stop order is the reverse.
COMPONENTS: dict[str, str] = {
    "metadata": "guestagent.localcloud.emulator.component:MetadataComponent",
    "oss": "guestagent.localcloud.oss:MotoOss",
    "oss-rclone": "guestagent.localcloud.oss:RcloneOss",
    "docker": "guestagent.localcloud.dockerd:DockerComponent",
    "nas": "guestagent.localcloud.nas:NasComponent",
    "ecs": "guestagent.localcloud.ecsapi.component:EcsComponent",
}


def factory(name: str) -> ComponentFactory:
    try:
        target = COMPONENTS[name]
    except KeyError:
        known = ", ".join(COMPONENTS)
        raise ValueError(f"--with: unknown component {name!r} (known: {known})") from None
    module, _, attr = target.partition(":")
    made: ComponentFactory = getattr(importlib.import_module(module), attr)
    return made


def ordered(names: list[str]) -> list[str]:
    """``names`` (validated) in start order, the metadata service always first."""
    wanted = {"metadata", *names}
    unknown = sorted(wanted - COMPONENTS.keys())
    if unknown:
        known = ", ".join(COMPONENTS)
        raise ValueError(f"--with: unknown component {unknown[0]!r} (known: {known})")
    return [n for n in COMPONENTS if n in wanted]
