"""The guide's log-count example: data, package and the independent count come from
``guestagent.tasks.example`` (shared with ``guestagent demo``); the job forms here."""

from __future__ import annotations

import json
from typing import Any

from guestagent.tasks import jobcfg
from guestagent.tasks.example import (  # noqa: F401 - re-exported to the tests
    LEVELS,
    copy_example,
    expected_counts,
    log_data,
    package_tarball,
)


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
