"""Fault rules: per path (exact, or prefix with a trailing ``*``), optional method and count.

A pattern starting with ``/`` matches the full request path (``/latest/meta-data/...``);
otherwise it matches the path below the version (``meta-data/...``, ``api/token``), so one
rule covers ``latest`` and ``2016-01-01`` alike. Latency is in seconds.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from guestagent.metadata.emulator.scenario import check_fault


@dataclass
class FaultRule:
    id: str
    path: str
    kind: str
    status: int = 500
    latency: float = 0.0
    count: int | None = None
    method: str | None = None
    body: str | None = None
    # Set when the rule is cleared: releases requests hanging on it.
    released: threading.Event = field(default_factory=threading.Event, repr=False)

    def matches(self, full_path: str, rel_path: str | None, method: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        target = full_path if self.path.startswith("/") or rel_path is None else rel_path
        if self.path.endswith("*"):
            return target.startswith(self.path[:-1])
        return target.rstrip("/") == self.path.rstrip("/")

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "kind": self.kind,
            "status": self.status,
            "latency": self.latency,
            "count": self.count,
            "method": self.method,
            "body": self.body,
        }


class FaultSet:
    """Active rules, first added wins; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        # Hang rules stay here after their count ran out, so clear() still releases them.
        self._hangs: list[FaultRule] = []
        self._ids = itertools.count(1)

    def add(
        self,
        path: str,
        kind: str,
        *,
        status: int = 500,
        latency: float = 0.0,
        count: int | None = None,
        method: str | None = None,
        body: str | None = None,
    ) -> str:
        problem = check_fault(
            path, kind, status=status, latency=latency, count=count, method=method
        )
        if problem:
            raise ValueError(problem)
        with self._lock:
            rule = FaultRule(
                id=f"fault-{next(self._ids)}",
                path=path,
                kind=kind,
                status=status,
                latency=latency,
                count=count,
                method=method.upper() if method else None,
                body=body,
            )
            self._rules.append(rule)
            if kind == "hang":
                self._hangs.append(rule)
        return rule.id

    def take(self, full_path: str, rel_path: str | None, method: str) -> FaultRule | None:
        """The rule to apply to this request, counting it down (and expiring it) atomically."""
        if not self._rules:  # lock-free fast path: the common case has no faults
            return None
        with self._lock:
            for rule in self._rules:
                if rule.matches(full_path, rel_path, method):
                    if rule.count is not None:
                        rule.count -= 1
                        if rule.count <= 0:
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
