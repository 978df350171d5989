"""Turning a job file into a stored, Waiting job (the same code in the daemon and the CLI).

Everything is checked first; a local ``pack`` directory is snapshotted into the job's
directory so a later ``--resume`` runs the same code even if the directory changed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from guestagent.tasks import jobcfg
from guestagent.tasks.errors import JobError
from guestagent.tasks.model import Job
from guestagent.tasks.store import Store, new_job_id

log = logging.getLogger(__name__)

CLUSTER_NOTICE = ("AutoCluster/ClusterId are recorded with the job; on this one machine "
                  "they select nothing: every task runs here")


def create(store: Store, jobs_dir: Path, path: Path, flags: jobcfg.Flags,
           max_timeout: int) -> tuple[str, list[str]]:
    """Store the job described by ``path``; (job id, notices for the user)."""
    job, doc = jobcfg.load_job(path, flags, max_timeout)
    return create_from(store, jobs_dir, job, doc, max_timeout)


def create_from(store: Store, jobs_dir: Path, job: Job, doc: dict[str, Any],
                max_timeout: int) -> tuple[str, list[str]]:
    notices = [CLUSTER_NOTICE] if job.uses_cluster() else []
    job_id = new_job_id()
    job_dir = jobs_dir / job_id
    job_dir.mkdir(parents=True, mode=0o700)
    try:
        doc = _snapshot_packages(doc, job, job_dir)
        job = Job.parse(doc, max_timeout=max_timeout)
        store.create(job_id, job, doc)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    log.info("job %s (%s) submitted: %s tasks", job_id, job.name, len(job.tasks))
    return job_id, notices


def _snapshot_packages(doc: dict[str, Any], job: Job, job_dir: Path) -> dict[str, Any]:
    copies: dict[str, str] = {}
    for name, task in job.tasks.items():
        package = task.package_path
        if package is None or package.startswith("oss://"):
            continue
        if package not in copies:
            target = job_dir / "packages" / str(len(copies))
            source = Path(package)
            try:
                if source.is_dir():
                    shutil.copytree(source, target, symlinks=True)
                else:
                    target.mkdir(parents=True)
                    target = target / source.name
                    shutil.copy2(source, target)
            except OSError as exc:
                raise JobError(f"{name}: package {package}: cannot copy: {exc}") from None
            copies[package] = str(target)
        doc["DAG"]["Tasks"][name]["Parameters"]["Command"]["PackagePath"] = copies[package]
    return doc
