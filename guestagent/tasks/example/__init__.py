"""The BatchCompute guide's log-count example (split -> count x3 -> merge): its input log,
the count a reader makes independently, and the job (``job.cfg`` + the ``log-count``
package dir beside this file). Shared by ``guestagent demo`` and the task tests."""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent
LEVELS = ("INFO", "WARN", "ERROR", "DEBUG")


def log_data(lines: int = 3000, seed: int = 7) -> bytes:
    rng = random.Random(seed)  # noqa: S311 - sample data, not crypto
    out = []
    for i in range(lines):
        level = rng.choice(LEVELS)
        out.append(f"2016-07-06 10:{i // 60 % 60:02d}:{i % 60:02d} [{level}] event {i}\n")
    return "".join(out).encode()


def expected_counts(data: bytes) -> dict[str, int]:
    text = data.decode()
    return {level: sum(1 for line in text.splitlines() if level in line) for level in LEVELS}
