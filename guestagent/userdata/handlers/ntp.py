"""``ntp``: time servers for chrony or ntpd (cloud-init's ntp module).

Other settings in the client's config file are kept: existing ``server``/``pool``/``peer``/
``sourcedir`` lines are commented out and ours go into a marked block, so a second apply
produces the same file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guestagent import process
from guestagent.userdata import checks
from guestagent.userdata.errors import UserdataError
from guestagent.userdata.handlers import Context, Handler
from guestagent.userdata.tree import Tree

log = logging.getLogger(__name__)

BEGIN, END = "# BEGIN guestagent ntp", "# END guestagent ntp"
DISABLED = "#guestagent# "
_SOURCE = re.compile(r"^[ \t]*(server|pool|peer|sourcedir)[ \t]")
CLIENTS = ("auto", "chrony", "ntp")
SERVICES = {"chrony": ("chrony", "chronyd"), "ntp": ("ntpsec", "ntp", "ntpd")}


@dataclass(frozen=True)
class NtpPlan:
    client: str
    servers: tuple[str, ...]
    pools: tuple[str, ...]

    def lines(self) -> list[str]:
        return [f"server {s} iburst" for s in self.servers] + [
            f"pool {p} iburst" for p in self.pools
        ]


def plan_from(cfg: Mapping[str, Any]) -> NtpPlan | None:
    ntp = cfg.get("ntp")
    if ntp is None:
        return None
    if not isinstance(ntp, Mapping):
        raise UserdataError("ntp: must be a mapping")
    unknown = set(ntp) - {"enabled", "ntp_client", "servers", "pools"}
    if unknown:
        raise UserdataError(f"ntp: unsupported key(s) {', '.join(sorted(unknown))}")
    if not checks.boolean(ntp.get("enabled", True), "ntp.enabled"):
        return None
    client = ntp.get("ntp_client", "auto") or "auto"
    if client not in CLIENTS:
        raise UserdataError(
            f"ntp.ntp_client: {client!r} is not supported (use {', '.join(CLIENTS)})"
        )
    servers = [
        checks.host(v, f"ntp.servers[{i}]")
        for i, v in enumerate(checks.str_list(ntp.get("servers", []), "ntp.servers"))
    ]
    pools = [
        checks.host(v, f"ntp.pools[{i}]")
        for i, v in enumerate(checks.str_list(ntp.get("pools", []), "ntp.pools"))
    ]
    if not servers and not pools:
        raise UserdataError("ntp: give at least one of servers or pools")
    return NtpPlan(client, tuple(servers), tuple(pools))


# What shows a client is installed in a tree: its daemon or its configuration directory.
MARKERS = {
    "chrony": ("/usr/sbin/chronyd", "/etc/chrony", "/etc/chrony.conf"),
    "ntp": ("/usr/sbin/ntpd", "/etc/ntpsec", "/etc/ntp.conf"),
}
PACKAGES = {"chrony": "chrony", "ntp": "ntpsec (or ntp)"}


def installed(tree: Tree, client: str) -> bool:
    return any(tree.exists(p) for p in MARKERS[client])


def choose(tree: Tree, client: str) -> tuple[str, str]:
    """(client, config path) for the tree; ``auto`` prefers an installed chrony."""
    if client == "auto":
        client = "ntp" if installed(tree, "ntp") and not installed(tree, "chrony") else "chrony"
    if client == "chrony":
        path = "/etc/chrony/chrony.conf" if tree.exists("/etc/chrony") else "/etc/chrony.conf"
    else:
        path = "/etc/ntpsec/ntp.conf" if tree.exists("/etc/ntpsec") else "/etc/ntp.conf"
    return client, path


def check_installed(plan: NtpPlan, tree: Tree, notes: list[str]) -> None:
    """A client named explicitly must be installed (refused otherwise: the servers would
    sit in a file nothing reads); with ``auto`` and none installed, a warning."""
    if plan.client != "auto" and not installed(tree, plan.client):
        raise UserdataError(
            f"ntp.ntp_client: {plan.client} is not installed in the image (none of "
            f"{', '.join(MARKERS[plan.client])}); install {PACKAGES[plan.client]} or use "
            "ntp_client: auto"
        )
    if plan.client == "auto" and not any(installed(tree, c) for c in MARKERS):
        _, path = choose(tree, "auto")
        notes.append(
            f"ntp: no NTP client is installed (chrony or ntpd); {path} is written for "
            "chrony but nothing keeps time until a client is installed"
        )


def edit(existing: str | None, ours: list[str]) -> str:
    out: list[str] = []
    skip = False
    for line in (existing or "").splitlines():
        if line == BEGIN:
            skip = True
            continue
        if line == END:
            skip = False
            continue
        if skip:
            continue
        out.append(DISABLED + line if _SOURCE.match(line) else line)
    return "\n".join([*out, BEGIN, *ours, END]) + "\n"


class Ntp(Handler):
    name = "ntp"
    keys = ("ntp",)

    def plan(self, cfg: Mapping[str, Any], ctx: Context) -> NtpPlan | None:
        plan = plan_from(cfg)
        if plan is not None:
            check_installed(plan, ctx.tree, ctx.notes)
        return plan

    def apply(self, plan: NtpPlan, ctx: Context) -> None:
        client, path = choose(ctx.tree, plan.client)
        changed = ctx.tree.write(path, edit(ctx.tree.read_text(path), plan.lines()), mode=0o644)
        if changed and ctx.tree.live:
            for unit in SERVICES[client]:
                process.run(["systemctl", "try-restart", f"{unit}.service"], timeout=30)
