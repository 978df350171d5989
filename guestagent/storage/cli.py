"""``guestagent storage ...``: each part of the capability adds its sub-commands here."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from guestagent.cli import EXIT_USAGE

# Modules with ``register(subparsers)`` adding commands under ``storage``.
PARTS = [
    "guestagent.storage.transfercli",  # cp, ls, sync, rm
    "guestagent.storage.mountcli",  # mount, umount, mounts, nas
]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("storage", help="OSS transfers and mounts, NAS mounts")
    sub = parser.add_subparsers(dest="storage_command", metavar="COMMAND")
    for name in PARTS:
        importlib.import_module(name).register(sub)
    parser.set_defaults(handler=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
