"""The ``guestagent`` command. Each capability adds its sub-commands through
``register(subparsers)`` in ``guestagent/<capability>/cli.py``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from guestagent import __version__

# Which module adds each top-level command. Only the chosen command's module is imported,
# so ``guestagent run`` does not carry the emulator's or user-data's imports for months.
COMMANDS = {
    "metadata": "guestagent.metadata.cli",
    "emulator": "guestagent.localcloud.emulator.cli",
    "localcloud": "guestagent.localcloud.cli",
    "credentials": "guestagent.credentials.cli",
    "run": "guestagent.daemon.cli",
    "status": "guestagent.daemon.cli",
    "demo": "guestagent.demo",
    "userdata": "guestagent.userdata.cli",
    "config": "guestagent.configcli",
    "deprovision": "guestagent.images.cli",
    "image": "guestagent.images.cli",
    "storage": "guestagent.storage.cli",
    "tasks": "guestagent.tasks.cli",
    "migrate": "guestagent.migrate.cli",
}

EXIT_OK, EXIT_ABSENT, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
# The work ran but part of it failed (a user-data script exited non-zero, a hook failed).
EXIT_PARTIAL = 4

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments or settings: exit 2 with a one-line message."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guestagent",
        description="The in-instance agent for custom ECS images, and its local cloud.",
    )
    parser.add_argument("--version", action="version", version=f"guestagent {__version__}")
    parser.add_argument("--config", help="settings file (default /etc/guestagent/agent.toml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _command(sys.argv[1:] if argv is None else argv)
    modules = [COMMANDS[chosen]] if chosen in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The top-level command word in ``argv`` (skipping global options and their values)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_handler(handler, args)


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Turn the project's known errors into one line on stderr and the documented exit code."""
    from guestagent.config import ConfigError
    from guestagent.metadata.errors import MetadataError

    try:
        return handler(args)
    except (ConfigError, UsageError) as exc:
        return fail(EXIT_USAGE, str(exc))
    except MetadataError as exc:
        return fail(EXIT_UNAVAILABLE, str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def fail(code: int, message: str) -> int:
    print(f"guestagent: {clip(printable(message))}", file=sys.stderr)
    return code


# A value of thousands of characters named in an error (a 64 KiB object key or bucket
# name, a pasted file) is cut to its start and its length: the line stays readable and
# the advice after the value stays on the screen.
LONG_WORD, SHOWN = 300, 120


def clip(message: str) -> str:
    import re

    return re.sub(rf"\S{{{LONG_WORD + 1},}}",
                  lambda m: f"{m.group()[:SHOWN]}...[{len(m.group())} characters]", message)


def printable(message: str) -> str:
    """``message`` as one line that cannot move a terminal's cursor: control characters
    (a hostile object key, job name, answer) and line separators shown escaped."""
    import unicodedata

    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
                   for ch in message)


def load_settings(args: argparse.Namespace) -> Any:
    from guestagent import config

    return config.load(getattr(args, "config", None))


if __name__ == "__main__":
    # Run through the importable module so ``python -m guestagent.cli`` and the capability
    # modules share one ``UsageError`` class (``__main__`` would be a second copy).
    from guestagent.cli import main as _main

    sys.exit(_main())
