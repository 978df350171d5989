"""``guestagent demo``: the whole agent on one machine, no cloud account.

The story, one module per act: the local cloud comes up (metadata emulator, OSS on moto's
S3 server, a private dockerd when this machine can run one) → the real daemon starts on a
private config with its credentials, storage and tasks services → a local program reads
credentials from its socket → storage: input read through a read-only OSS mount, output
uploaded, ``storage ls`` → tasks: the guide's log-count job (host mode, then Docker mode)
→ a spot notice, the drain, the daemon exiting 0. Each step prints a verification; the
first that fails ends the demo with a one-line reason and a non-zero exit.

Nothing outside the work directory is touched, and everything started is stopped (also on
Ctrl-C or SIGTERM): dockerd and its bridge, rclone mounts, moto, the daemon, temp dirs.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from guestagent.cli import EXIT_OK, EXIT_UNAVAILABLE, fail


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the agent on the local cloud: credentials, storage, "
                                    "tasks, spot drain")
    p.add_argument("--workdir", help="keep everything here (default: a temp dir, removed)")
    p.add_argument("--release-after", type=float, default=60.0,
                   help="seconds from the spot notice to the release (default 60)")
    p.add_argument("--no-docker", action="store_true",
                   help="no dockerd: the task job runs in host mode only")
    p.add_argument("--quick", action="store_true",
                   help="skip the Docker mode and use a short spot deadline (20 s)")
    p.set_defaults(handler=_demo)


class _Interrupted(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _demo(args: argparse.Namespace) -> int:
    from guestagent.demo.common import DemoFailed

    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="guestagent-demo-"))
    old = signal.signal(signal.SIGTERM, _on_signal)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if not args.workdir:
                stack.callback(shutil.rmtree, workdir, True)
            stack.callback(_unmount_leftovers, workdir)
            _story(stack, workdir, args)
    except DemoFailed as exc:
        return fail(EXIT_UNAVAILABLE, f"demo failed: {exc}")
    except (KeyboardInterrupt, _Interrupted) as exc:
        return fail(130, f"demo interrupted ({exc or 'Ctrl-C'}); everything it started "
                         "was stopped")
    finally:
        signal.signal(signal.SIGTERM, old)
    print(f"\n== the demo ran to the end in {time.monotonic() - started:.0f}s", flush=True)
    return EXIT_OK


def _story(stack: contextlib.ExitStack, workdir: Path, args: argparse.Namespace) -> None:
    from guestagent.demo import agent, spot, storage
    from guestagent.demo.cloud import LocalCloud

    cloud = LocalCloud(workdir, stack, docker=not (args.no_docker or args.quick)
                       and agent.has_tasks())
    if not agent.has_tasks():
        cloud.docker_skipped = "no task launcher in this build"
    elif args.quick and not args.no_docker:
        cloud.docker_skipped = "--quick given"
    cloud.start()
    data = storage.seed(cloud)
    cfg = agent.config(cloud, workdir)
    daemon = agent.start(stack, cfg, workdir)
    agent.credentials(cfg)
    storage.run(cloud, daemon, workdir, data)
    if agent.has_tasks():
        import importlib

        importlib.import_module("guestagent.demo.tasks").run(cloud, daemon, workdir)
    else:
        print("\n== tasks: not in this build of the agent (guestagent.tasks.service)")
    release = 20.0 if args.quick else args.release_after
    spot.run(cloud, daemon, release, [workdir / "mnt" / "input"])


def _unmount_leftovers(workdir: Path) -> None:
    """FUSE mounts under the work dir left by an interrupted run (the daemon leaves its
    mounts on SIGTERM for a restarted agent to adopt; the demo is not coming back)."""
    import os

    from guestagent.storage.mounts import lazy_unmount, proc_start, read_record

    for record_path in sorted((workdir / "run" / "storage" / "mounts").glob("*.json")):
        record = read_record(record_path) or {}
        dest = Path(str(record.get("dest", "")))
        if not str(dest).startswith(str(workdir) + "/"):
            continue
        lazy_unmount(dest)
        pid = int(record.get("pid") or 0)
        # Only the rclone the record names (same start time), never a reused pid.
        if pid and proc_start(pid) == str(record.get("started", "")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
