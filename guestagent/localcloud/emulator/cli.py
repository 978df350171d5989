"""``guestagent emulator serve``: run the metadata emulator until SIGINT/SIGTERM.

Also runnable alone: ``python -m guestagent.localcloud.emulator.cli serve``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE = 0, 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "emulator", help="the local metadata service emulator", description=__doc__
    )
    sub = parser.add_subparsers(dest="emulator_command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve the metadata emulator",
        description="Serve the emulated metadata service and its control API. Prints "
        "'metadata URL control URL' on stdout once both listen.",
    )
    serve.add_argument("--port", type=int, default=0, help="metadata port (default: any free)")
    serve.add_argument(
        "--control-port", type=int, default=0, help="control API port, always on 127.0.0.1"
    )
    serve.add_argument("--scenario", help="scenario file (TOML, or YAML with PyYAML)")
    serve.add_argument("--bind", default="127.0.0.1", help="metadata address (default 127.0.0.1)")
    serve.set_defaults(handler=serve_command)
    parser.set_defaults(handler=lambda args: _help(parser))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _fail(message: str) -> int:
    print(f"guestagent: {message}", file=sys.stderr)
    return EXIT_USAGE


def serve_command(args: argparse.Namespace) -> int:
    from guestagent.localcloud.emulator.ca import CAError
    from guestagent.localcloud.emulator.instance import Emulator
    from guestagent.localcloud.emulator.scenario import ScenarioError, load_scenario

    for name in ("port", "control_port"):
        if not 0 <= getattr(args, name) <= 65535:
            return _fail(f"--{name.replace('_', '-')}: must be 0..65535")
    try:
        scenario = load_scenario(args.scenario)
        emulator = Emulator(
            scenario, host=args.bind, port=args.port, control_port=args.control_port
        )
    except (ScenarioError, CAError) as exc:
        return _fail(str(exc))
    try:
        emulator.start()
    except OSError as exc:
        return _fail(
            f"cannot listen on {args.bind}:{args.port} / control {args.control_port}: "
            f"{exc.strerror or exc}"
        )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"metadata {emulator.url} control {emulator.control_url}", flush=True)
        log.info("emulator serving %s (control %s)", emulator.url, emulator.control_url)
        while not done.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guestagent-emulator")
    register(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(["emulator", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
