"""Act 5: tasks — the BatchCompute guide's log-count job (split -> count x3 -> merge) with
``guestagent tasks submit --wait``, as a user has it (job.cfg, a local package dir, the
``bcs sub`` flags), run by the daemon's tasks service in host mode, then in Docker mode
with an image pushed to the OSS-backed registry. The merged result is read from OSS
directly and checked against the demo's own count of the input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.demo.cloud import LocalCloud
from guestagent.demo.common import BUCKET, DemoFailed, check, cli, say
from guestagent.tasks.example import copy_example, expected_counts, log_data

IMAGE = "localpython:latest"
NO_REGISTRY = "no registry can be run"


def run(cloud: LocalCloud, agent: Any, workdir: Path) -> None:
    data = log_data(lines=6000, seed=11)
    job_cfg = copy_example(workdir / "user")
    say("act 5: tasks — the guide's log-count job, host mode")
    print(f"   {job_cfg} (+ package dir {job_cfg.parent / 'log-count'}):")
    for line in job_cfg.read_text().splitlines():
        print(f"     {line}")
    prefix = "log-count/"
    _input(cloud, agent, workdir, prefix, data)
    inp, out = workdir / "home" / "input", workdir / "home" / "output"
    _submit(cloud, agent, job_cfg, prefix, data, inp=str(inp), out=str(out),
            extra=["-e", f"INPUT_DIR:{inp},OUTPUT_DIR:{out}"])

    if cloud.engine is None:
        print(f"\n== tasks, Docker mode: skipped, {cloud.docker_skipped}")
        return
    say("act 5b: tasks — the same job in Docker mode, image from the OSS-backed registry")
    prefix = "log-count-docker/"
    _input(cloud, agent, workdir, prefix, data)
    registry_path = f"oss://{BUCKET}/dockers/"
    _push_image(cloud, agent, workdir, registry_path)
    # The guide's own command: bcs sub --file job.cfg -r ...:/home/input
    #   -w ...:/home/output --docker localhost:5000/myubuntu@oss://your-bucket/dockers/
    try:
        _submit(cloud, agent, job_cfg, prefix, data, inp="/home/input", out="/home/output",
                extra=["--docker", f"localhost:5000/myubuntu@{registry_path}"])
    except DemoFailed as exc:
        if NO_REGISTRY not in str(exc):
            raise
        # This build's daemon runs no registry of its own yet: say so, and run the same
        # job in Docker with the image the engine already holds (the guide's other way).
        print(f"   Docker through the OSS-backed registry: not run, the daemon's tasks "
              f"service says '{NO_REGISTRY}'; the same job with the image in the engine:")
        prefix = "log-count-docker-local/"
        _input(cloud, agent, workdir, prefix, data)
        _submit(cloud, agent, job_cfg, prefix, data, inp="/home/input", out="/home/output",
                extra=["-e", f"BATCH_COMPUTE_DOCKER_IMAGE:{IMAGE}"])


def _input(cloud: LocalCloud, agent: Any, workdir: Path, prefix: str, data: bytes) -> None:
    local = workdir / "user" / "log-count-data.txt"
    local.write_bytes(data)
    cli(agent.config_path, "storage", "cp", str(local),
        f"oss://{BUCKET}/{prefix}log-count-data.txt", "--json", show=False)
    print(f"   input: {len(data)} bytes of log at oss://{BUCKET}/{prefix}log-count-data.txt")


def _submit(cloud: LocalCloud, agent: Any, job_cfg: Path, prefix: str, data: bytes, *,
            inp: str, out: str, extra: list[str]) -> None:
    url = f"oss://{BUCKET}/{prefix}"
    res = cli(agent.config_path, "tasks", "submit", str(job_cfg), "--wait",
              "-r", f"{url}:{inp}", "-w", f"{url}:{out}", *extra, timeout=900)
    job_id = res.text().strip().splitlines()[-1]
    check(job_id.startswith("job-"), f"{job_id} Finished (submit --wait exited 0)")
    cli(agent.config_path, "tasks", "show", job_id)
    try:
        merged = json.loads(cloud.get(prefix + "merge_result.txt"))
    except (OSError, ValueError) as exc:
        raise DemoFailed(f"{url}merge_result.txt: not readable: {exc}") from None
    want = expected_counts(data)
    check(merged == want, f"{url}merge_result.txt {merged} equals the demo's own count")
    parts = [f"count_results/{i}.txt" for i in range(3)]
    listing = cli(agent.config_path, "storage", "ls", "-r", url, show=False).text()
    check(all(p in listing for p in parts), f"the three count outputs are in {url}")


def _push_image(cloud: LocalCloud, agent: Any, workdir: Path, registry_path: str) -> None:
    """What the user did beforehand: build an image and push it to the registry on OSS."""
    from guestagent.localcloud import baseimages
    from guestagent.tasks.ossregistry import OssRegistry, RegistryError, RegistryStorage

    tarball = baseimages.CACHE / "debian-python.tar"
    if not tarball.exists():
        print("   building a Debian 12 minbase + python3 image (debootstrap; a few minutes)")
        try:
            tarball = baseimages.python_tarball(cache=workdir / "images")
        except baseimages.ImageBuildError as exc:
            raise DemoFailed(f"base image: {exc}") from None
    host = cloud.engine.host
    baseimages.import_image(host, tarball, IMAGE)
    port = agent.config["credentials"]["tcp_port"]
    # The registry's AWS SDK gets keys from the agent's EC2-style route (IMDSv2 handshake).
    registry = OssRegistry(RegistryStorage.parse(registry_path), cloud.oss_url, "us-east-1",
                           f"http://127.0.0.1:{port}", workdir / "registry-push")
    try:
        registry.start()
    except RegistryError as exc:
        raise DemoFailed(f"registry for the push: {exc}") from None
    try:
        ref = registry.image("myubuntu:latest")
        for args in (["tag", IMAGE, ref], ["push", ref], ["rmi", ref]):
            print(f"$ docker {' '.join(args)}")
            res = process.run(["docker", "-H", host, *args], timeout=600)
            if not res.ok:
                why = res.stderr.decode(errors="replace").strip().splitlines()[-1:]
                raise DemoFailed(f"docker {args[0]}: {' '.join(why)}")
    finally:
        registry.stop()
    check(True, f"image myubuntu:latest stored under {registry_path}docker/registry/v2/")
