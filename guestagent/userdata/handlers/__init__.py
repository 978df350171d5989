"""Handlers of ``#cloud-config`` keys, one module per concern, each with the same small
contract (after cloud-init's ``cc_*`` modules):

* ``name`` and ``frequency`` (``once``, ``per-instance`` or ``always``);
* ``keys``: the cloud-config keys it owns;
* ``plan(cfg, ctx)``: validate and normalise those keys, raising
  :class:`~guestagent.userdata.errors.UserdataError` before anything is written; ``None``
  when there is nothing to do;
* ``apply(plan, ctx)``: make it so inside ``ctx.tree``, idempotently.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from guestagent.userdata.settings import UserdataSettings
from guestagent.userdata.tree import Tree

log = logging.getLogger(__name__)


@dataclass
class Context:
    tree: Tree
    settings: UserdataSettings = field(default_factory=UserdataSettings)
    # Runs a script body (runcmd); set by the applier.
    run_script: Callable[[str, bytes], int] | None = None
    notes: list[str] = field(default_factory=list)


class Handler(ABC):
    name: ClassVar[str]
    frequency: ClassVar[str] = "per-instance"
    # First-boot stage it runs in (see guestagent.userdata.stages): configuration is
    # "local" (before sshd and the network are up), commands are "final".
    stage: ClassVar[str] = "local"
    keys: ClassVar[tuple[str, ...]]

    @abstractmethod
    def plan(self, cfg: Mapping[str, Any], ctx: Context) -> Any | None: ...

    @abstractmethod
    def apply(self, plan: Any, ctx: Context) -> None: ...


def all_handlers() -> list[Handler]:
    """The handlers in the order they run (cloud-init's stage order)."""
    from guestagent.userdata.handlers import accounts, dns, ntp, repos, runcmd, sshd, write_files

    return [
        write_files.WriteFiles(),
        dns.Dns(),
        ntp.Ntp(),
        repos.Repos(),
        accounts.Accounts(),
        sshd.Sshd(),
        write_files.WriteFilesDeferred(),
        runcmd.RunCmd(),
    ]


def supported_keys() -> set[str]:
    keys = {"merge_how", "merge_type"}
    for h in all_handlers():
        keys.update(h.keys)
    return keys
