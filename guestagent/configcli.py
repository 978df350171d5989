"""``guestagent config show|check``: the effective settings, secrets masked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from guestagent.cli import EXIT_OK, load_settings


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="show or check the settings")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the effective settings (secrets masked)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_show)
    check = csub.add_parser("check", help="validate the settings and exit")
    check.set_defaults(handler=_check)


def _show(args: argparse.Namespace) -> int:
    from guestagent import config

    data = config.as_dict(load_settings(args))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    for section, table in data.items():
        print(f"[{section}]")
        for key, value in table.items():
            print(f"{key} = {json.dumps(value)}")
        print()
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    load_settings(args)
    print("settings ok")
    return EXIT_OK
