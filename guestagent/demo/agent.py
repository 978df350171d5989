"""Act 2 and 3: the real daemon on a private config, and a local program reading credentials.

First-boot user-data stays off: it would change this machine's accounts and DNS.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.demo.cloud import LocalCloud
from guestagent.demo.common import BUCKET, DemoFailed, check, say

HOOK = """#!/bin/sh
# A spot hook: told when the instance goes away, with a deadline to respect.
echo "spot hook {name}: instance released at $GUESTAGENT_TERMINATION_TIME"
"""
INPUT_PREFIX = "demo/input/"


def has_tasks() -> bool:
    """The task launcher is part of this tree (it landed after the rest of the demo)."""
    return importlib.util.find_spec("guestagent.tasks.service") is not None


def config(cloud: LocalCloud, workdir: Path) -> dict[str, dict[str, Any]]:
    from guestagent.daemon.localrun import local_config
    from guestagent.localcloud.oss import free_port

    cfg = local_config(cloud.emu.url, workdir)
    cfg["userdata"] = {"enabled": False}
    # rclone reads keys over loopback HTTP: a fixed (free) port it can be told about.
    cfg["credentials"]["tcp_port"] = free_port()
    cfg["storage"] = {
        "endpoint": cloud.oss_url, "path_style": True, "region": "us-east-1",
        "mounts": [f"oss://{BUCKET}/{INPUT_PREFIX}:{workdir / 'mnt' / 'input'}"],
    }
    if has_tasks():
        tasks: dict[str, Any] = {"max_parallel": 3, "kill_grace": 5.0,
                                 "notify_command": ""}
        if cloud.engine is not None:
            tasks["docker_host"] = cloud.engine.host
        cfg["tasks"] = tasks
    return cfg


def write_hooks(workdir: Path) -> None:
    for name in ("10-stop-app", "20-flush-logs"):
        hook = workdir / "spot.d" / name
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(HOOK.format(name=name))
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def start(stack: contextlib.ExitStack, cfg: dict[str, dict[str, Any]], workdir: Path) -> Any:
    from guestagent.daemon.localrun import AgentProcess
    from guestagent.daemon.render import render

    say("act 2: the agent's daemon (credentials, storage, tasks, spot)")
    write_hooks(workdir)
    agent = AgentProcess(cfg, workdir)
    print(f"$ guestagent run --config {agent.config_path}")
    try:
        agent.start(wait=60.0)
    except (RuntimeError, TimeoutError) as exc:
        raise DemoFailed(f"the daemon did not start: {str(exc).splitlines()[0]}") from None
    stack.callback(agent.stop)
    wanted = ["credentials", "storage", "spot"] + (["tasks"] if "tasks" in cfg else [])
    _wait_services(agent, wanted)
    print(render(agent.status()), end="")
    check(True, f"services running: {', '.join(wanted)}")
    return agent


def _wait_services(agent: Any, names: list[str], timeout: float = 120.0) -> None:
    """Until each service is ready (the storage one once its declared mount was tried)."""
    end = time.monotonic() + timeout
    while True:
        services = {s["name"]: s for s in agent.status().get("services", [])}
        missing = [n for n in names if not services.get(n, {}).get("ready")]
        if not missing:
            return
        if time.monotonic() > end or not agent.running():
            raise DemoFailed(f"service(s) not ready: {', '.join(missing)} "
                             f"(see {agent.log_path})")
        time.sleep(0.2)


def credentials(cfg: dict[str, dict[str, Any]]) -> None:
    sock = Path(cfg["credentials"]["socket_path"])
    say(f"act 3: a local program reads credentials from {sock}")
    doc = _fetch(sock)
    if doc is None:
        raise DemoFailed("no credentials were served on the socket")
    shown = {k: (v[:4] + "****" if k in ("AccessKeySecret", "SecurityToken") else v)
             for k, v in doc.items()}
    print(json.dumps(shown, indent=2))
    check(doc.get("Code") == "Success" and bool(doc.get("AccessKeyId")),
          "the emulator's RAM role credentials, served by the agent", str(doc.get("Code")))


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
        return None
    return doc if isinstance(doc, dict) else None
