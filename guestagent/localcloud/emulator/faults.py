"""Fault rules: per path (exact, or prefix with a trailing ``*``), optional method and count.

A pattern starting with ``/`` matches the full request path (``/latest/meta-data/...``);
otherwise it matches the path below the version (``meta-data/...``, ``api/token``), so one
rule covers ``latest`` and ``2016-01-01`` alike. Latency is in seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from guestagent.localcloud.emulator.scenario import FaultSpec


@dataclass
class FaultRule:
    """A live rule: its spec, how many more requests it applies to, and its release."""

    id: str
    spec: FaultSpec
    remaining: int | None
    # Set when the rule is cleared: releases requests hanging on it.
    released: threading.Event = field(default_factory=threading.Event, repr=False)

    def matches(self, full_path: str, rel_path: str | None, method: str) -> bool:
        spec = self.spec
        if spec.method is not None and spec.method != method:
            return False
        target = full_path if spec.path.startswith("/") or rel_path is None else rel_path
        if spec.path.endswith("*"):
            return target.startswith(spec.path[:-1])
        return target.rstrip("/") == spec.path.rstrip("/")

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, **dataclasses.asdict(self.spec), "count": self.remaining}


class FaultSet:
    """Active rules, first added wins; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        # Hang rules stay here after their count ran out, so clear() still releases them.
        self._hangs: list[FaultRule] = []
        self._ids = itertools.count(1)

    def add(self, spec: FaultSpec) -> str:
        problem = spec.problem()
        if problem:
            raise ValueError(problem)
        if spec.method:
            spec = dataclasses.replace(spec, method=spec.method.upper())
        with self._lock:
            rule = FaultRule(f"fault-{next(self._ids)}", spec, spec.count)
            self._rules.append(rule)
            if spec.kind == "hang":
                self._hangs.append(rule)
        return rule.id

    def take(self, full_path: str, rel_path: str | None, method: str) -> FaultRule | None:
        """The rule to apply to this request, counting it down (and expiring it) atomically."""
        if not self._rules:  # lock-free fast path: the common case has no faults
            return None
        with self._lock:
            for rule in self._rules:
                if rule.matches(full_path, rel_path, method):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    return rule
        return None

    def remove(self, rule_id: str) -> bool:
        with self._lock:
            for rule in self._rules:
                if rule.id == rule_id:
                    self._rules.remove(rule)
                    if rule in self._hangs:
                        self._hangs.remove(rule)
                    rule.released.set()
                    return True
        return False

    def clear(self) -> None:
        with self._lock:
            rules, self._rules = self._rules, []
            rules += self._hangs
            self._hangs = []
        for rule in rules:
            rule.released.set()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [rule.describe() for rule in self._rules]
