"""The BatchCompute guide's log-count example (split -> count x3 -> merge): its input log,
the count a reader makes independently, and the job (``job.cfg`` + the ``log-count``
package dir beside this file). Shared by ``guestagent demo`` and the task tests."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
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


def copy_example(dest: Path) -> Path:
    """The job.cfg and its package dir, as a user has them; returns the job.cfg path."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(HERE / "log-count", dest / "log-count",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HERE / "job.cfg", dest / "job.cfg")
    return dest / "job.cfg"


def package_tarball() -> bytes:
    """The package dir as a PackagePath tarball (worker.tar.gz)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted((HERE / "log-count").glob("*.py")):
            tar.add(path, arcname=path.name)
    return buf.getvalue()
