"""``runcmd``: commands run once the rest is applied (cloud-init's runcmd): a string is a
shell command line, a list is an argv (quoted here, never re-split)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from guestagent.userdata.errors import ApplyError, UserdataError
from guestagent.userdata.handlers import Context, Handler


def script_from(cfg: Mapping[str, Any]) -> str | None:
    cmds = cfg.get("runcmd")
    if not cmds:
        return None
    if not isinstance(cmds, list):
        raise UserdataError("runcmd: must be a list")
    lines = ["#!/bin/sh"]
    for i, cmd in enumerate(cmds):
        if isinstance(cmd, str):
            lines.append(cmd)
        elif isinstance(cmd, list) and cmd and all(isinstance(a, str | int | float) for a in cmd):
            lines.append(shlex.join(str(a) for a in cmd))
        else:
            raise UserdataError(f"runcmd[{i}]: must be a command line or a list of arguments")
    return "\n".join(lines) + "\n"


class RunCmd(Handler):
    name = "runcmd"
    keys = ("runcmd",)
    stage = "final"

    def plan(self, cfg: Mapping[str, Any], ctx: Context) -> str | None:
        return script_from(cfg)

    def apply(self, plan: str, ctx: Context) -> None:
        if ctx.tree.dry_run or ctx.run_script is None:
            ctx.tree.note("runcmd", f"would run {plan.count(chr(10)) - 1} command(s)")
            return
        rc = ctx.run_script("runcmd", plan.encode())
        if rc != 0:
            raise ApplyError(f"runcmd: exited {rc}")
        ctx.tree.note("runcmd", f"ran {plan.count(chr(10)) - 1} command(s)")
