"""Act 4: storage — an InputMapping read through the read-only rclone mount the daemon made,
an OutputMapping uploaded at the end with the agent's keys, and `storage ls` showing it.

The input is put in OSS before the agent starts (the user's data is already there); the
result is read back from the store directly, not through the agent, to check the upload.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from guestagent.demo.agent import INPUT_PREFIX
from guestagent.demo.cloud import LocalCloud
from guestagent.demo.common import BUCKET, DemoFailed, check, cli, say
from guestagent.tasks.example import expected_counts, log_data

INPUT_NAME = "access.log"
OUTPUT_PREFIX = "demo/output/"


def seed(cloud: LocalCloud) -> bytes:
    """The user's input, in OSS before the instance starts."""
    data = log_data()
    cloud.put(INPUT_PREFIX + INPUT_NAME, data)
    print(f"   oss://{BUCKET}/{INPUT_PREFIX}{INPUT_NAME}: {len(data)} bytes of log (the input)")
    return data


def run(cloud: LocalCloud, agent: Any, workdir: Path, data: bytes) -> None:
    mount = workdir / "mnt" / "input"
    say("act 4: storage — read input through the read-only mount, upload the output")
    row = next((m for m in _mounts(agent) if m.get("dest") == str(mount)), None)
    check(row is not None and row.get("health") == "ok",
          f"oss://{BUCKET}/{INPUT_PREFIX} mounted read-only at {mount} by the storage service",
          f"mount state {row}")
    cli(agent.config_path, "storage", "mounts")

    seen = (mount / INPUT_NAME).read_bytes()
    check(seen == data, f"{INPUT_NAME} read through the mount: {len(seen)} bytes, "
          "identical to the object")
    try:
        (mount / "scribble.txt").write_text("no")
        writable = True
    except OSError as exc:
        writable = exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM)
    check(not writable, "the mount refuses writes (InputMapping is read-only)")

    out = workdir / "output"
    out.mkdir(exist_ok=True)
    counts = {level: 0 for level in expected_counts(data)}
    with (mount / INPUT_NAME).open() as fh:  # a "program" working from the mapping
        for line in fh:
            for level in counts:
                counts[level] += level in line
    (out / "levels.json").write_text(json.dumps(counts) + "\n")
    (out / "summary.txt").write_text(f"{sum(counts.values())} lines counted\n")
    print(f"   the program wrote {sorted(p.name for p in out.iterdir())} into {out}")

    dest = f"oss://{BUCKET}/{OUTPUT_PREFIX}"
    cli(agent.config_path, "storage", "cp", "-r", str(out) + "/", dest, "--json", show=False)
    listing = cli(agent.config_path, "storage", "ls", "-r", dest).text()
    check(all(name in listing for name in ("levels.json", "summary.txt")),
          f"`storage ls` shows the uploaded output under {dest}")
    stored = json.loads(cloud.get(OUTPUT_PREFIX + "levels.json"))
    check(stored == expected_counts(data),
          f"the uploaded result matches the demo's own count {stored}")


def _mounts(agent: Any) -> list[dict[str, Any]]:
    svc = agent.service("storage") or {}
    rows = (svc.get("details") or {}).get("mounts") or []
    if not isinstance(rows, list):
        raise DemoFailed(f"storage status has no mount table: {svc}")
    return rows
