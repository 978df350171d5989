"""Task launcher figures, each beside its peer from the same run.

    python bench/tasks.py [--rounds 10] [--instances 1000] [--repeat 5] [--image-mb 100]
                          [--skip-docker]

1. Launch overhead with a warm image: one-instance job (``true`` in busybox) through the
   scheduler and the Docker runner, submit to Finished, against ``docker run --rm`` of the
   same image and command. Target: <= +300 ms.
2. Pull of a ~100 MB image through the OSS-backed registry (docker-registry, s3 driver,
   over moto's S3: ``rclone serve s3``'s multipart listing crashes distribution 2.8's s3
   driver) against the same docker-registry with its filesystem driver on local disk.
3. Scheduling overhead of a job of N short host instances (``sleep 0.05``) at the
   concurrency limit: wall time minus the ideal (sum of work / limit), per instance,
   against the same commands run by a bare process pool (threads running
   ``subprocess.run``) of the same size; ``--repeat`` rounds of each, alternately, and
   their medians (the machine is shared), with the CPU each spends per instance.

Needs root, dockerd, docker-registry, rclone (scripts/bootstrap installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guestagent import process
from guestagent.tasks.docker import DockerRunner
from guestagent.tasks.model import Job
from guestagent.tasks.runner import HostRunner
from guestagent.tasks.scheduler import Scheduler
from guestagent.tasks.settings import TasksSettings
from guestagent.tasks.store import Store
from guestagent.tasks.submit import create_from


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(tasks: dict[str, Any]) -> tuple[Job, dict[str, Any]]:
    doc = {"Name": "bench", "Type": "DAG", "DAG": {"Tasks": tasks, "Dependencies": {}}}
    return Job.parse(doc), doc


def _docker(host: str, *args: str, timeout: float = 600) -> process.Result:
    res = process.run(["docker", "-H", host, *args], timeout=timeout)
    if not res.ok:
        raise SystemExit(f"docker {' '.join(args)}: {res.stderr.decode().strip()}")
    return res


def launch_overhead(engine: Any, image: str, work: Path, rounds: int) -> None:
    settings = TasksSettings(docker_host=engine.host, max_parallel=1)
    sched = Scheduler(Store(work / "launch.db"), settings, work / "launch-jobs",
                      {"host": HostRunner(), "docker": DockerRunner(settings)})
    ours, peer = [], []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        _docker(engine.host, "run", "--rm", image, "true")
        peer.append(time.perf_counter() - start)
        job, doc = _job({"t": {"Parameters": {"Command": {
            "CommandLine": "true", "EnvVars": {"BATCH_COMPUTE_DOCKER_IMAGE": image}}}}})
        job_id, _ = create_from(sched.store, sched.jobs_dir, job, doc, 21600)
        start = time.perf_counter()
        state = sched.run(job_id)
        ours.append(time.perf_counter() - start)
        assert state == "Finished", state
    ours, peer = ours[1:], peer[1:]  # the first round warms caches
    o, p = statistics.median(ours), statistics.median(peer)
    print(f"launch (warm image, median of {rounds}): guestagent {o * 1000:.0f} ms, "
          f"docker run --rm {p * 1000:.0f} ms, overhead {(o - p) * 1000:+.0f} ms "
          "(target <= +300 ms)")


def _big_image(engine: Any, base_tar: Path, megabytes: int, work: Path) -> str:
    root = work / "bigroot"
    with tarfile.open(base_tar) as tar:
        tar.extractall(root, filter="tar")
    with (root / "payload.bin").open("wb") as fh:
        for _ in range(megabytes):
            fh.write(os.urandom(1 << 20))
    out = work / "big.tar"
    with tarfile.open(out, "w") as tar:
        tar.add(root, arcname=".")
    from guestagent.localcloud import baseimages

    return baseimages.import_image(engine.host, out, "benchbig:latest")


def _registry(config: dict[str, Any], workdir: Path, env: dict[str, str]) -> process.Child:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yml"
    path.write_text(json.dumps(config))
    child = process.spawn(["docker-registry", "serve", str(path)], env=env,
                          log_path=workdir / "registry.log")
    addr = config["http"]["addr"]
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            with socket.create_connection(tuple(addr.split(":")), timeout=0.5):  # type: ignore[arg-type]
                return child
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"registry did not start: {(workdir / 'registry.log').read_text()[-500:]}")


def pull_compare(engine: Any, image: str, work: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # moto: rclone serve s3's multipart listing crashes distribution 2.8's s3 driver.
    s3_port = _free_port()
    rclone = process.spawn(["moto_server", "-H", "127.0.0.1", "-p", str(s3_port)],
                           log_path=work / "moto.log")
    time.sleep(2.0)
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="benchsecret"
                 ).create_bucket(Bucket="images")
    oss_port, disk_port = _free_port(), _free_port()
    s3_env = dict(clean, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="benchsecret",
                  AWS_EC2_METADATA_DISABLED="true")
    oss = _registry({"version": 0.1, "log": {"level": "error"}, "storage": {
        "s3": {"region": "us-east-1", "regionendpoint": f"http://127.0.0.1:{s3_port}",
               "bucket": "images", "rootdirectory": "/dockers", "secure": False,
               "v4auth": True},
        "redirect": {"disable": True}, "delete": {"enabled": True},
        "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{oss_port}"}},
        work / "reg-oss", s3_env)
    disk = _registry({"version": 0.1, "log": {"level": "error"}, "storage": {
        "filesystem": {"rootdirectory": str(work / "regdisk")}},
        "http": {"addr": f"127.0.0.1:{disk_port}"}}, work / "reg-disk", clean)
    try:
        figures = {}
        for label, port in (("OSS-backed (moto S3)", oss_port), ("local disk", disk_port)):
            ref = f"127.0.0.1:{port}/bench/big:1"
            _docker(engine.host, "tag", image, ref)
            _docker(engine.host, "push", ref)
            # No layer of it may stay in the engine: the pull must fetch them all.
            _docker(engine.host, "rmi", ref, image)
            start = time.perf_counter()
            _docker(engine.host, "pull", ref)
            figures[label] = time.perf_counter() - start
            image = "benchbig:latest"
            _docker(engine.host, "tag", ref, image)
            _docker(engine.host, "rmi", ref)
        size = sum(f.stat().st_size for f in (work / "regdisk").rglob("*") if f.is_file())
        print(f"pull of a {size / 1e6:.0f} MB image: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in figures.items()))
    finally:
        oss.stop(5)
        disk.stop(5)
        rclone.stop(5)


def _cpu_ms(before: Any, after: Any, n: int) -> float:
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000 / n


def _ours(work: Path, instances: int, work_s: float, round_: int) -> tuple[float, int, float]:
    """(wall seconds, concurrency limit, CPU ms per instance of the agent and its children)."""
    settings = TasksSettings(kill_grace=2.0)
    sched = Scheduler(Store(work / f"sched-{round_}.db"), settings, work / f"sched-{round_}",
                      {"host": HostRunner()})
    per_task = 500
    tasks = {f"t{n}": {"InstanceCount": min(per_task, instances - n * per_task),
                       "Parameters": {"Command": {"CommandLine": f"sleep {work_s}"}}}
             for n in range((instances + per_task - 1) // per_task)}
    job, doc = _job(tasks)
    job_id, _ = create_from(sched.store, sched.jobs_dir, job, doc, 21600)
    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    start = time.perf_counter()
    state = sched.run(job_id)
    wall = time.perf_counter() - start
    after = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    assert state == "Finished", state
    sched.store.close()
    cpu = _cpu_ms(usage[0], after[0], instances) + _cpu_ms(usage[1], after[1], instances)
    return wall, sched.limit, cpu


def _bare(instances: int, work_s: float, limit: int) -> tuple[float, float]:
    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    start = time.perf_counter()
    with ThreadPoolExecutor(limit) as pool:
        list(pool.map(lambda _: subprocess.run(["sleep", str(work_s)], check=True),
                      range(instances)))
    wall = time.perf_counter() - start
    after = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return wall, _cpu_ms(usage[0], after[0], instances) + _cpu_ms(usage[1], after[1], instances)


def scheduling_overhead(work: Path, instances: int, work_s: float, repeat: int) -> None:
    """Ours and the bare pool alternately, ``repeat`` times each (the machine is shared:
    medians, and the CPU each spends per instance, which load disturbs less)."""
    ours, peer, ours_cpu, peer_cpu = [], [], [], []
    for round_ in range(repeat):
        wall, limit, cpu = _ours(work, instances, work_s, round_)
        ideal = instances * work_s / limit
        ours.append((wall - ideal) * 1000 / instances)
        ours_cpu.append(cpu)
        wall, cpu = _bare(instances, work_s, limit)
        peer.append((wall - ideal) * 1000 / instances)
        peer_cpu.append(cpu)
        print(f"  round {round_ + 1}: guestagent {ours[-1]:.1f} ms/instance "
              f"(CPU {ours_cpu[-1]:.2f} ms), bare pool {peer[-1]:.1f} ms/instance "
              f"(CPU {peer_cpu[-1]:.2f} ms)", flush=True)
    o, p = statistics.median(ours), statistics.median(peer)
    print(f"{instances} host instances of {work_s}s at {limit} in parallel, median of "
          f"{repeat}: scheduling overhead guestagent {o:.1f} ms/instance, bare process pool "
          f"{p:.1f} ms/instance ({o / p if p > 0 else float('inf'):.1f}x); CPU per instance "
          f"{statistics.median(ours_cpu):.2f} ms vs {statistics.median(peer_cpu):.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--work", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=5, help="rounds of the scheduling figure")
    ap.add_argument("--image-mb", type=int, default=100)
    ap.add_argument("--skip-docker", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    try:
        scheduling_overhead(work, args.instances, args.work, args.repeat)
        if args.skip_docker or shutil.which("dockerd") is None:
            print("docker figures skipped")
            return
        from guestagent.localcloud import baseimages
        from guestagent.localcloud.dockerd import DockerEngine

        with DockerEngine(work / "dockerd") as engine:
            base = baseimages.busybox_tarball()
            image = baseimages.import_image(engine.host, base, "benchbusybox:latest")
            launch_overhead(engine, image, work, args.rounds)
            big = _big_image(engine, base, args.image_mb, work)
            pull_compare(engine, big, work)
    finally:
        threading.Thread(target=shutil.rmtree, args=(work,), kwargs={"ignore_errors": True}
                         ).run()


if __name__ == "__main__":
    main()
