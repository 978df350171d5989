"""Docker mode: the instance runs in a container of the task's image (the ``docker`` SDK).

The image named by ``BATCH_COMPUTE_DOCKER_IMAGE`` is pulled through the agent-run
registry over ``BATCH_COMPUTE_DOCKER_REGISTRY_OSS_PATH`` (one registry per OSS path, kept
running, as BatchCompute does); the registry part of the user's name (the
``localhost:5000/`` they pushed with) is replaced by ours. Without a registry path the
image must already be in the engine. The container is not privileged, runs as root in
``/batchcompute/workdir`` with the guide's environment, the work dir, read-only inputs and
output dirs bind-mounted. Its two streams are followed into the instance's stdout/stderr
files while it runs (``tasks logs -f`` shows them live), and copied whole once more when
it ends; the container is removed only then, so an agent restart finds it (and its exit
code) again by id, and follows its logs again from the start. A dockerd restart ends the
container: the attempt fails with the engine's word for it and is retried per
``MaxRetryCount``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guestagent.files import atomic_write
from guestagent.tasks import rules
from guestagent.tasks.errors import TaskError
from guestagent.tasks.runner import Launch
from guestagent.tasks.settings import TasksSettings

if TYPE_CHECKING:
    from guestagent.tasks.ossregistry import OssRegistry

log = logging.getLogger(__name__)

# How long one call may wait on the engine (a dockerd restart makes calls fail meanwhile).
API_TIMEOUT = 60
PULL_TIMEOUT = 600
# How long the end of a container waits for its log followers to write their last bytes.
PUMP_LINGER = 2.0

RegistryFactory = Callable[[str], "OssRegistry"]


def _client(base_url: str, timeout: int | None = API_TIMEOUT) -> Any:
    import docker  # type: ignore[import-untyped,unused-ignore]  # only Docker mode pays

    return docker.DockerClient(base_url=base_url, timeout=timeout)


def _errors() -> tuple[type[BaseException], ...]:
    import docker.errors  # type: ignore[import-untyped,unused-ignore]
    import requests.exceptions  # type: ignore[import-untyped,unused-ignore]

    return (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class _LogPump:
    """Follows one stream of a container into a file while it runs. The file is written
    from the container's first byte (truncated first), so a pump started again after an
    agent restart leaves no duplicate; the stream ends when the container stops."""

    def __init__(self, runner: DockerRunner, ref: str, path: Path, stream: str) -> None:
        self.runner, self.ref, self.path, self.stream = runner, ref, path, stream
        self.thread = threading.Thread(target=self._run, name=f"logs-{stream}-{ref[:12]}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = None
        try:
            # No read timeout: a quiet container may stay silent for hours.
            client = _client(self.runner.base_url, timeout=None)
            chunks = client.api.logs(self.ref, stdout=self.stream == "stdout",
                                     stderr=self.stream == "stderr", stream=True, follow=True)
            # Streaming into the live log (not atomic_write): the whole copy replaces it
            # atomically when the container ends.
            with self.path.open("wb", buffering=0) as out:
                for chunk in chunks:
                    out.write(chunk)
        except Exception as exc:  # the end-of-run copy still has everything
            log.debug("following the %s of %s: %s", self.stream, self.ref[:12], exc)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()


class _Container:
    def __init__(self, runner: DockerRunner, container_id: str, launch: Launch) -> None:
        self.runner = runner
        self.ref = container_id
        self.launch = launch
        self._code: int | None = None
        self._pumps = [_LogPump(runner, container_id, launch.stdout, "stdout"),
                       _LogPump(runner, container_id, launch.stderr, "stderr")]

    def _finish(self, code: int) -> int:
        """Logs to the instance's files, container removed; once."""
        if self._code is None:
            for pump in self._pumps:
                pump.thread.join(PUMP_LINGER)  # its stream ends with the container
            self.runner.collect(self.ref, self.launch)
            self._code = code
        return self._code

    def wait(self, timeout: float | None) -> int | None:
        if self._code is not None:
            return self._code
        try:
            status = self.runner.status(self.ref)
        except _errors() as exc:
            log.debug("engine unreachable while waiting for %s: %s", self.launch.name, exc)
            time.sleep(min(timeout or 1.0, 1.0))
            return None
        if status is None:
            # Removed behind our back: nothing to collect.
            self._code = 255
            return self._code
        running, code = status
        if not running:
            return self._finish(code)
        if timeout:
            try:
                result = self.runner.client(timeout=max(1, int(timeout + 0.999))) \
                    .api.wait(self.ref, timeout=timeout)
                return self._finish(int(result.get("StatusCode", 255)))
            except _errors():
                return None
        return None

    def stop(self, grace: float) -> int | None:
        try:
            self.runner.client(timeout=int(grace) + API_TIMEOUT).api.stop(
                self.ref, timeout=max(1, round(grace)))
        except _errors() as exc:
            log.warning("stopping %s: %s", self.launch.name, exc)
        end = time.monotonic() + grace + API_TIMEOUT
        while time.monotonic() < end:
            code = self.wait(1.0)
            if code is not None:
                return code
        return None


class DockerRunner:
    kind = "docker"

    def __init__(self, settings: TasksSettings,
                 registries: RegistryFactory | None = None) -> None:
        self.settings = settings
        self.base_url = settings.docker_host
        self._registries: dict[str, OssRegistry] = {}
        self._factory = registries
        self._lock = threading.Lock()
        self._pulled: set[str] = set()

    def client(self, timeout: int = API_TIMEOUT) -> Any:
        return _client(self.base_url, timeout)

    def close(self) -> None:
        with self._lock:
            for reg in self._registries.values():
                reg.stop()
            self._registries.clear()

    # -- image ----------------------------------------------------------------------------

    def _registry(self, path: str) -> OssRegistry:
        with self._lock:
            reg = self._registries.get(path)
            if reg is not None and reg.alive():
                return reg
            if self._factory is None:
                raise TaskError("no registry can be run for "
                                f"{rules.DOCKER_REGISTRY_VAR}={path}: OSS is not configured")
            reg = self._factory(path)
            reg.start()
            self._registries[path] = reg
            return reg

    def image_for(self, launch: Launch) -> str:
        """The reference to run: pulled through the OSS-backed registry when one is named."""
        image = launch.image
        assert image is not None
        path = launch.env.get(rules.DOCKER_REGISTRY_VAR)
        if not path:
            return image
        repo, tag = rules.image_parts(image)
        reg = self._registry(path)
        ref = reg.image(f"{repo}:{tag}")
        with self._lock:
            if ref in self._pulled:
                return ref
        try:
            self.client(timeout=PULL_TIMEOUT).images.pull(ref.rsplit(":", 1)[0],
                                                          tag=ref.rsplit(":", 1)[1])
        except _errors() as exc:
            raise TaskError(f"image {image} could not be pulled from "
                            f"{path}: {_short(exc)}") from None
        with self._lock:
            self._pulled.add(ref)
        return ref

    # -- containers -------------------------------------------------------------------------

    def start(self, launch: Launch) -> _Container:
        ref = self.image_for(launch)
        volumes = {b.host: {"bind": b.target, "mode": "ro" if b.read_only else "rw"}
                   for b in launch.binds}
        for b in launch.binds:
            if not b.read_only:
                with contextlib.suppress(OSError):
                    os.makedirs(b.host, exist_ok=True)
        try:
            container = self.client().containers.create(
                ref, command=list(launch.argv), environment=dict(launch.env),
                working_dir="/batchcompute/workdir", user="root", privileged=False,
                volumes=volumes, labels=dict(launch.labels), name=_name(launch.name),
                network_mode="bridge", detach=True,
            )
            container.start()
        except _errors() as exc:
            raise TaskError(f"{launch.name}: container did not start: {_short(exc)}") from None
        return _Container(self, str(container.id), launch)

    def adopt(self, ref: str, launch: Launch) -> _Container | None:
        try:
            ref = ref or self._by_labels(launch)
            if not ref:
                return None
            status = self.status(ref)
        except _errors() as exc:
            raise TaskError(f"{launch.name}: the engine cannot be asked: {_short(exc)}") from None
        if status is None:
            return None
        return _Container(self, ref, launch)

    def _by_labels(self, launch: Launch) -> str:
        """The attempt's container found by its labels (the agent died before saving its
        id), or ""."""
        labels = [f"{k}={v}" for k, v in launch.labels.items()]
        found = self.client().containers.list(all=True, filters={"label": labels})
        return str(found[0].id) if found else ""

    def status(self, ref: str) -> tuple[bool, int] | None:
        """(running, exit code) of the container, None if it no longer exists."""
        import docker.errors  # type: ignore[import-untyped,unused-ignore]

        try:
            info = self.client().api.inspect_container(ref)
        except docker.errors.NotFound:
            return None
        state = info.get("State", {})
        return bool(state.get("Running")), int(state.get("ExitCode", 255))

    def collect(self, ref: str, launch: Launch) -> None:
        try:
            api = self.client().api
            out = api.logs(ref, stdout=True, stderr=False)
            err = api.logs(ref, stdout=False, stderr=True)
            atomic_write(launch.stdout, out)
            atomic_write(launch.stderr, err)
            api.remove_container(ref, force=True)
        except _errors() as exc:
            log.warning("collecting %s: %s", launch.name, _short(exc))


def bridge_interface(base_url: str) -> str:
    """The host interface of the engine's default bridge network (OSError if unknown)."""
    from guestagent import process

    try:
        net = _client(base_url).networks.get("bridge").attrs
    except _errors() as exc:
        raise OSError(f"the Docker engine at {base_url} cannot be asked: {_short(exc)}") from None
    name = (net.get("Options") or {}).get("com.docker.network.bridge.name")
    if name:
        return str(name)
    configs = (net.get("IPAM") or {}).get("Config") or [{}]
    gateway = configs[0].get("Gateway", "")
    res = process.run(["ip", "-o", "-4", "addr", "show"], timeout=10)
    for line in res.text().splitlines():
        fields = line.split()
        if gateway and len(fields) > 3 and fields[3].split("/")[0] == gateway:
            return fields[1]
    raise OSError(f"no host interface holds the bridge gateway {gateway or '(none)'}")


def _name(text: str) -> str:
    return "ga-" + "".join(c if c.isalnum() or c in "_.-" else "-" for c in text)[:120]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
