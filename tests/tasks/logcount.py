"""The guide's log-count example: its data, its package, the independent count."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

from guestagent.tasks import jobcfg

EXAMPLE = Path(__file__).parent.parent / "data" / "tasks"
LEVELS = ("INFO", "WARN", "ERROR", "DEBUG")


def log_data(lines: int = 3000, seed: int = 7) -> bytes:
    rng = random.Random(seed)
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
    shutil.copytree(EXAMPLE / "log-count", dest / "log-count",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(EXAMPLE / "job.cfg", dest / "job.cfg")
    return dest / "job.cfg"


def package_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted((EXAMPLE / "log-count").glob("*.py")):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def cfg_flags(bucket: str, input_dir: str, output_dir: str,
              docker: str | None = None) -> jobcfg.Flags:
    return jobcfg.Flags(
        read_mounts=[f"oss://{bucket}/log-count/:{input_dir}"],
        write_mounts=[f"oss://{bucket}/log-count/:{output_dir}"],
        docker=docker,
        env=[f"INPUT_DIR:{input_dir},OUTPUT_DIR:{output_dir}"],
    )


def json_job(bucket: str, input_dir: str, output_dir: str,
             docker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON form of the same job, with the guide's fields."""

    def task(cmd: str, count: int = 1) -> dict[str, Any]:
        env = {"INPUT_DIR": input_dir, "OUTPUT_DIR": output_dir, **(docker_env or {})}
        return {
            "InstanceCount": count, "MaxRetryCount": 0, "Timeout": 600,
            "AutoCluster": {"ResourceType": "OnDemand", "ImageId": "img-ubuntu",
                            "InstanceType": "ecs.sn1.medium"},
            "Parameters": {
                "Command": {"CommandLine": cmd, "EnvVars": env,
                            "PackagePath": f"oss://{bucket}/log-count/worker.tar.gz"},
                "InputMappingConfig": {"Lock": True},
                "StdoutRedirectPath": f"oss://{bucket}/log-count/logs/",
                "StderrRedirectPath": f"oss://{bucket}/log-count/logs/",
            },
            "InputMapping": {f"oss://{bucket}/log-count/": input_dir},
            "OutputMapping": {output_dir: f"oss://{bucket}/log-count/"},
            "LogMapping": {},
        }

    doc = {
        "Name": "log-count", "Type": "DAG", "Description": "batchcompute job", "Priority": 0,
        "JobFailOnInstanceFail": True,
        "DAG": {"Tasks": {"split": task("python3 split.py"), "count": task("python3 count.py", 3),
                          "merge": task("python3 merge.py")},
                "Dependencies": {"split": ["count"], "count": ["merge"]}},
    }
    return json.loads(json.dumps(doc))
