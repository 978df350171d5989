"""``python -m guestagent.daemon [--config FILE] [--once SERVICE]``: the daemon without the
rest of the command tree.

``guestagent run`` builds the whole CLI first, which imports every capability's command
module (the emulator and its crypto among them): about 10 MB of RSS the daemon never uses.
This entry point imports only what the daemon runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from guestagent.cli import run_handler
from guestagent.daemon.cli import _run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestagent.daemon", description=__doc__)
    parser.add_argument("--config", help="settings file (default /etc/guestagent/agent.toml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--once", metavar="SERVICE", action="append",
                        help="run only this one-shot service to completion and exit")
    parser.add_argument("--in-daemon", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_handler(_run, args)


if __name__ == "__main__":
    sys.exit(main())
