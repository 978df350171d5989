"""Last act: a spot notice from the emulator's control API, the drain, the daemon's exit."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from guestagent.demo.common import check, log_lines, say

NEEDLES = ("guestagent.spot.", "guestagent.drain:", "guestagent.hooks:", "exits after",
           "guestagent.storage.service", "guestagent.storage.mounts", "guestagent.tasks.service")


def run(cloud: Any, agent: Any, release_after: float, mounts: list[Path]) -> None:
    from guestagent.drain import load_report
    from guestagent.storage.mounts import mountinfo

    say(f"last act: spot notice, POST {cloud.emu.control_url}/spot "
        f"(released in {release_after:.0f}s)")
    body = json.dumps({"in_seconds": 0, "release_after": release_after}).encode()
    req = urllib.request.Request(f"{cloud.emu.control_url}/spot", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()
    posted = time.monotonic()
    code = agent.wait(release_after + 60)
    print(f"   the daemon exited {code}, {time.monotonic() - posted:.2f}s after the notice")
    for line in log_lines(agent.log(), NEEDLES)[-30:]:
        print(line)
    report = load_report(agent.state_dir) or {}
    print(f"   drain: completed={report.get('completed')} "
          f"deadline_held={report.get('deadline_held')} "
          f"seen_at={report.get('seen_at')} deadline={report.get('deadline')}")
    check(bool(report.get("completed")) and bool(report.get("deadline_held")),
          "the drain ran every step within the deadline")
    left = [str(m) for m in mounts if mountinfo(m) is not None]
    check(not left, "the drain unmounted the OSS mounts", f"still mounted: {left}")
    check(code == 0, "the daemon exited 0", f"exit code {code}")
