"""The human form of a ``guestagent status`` answer (shared by the CLI and the demo).

Nothing here names a capability: each service brings its own one-line summary."""

from __future__ import annotations

from typing import Any

HELD = {True: "deadline held", False: "DEADLINE MISSED", None: "deadline pending"}


def render(reply: dict[str, Any]) -> str:
    health = "healthy" if reply.get("healthy") else "UNHEALTHY"
    lines = [
        f"guestagent {reply.get('version')} pid {reply.get('pid')}: {reply.get('phase')}, "
        f"{health}, up {_duration(float(reply.get('uptime', 0)))}, "
        f"init {reply.get('init', 'unknown')}",
        "",
        f"{'SERVICE':<14}{'STATE':<10}{'OK':<5}{'RESTARTS':<10}LAST ERROR",
    ]
    services = reply.get("services", [])
    for svc in services:
        error = svc.get("last_error") or "-"
        if svc.get("last_error_at"):
            error += f" (at {svc['last_error_at']})"
        lines.append(
            f"{svc['name']:<14}{svc['state']:<10}{'yes' if svc['healthy'] else 'NO':<5}"
            f"{svc['restarts']:<10}{error}"
        )
    lines.append("")
    running = {svc["name"] for svc in services}
    for svc in services:
        if svc.get("summary"):
            lines.append(f"{svc['name']}: {svc['summary']}")
    for name, value in reply.items():
        if name not in running and isinstance(value, dict) and value == {"state": "disabled"}:
            lines.append(f"{name}: disabled")
    lines += _drain_lines(reply.get("drain"))
    return "\n".join(lines) + "\n"


def _drain_lines(drain: dict[str, Any] | None) -> list[str]:
    if not drain:
        return []
    state = "completed" if drain.get("completed") else f"at {drain.get('current_step')}"
    lines = [f"drain ({drain.get('reason', drain.get('key'))}): {state}, "
             f"{HELD[drain.get('deadline_held')]} (deadline {drain.get('deadline')})"]
    for step in drain.get("steps", []):
        lines.append(f"  {step['step']:<14}{step['seconds']:>8.2f}s  "
                     f"{'ok' if step['ok'] else step['error']}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
