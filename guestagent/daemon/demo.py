"""``guestagent demo``: the whole agent on one machine, no cloud account.

Starts the local metadata service, runs the real daemon on a private config, shows a local
program reading credentials from the agent's socket, then posts a spot notice to the
emulator's control API and shows the drain running to completion and the daemon exiting 0.
Nothing outside the work directory is touched (first-boot user-data is left off: it would
change this machine's accounts and DNS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import stat
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.cli import EXIT_OK, EXIT_UNAVAILABLE, fail

HOOK = """#!/bin/sh
# A spot hook: told when the instance goes away, with a deadline to respect.
echo "spot hook {name}: instance released at $GUESTAGENT_TERMINATION_TIME"
"""


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the local cloud + daemon, fetch credentials, drain")
    p.add_argument("--workdir", help="keep everything here (default: a temp dir, removed)")
    p.add_argument("--release-after", type=float, default=60.0,
                   help="seconds from the spot notice to the release (default 60)")
    p.set_defaults(handler=_demo)


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _demo(args: argparse.Namespace) -> int:
    from guestagent.localcloud.emulator import Emulator

    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="guestagent-demo-"))
        cleanup = True
    try:
        with Emulator().start() as emu:
            return _scenario(emu, workdir, args.release_after)
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)


def _scenario(emu: Any, workdir: Path, release_after: float) -> int:
    from guestagent.daemon.localrun import local_config

    _say(f"local metadata service on {emu.url} (control API {emu.control_url})")
    cfg = local_config(emu.url, workdir)
    cfg["userdata"] = {"enabled": False}
    for name in ("10-stop-app", "20-flush-logs"):
        hook = workdir / "spot.d" / name
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(HOOK.format(name=name))
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    from guestagent.storage.demo import StorageDemo

    storage = StorageDemo(workdir, _say)
    try:
        storage.configure(cfg)
        return _run_agent(emu, workdir, cfg, storage, release_after)
    finally:
        storage.stop()


def _run_agent(emu: Any, workdir: Path, cfg: dict[str, Any], storage: Any,
               release_after: float) -> int:
    from guestagent.daemon.localrun import AgentProcess
    from guestagent.daemon.render import render

    agent = AgentProcess(cfg, workdir)
    _say(f"starting `guestagent run --config {agent.config_path}`")
    try:
        agent.start()
    except (RuntimeError, TimeoutError) as exc:
        return fail(EXIT_UNAVAILABLE, f"the daemon did not start: {exc}")
    try:
        sock = Path(cfg["credentials"]["socket_path"])
        _wait_credentials(agent)
        print(render(agent.status()), end="")

        _say(f"a local program reads credentials from {sock}")
        doc = _fetch(sock)
        if doc is None:
            return fail(EXIT_UNAVAILABLE, "no credentials were served")
        shown = {k: (v[:4] + "****" if k in ("AccessKeySecret", "SecurityToken") else v)
                 for k, v in doc.items()}
        print(json.dumps(shown, indent=2))

        if not storage.run_task(agent):
            return fail(EXIT_UNAVAILABLE, "the storage part of the demo failed")
        print(render(agent.status()), end="")

        _say(f"spot notice: POST {emu.control_url}/spot (released in {release_after:.0f}s)")
        body = json.dumps({"in_seconds": 0, "release_after": release_after}).encode()
        req = urllib.request.Request(f"{emu.control_url}/spot", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
        posted = time.monotonic()
        code = agent.wait(release_after + 30)
        _say(f"the daemon exited {code}, {time.monotonic() - posted:.2f}s after the notice")
        for line in agent.log().splitlines():
            if any(k in line for k in ("guestagent.spot.", "guestagent.drain:",
                                       "guestagent.hooks:", "exits after")):
                print("  " + line.split(" ", 2)[-1])
        from guestagent.drain import load_report

        report = load_report(agent.state_dir) or {}
        print(f"\ndrain: completed={report.get('completed')} "
              f"deadline_held={report.get('deadline_held')} "
              f"seen_at={report.get('seen_at')} deadline={report.get('deadline')}")
        released = storage.after_drain()
        ok = code == 0 and report.get("completed") and report.get("deadline_held") and released
        return EXIT_OK if ok else EXIT_UNAVAILABLE
    finally:
        agent.stop()


def _wait_credentials(agent: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        creds = agent.status().get("credentials", {})  # that service's own facts
        if creds.get("state") in ("ok", "disabled", "absent"):
            return
        time.sleep(0.1)


def _fetch(sock: Path) -> dict[str, str] | None:
    """What any local program would do; curl when present, else the standard library."""
    url = "http://localhost/v1/credentials/alibaba"
    curl = shutil.which("curl")
    if curl:
        print(f"$ curl --unix-socket {sock} {url}")
        res = process.run([curl, "-sS", "--unix-socket", str(sock), url], timeout=10)
        text = res.text() if res.ok else ""
    else:
        from guestagent.credentials.local import UnixHTTPConnection

        conn = UnixHTTPConnection(str(sock), 10.0)
        conn.request("GET", "/v1/credentials/alibaba")
        text = conn.getresponse().read().decode()
        conn.close()
    try:
        doc = json.loads(text)
    except ValueError:
        print(text, file=sys.stderr)
        return None
    return doc if isinstance(doc, dict) else None
