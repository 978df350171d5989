"""The migration run: steps in order, each recorded in ``client_data`` when done.

pre-checks → create the intermediate instance → send the system disk → send each data disk
→ prepare the target (fstab, boot loader) → create the image → release the instance.
A rerun skips what is done and continues; an interrupted transfer resumes inside rsync.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from guestagent import process
from guestagent.files import atomic_write
from guestagent.migrate import prechecks, target, transfer
from guestagent.migrate.api import EcsClient
from guestagent.migrate.errors import MigrateError
from guestagent.migrate.settings import MigrateSettings
from guestagent.migrate.state import KEY_DIR, State
from guestagent.migrate.userconfig import UserConfig, in_root

log = logging.getLogger(__name__)

INSTANCE_NAME = "INSTANCE_FOR_GOTOALIYUN"
PROGRESS_EVERY = 2.0  # seconds between progress notes in client_data (for `migrate status`)
FINISHED, NOT_FINISHED = "Goto Aliyun Finished!", "Goto Aliyun Not Finished!"


@dataclass
class Session:
    """The intermediate instance's login for this run (the key is a 0600 file)."""

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    system_path: str
    data_paths: dict[int, str]

    def target(self, dest: str) -> transfer.Target:
        return transfer.Target(self.host, self.port, self.user, self.key_file,
                               self.known_hosts, dest)


class Migration:
    def __init__(self, config: UserConfig, root: Path, excludes: Path | None,
                 settings: MigrateSettings, *, out: TextIO = sys.stdout,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.root = root
        self.excludes = excludes
        self.settings = settings
        self.out = out
        self.sleep = sleep
        self.dir = config.directory
        self.state = State.load(self.dir)
        self.api = EcsClient(settings.endpoint_for(config.region_id), config.access_id,
                             config.secret_key, config.region_id, settings.api_timeout)
        self.session: Session | None = None
        self._scans: dict[str, transfer.SparseScan] = {}
        self._last_save = 0.0
        self._shown = -1

    # -- the plan --------------------------------------------------------------------------
    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        plan: list[tuple[str, Callable[[], None]]] = [
            ("prechecks", self.step_prechecks),
            ("create_instance", self.step_create_instance),
            ("transfer:system", lambda: self.step_transfer("/", self._system_path())),
        ]
        for disk in self.config.data_disks:
            plan.append((f"transfer:data{disk.index}", self._data_step(disk.src_path, disk.index)))
        plan += [("prepare_target", self.step_prepare_target),
                 ("create_image", self.step_create_image),
                 ("release_instance", self.step_release_instance)]
        return plan

    def _data_step(self, src_path: str, index: int) -> Callable[[], None]:
        return lambda: self.step_transfer(src_path, self._data_path(index))

    def run(self) -> bool:
        st = self.state
        if st.result == "finished" and st.image_name == self.config.image_name:
            self.say(f"already migrated: image {st.image_id} ({st.image_name})")
            self.say(FINISHED)
            return True
        if st.result == "finished" or (st.image_name and st.image_name != self.config.image_name
                                       and not st.instance_id):
            st = self.state = State(st.path)  # a new migration
        st.image_name = self.config.image_name
        st.client_token = st.client_token or uuid.uuid4().hex
        st.result, st.last_error = "running", []
        st.save()
        plan = self.steps()
        disks = [("transfer:system", "/")] + [(f"transfer:data{d.index}", d.src_path)
                                              for d in self.config.data_disks]
        for name, src_path in disks:
            if name not in st.done:
                self._sparse_scan(src_path)  # walks while the instance is being created
        try:
            for n, (name, action) in enumerate(plan, 1):
                if name in st.done and name != "prechecks":
                    self.say(f"[{n}/{len(plan)}] {name}: done earlier")
                    continue
                self.say(f"[{n}/{len(plan)}] {name}")
                st.current = name
                st.save()
                action()
                st.mark_done(name)
        except MigrateError as exc:
            return self._not_finished(exc.lines())
        st.result = "finished"
        st.save()
        self.say(f"image {st.image_id} ({st.image_name}) created in {self.config.region_id}")
        self.say(FINISHED)
        log.info("%s image %s", FINISHED, st.image_id)
        return True

    def _not_finished(self, lines: list[str]) -> bool:
        for line in lines:
            log.error("%s", line)
            self.say(line)
        self.state.result, self.state.last_error = "not finished", lines
        self.state.save()
        self.say(NOT_FINISHED)
        if self.state.log_file:
            self.say(f"log: {self.state.log_file}")
        log.error("%s", NOT_FINISHED)
        return False

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- steps -----------------------------------------------------------------------------
    def step_prechecks(self) -> None:
        findings = prechecks.run_all(self.root, self.config, self.dir)
        for finding in findings:
            for line in finding.lines():
                (log.info if finding.ok else log.warning)("%s", line)
                if not finding.ok:
                    self.say(line)
        fatal = [f for f in findings if not f.ok and f.fatal]
        if fatal:
            raise MigrateError(fatal[0].message, keyword=fatal[0].keyword)
        if "create_image" not in self.state.done:
            self._check_image_name()
        offset = self.api.clock_offset or 0.0
        if abs(offset) > self.settings.max_clock_skew:
            raise MigrateError(f"this server's clock is {offset:+.0f}s off the cloud's",
                               keyword="TimeStamp")

    def _check_image_name(self) -> None:
        found = self.api.call("DescribeImages", ImageName=self.config.image_name)
        images = found.get("Images", {}).get("Image", [])
        if any(i.get("ImageName") == self.config.image_name for i in images):
            raise MigrateError(f"an image named {self.config.image_name!r} already exists "
                               f"in {self.config.region_id}",
                               keyword="InvalidImageName.Duplicated")

    def step_create_instance(self) -> None:
        st = self.state
        if st.instance_id and not self._instance_exists(st.instance_id):
            log.warning("intermediate instance %s is gone: starting its steps over",
                        st.instance_id)
            st.forget_instance()
        if not st.instance_id:
            params: dict[str, Any] = {
                "InstanceName": INSTANCE_NAME, "SystemDisk.Size": self.config.system_disk_size,
                "Platform": self.config.platform, "Architecture": self.config.architecture,
                "ClientToken": st.client_token,
            }
            for n, disk in enumerate(self.config.data_disks, 1):
                params[f"DataDisk.{n}.Size"] = disk.size_gb
                params[f"DataDisk.{n}.Index"] = disk.index
            st.instance_id = str(self.api.call("CreateInstance", **params)["InstanceId"])
            st.save()
            log.info("intermediate instance %s created", st.instance_id)
        self._wait_running(st.instance_id)
        self.say(f"  intermediate instance {st.instance_id} ({INSTANCE_NAME})")

    def _instance_exists(self, instance_id: str) -> bool:
        found = self.api.call("DescribeInstances", InstanceIds=f'["{instance_id}"]')
        return bool(found.get("Instances", {}).get("Instance"))

    def _wait_running(self, instance_id: str, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while True:
            found = self.api.call("DescribeInstances", InstanceIds=f'["{instance_id}"]')
            items = found.get("Instances", {}).get("Instance", [])
            status = items[0].get("Status") if items else "Missing"
            if status == "Running":
                return
            if status == "Missing" or time.monotonic() > end:
                raise MigrateError(f"intermediate instance {instance_id} is {status}",
                                   retryable=True)
            self.sleep(2.0)

    def open_session(self) -> Session:
        """A fresh one-time SSH login to the intermediate instance (key kept 0600)."""
        if self.session is not None:
            return self.session
        got = self.api.call("CreateMigrationSession", InstanceId=self.state.instance_id)
        keys = self.dir / KEY_DIR
        keys.mkdir(mode=0o700, exist_ok=True)
        # Not fsynced: a session lives for one run; the next run asks for a new one.
        key_file = atomic_write(keys / "id_instance", str(got["PrivateKey"]), mode=0o600,
                                durable=False)
        host, port = str(got["Address"]), int(got["Port"])
        name = host if port == 22 else f"[{host}]:{port}"
        known = atomic_write(keys / "known_hosts", f"{name} {got['HostPublicKey']}\n",
                             mode=0o600, durable=False)
        disks = got.get("DataDisks", {}).get("DataDisk", [])
        self.session = Session(host, port, str(got.get("UserName", "root")), key_file, known,
                               str(got["SystemDiskPath"]),
                               {int(d["Index"]): str(d["Path"]) for d in disks})
        return self.session

    def _system_path(self) -> str:
        return self.open_session().system_path

    def _data_path(self, index: int) -> str:
        paths = self.open_session().data_paths
        if index not in paths:
            raise MigrateError(f"the intermediate instance has no data disk {index}")
        return paths[index]

    def step_transfer(self, src_path: str, dest: str) -> None:
        name = self.state.current
        user = transfer.read_user_excludes(self.excludes)
        data_paths = [d.src_path for d in self.config.data_disks]
        rules = transfer.disk_excludes(user, src_path, data_paths)
        excludes = transfer.write_excludes(
            self.dir / "client_keys" / f"excludes-{name.replace(':', '-')}.txt", rules)
        source = self.root if src_path == "/" else in_root(self.root, src_path)
        session = self.open_session()
        sparse = self._sparse_scan(src_path).result()
        argv = transfer.rsync_argv(source, session.target(dest), excludes,
                                   self.config.bandwidth_limit, sparse=sparse)
        retries = self.settings.transfer_retries
        for attempt in range(retries + 1):
            transfer.stop_stale(self.state.rsync_pid)
            outcome = transfer.run_rsync(argv, self._rsync_log(name), self._on_start,
                                         lambda p: self._on_progress(name, p))
            self._finish_progress()
            self._record(name, outcome, attempt)
            if outcome.ok:
                if outcome.returncode == transfer.VANISHED:
                    log.warning("%s: some files vanished while being sent", name)
                return
            self._raise_if_final(name, outcome, attempt, retries)
            delay = self.settings.retry_backoff * (2**attempt)
            self.say(f"  {name}: connection lost (rsync exit {outcome.returncode}); "
                     f"retrying in {delay:.0f}s ({attempt + 1}/{retries})")
            log.warning("%s: rsync exit %s, retry %s/%s: %s", name, outcome.returncode,
                        attempt + 1, retries, " | ".join(outcome.tail))
            self.sleep(delay)
            self.session = None  # a fresh login (and key) for the next attempt
            argv = transfer.rsync_argv(source, self.open_session().target(dest), excludes,
                                       self.config.bandwidth_limit, sparse=sparse)

    def _sparse_scan(self, src_path: str) -> transfer.SparseScan:
        """Whether the disk at ``src_path`` has holes (rsync -S only then), looked for once."""
        if src_path not in self._scans:
            source = self.root if src_path == "/" else in_root(self.root, src_path)
            skip = ([*transfer.DEFAULT_EXCLUDES, *(d.src_path for d in self.config.data_disks)]
                    if src_path == "/" else [])
            self._scans[src_path] = transfer.SparseScan(source, skip)
        return self._scans[src_path]

    def _raise_if_final(self, name: str, outcome: transfer.Outcome, attempt: int,
                        retries: int) -> None:
        if outcome.denied:
            shown = ", ".join(outcome.denied[:5]) + (" …" if len(outcome.denied) > 5 else "")
            raise MigrateError(f"rsync could not read {len(outcome.denied)} file(s): {shown}",
                               keyword="Permission denied")
        if not outcome.retryable or attempt >= retries:
            detail = " | ".join(outcome.tail[-3:])
            raise MigrateError(f"{name}: rsync failed (exit {outcome.returncode}) after "
                               f"{attempt + 1} attempt(s): {detail}")

    def _rsync_log(self, name: str) -> Path:
        return self.dir / "Logs" / f"rsync_{name.replace(':', '_')}.log"

    def _on_start(self, pid: int) -> None:
        self.state.rsync_pid = pid
        # Not fsynced: the pid only matters to a rerun on the same boot (the page cache has
        # it); after a power loss no rsync is left to stop.
        self.state.save(durable=False)

    def _on_progress(self, name: str, p: transfer.Progress) -> None:
        self.state.progress = {"step": name, "bytes": p.bytes, "percent": p.percent,
                               "rate": p.rate, "eta": p.eta}
        now = time.monotonic()
        if now - self._last_save >= PROGRESS_EVERY:
            self._last_save = now
            # No fsync: it would make ext4 flush the data rsync is writing on the same disk.
            self.state.save(durable=False)
        self._draw(p)

    def _draw(self, p: transfer.Progress) -> None:
        if self.out.isatty():
            bar = "#" * (p.percent // 4) + "-" * (25 - p.percent // 4)
            self.out.write(f"\r  [{bar}] {p.percent:3d}% {p.bytes / 2**20:10.1f} MB "
                           f"{p.rate:>12} ETA {p.eta}")
            self.out.flush()
        elif p.percent // 10 != self._shown:
            self._shown = p.percent // 10
            self.say(f"  {p.percent:3d}% {p.bytes / 2**20:.1f} MB {p.rate} ETA {p.eta}")

    def _finish_progress(self) -> None:
        if self.out.isatty():
            self.out.write("\n")
        self._shown = -1

    def _record(self, name: str, outcome: transfer.Outcome, attempt: int) -> None:
        entry = self.state.transfers.setdefault(name, {})
        entry["attempts"] = entry.get("attempts", 0) + 1
        for key, label in (("literal", "Literal data"), ("matched", "Matched data"),
                           ("sent", "Total bytes sent"), ("size", "Total transferred file size")):
            if label in outcome.stats:
                entry[key] = entry.get(key, 0) + outcome.stats[label]
        entry["last_exit"] = outcome.returncode
        self.state.rsync_pid = 0
        # Not fsynced: the step's end is recorded durably next (mark_done, or the run's
        # verdict); these counts only inform `migrate status`.
        self.state.save(durable=False)

    def step_prepare_target(self) -> None:
        data_paths = [d.src_path for d in self.config.data_disks]
        files = target.files_to_write(self.root, data_paths)
        session = self.open_session()
        for rel, content in files.items():
            dest = session.system_path.rstrip("/") + "/" + rel
            self._remote(session, f"cat > {shlex.quote(dest)}", content)
            log.info("target: %s rewritten", rel)

    def _remote(self, session: Session, command: str, data: bytes) -> None:
        argv = [*transfer.ssh_command(session.target("")).split(),
                f"{session.user}@{session.host}", command]
        res = process.run(argv, input=data, timeout=120)
        if not res.ok:
            err = res.stderr.decode(errors="replace").strip().splitlines()
            raise MigrateError(f"preparing the target failed: {err[-1] if err else res.returncode}",
                               keyword="Do Grub Failed", retryable=True)

    def step_create_image(self) -> None:
        got = self.api.call("CreateImage", InstanceId=self.state.instance_id,
                            ImageName=self.config.image_name, Platform=self.config.platform,
                            Architecture=self.config.architecture,
                            ClientToken=self.state.client_token + "-image")
        self.state.image_id = str(got["ImageId"])
        self.state.save()

    def step_release_instance(self) -> None:
        if self.state.instance_id and self._instance_exists(self.state.instance_id):
            self.api.call("DeleteInstance", InstanceId=self.state.instance_id)
        log.info("intermediate instance %s released", self.state.instance_id)
