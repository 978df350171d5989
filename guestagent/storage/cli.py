"""``guestagent storage …``: one command, its sub-commands added by the modules that own
them (mounts and NAS here; transfers add cp/ls/sync/rm)."""

from __future__ import annotations

import importlib
from typing import Any

# Modules with a ``register(subparsers)`` adding storage sub-commands.
PARTS = ("guestagent.storage.mountcli",)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("storage", help="OSS transfers and mounts, NAS mounts")
    sub = parser.add_subparsers(dest="storage_command", metavar="COMMAND")
    for name in PARTS:
        importlib.import_module(name).register(sub)
