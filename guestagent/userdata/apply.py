"""First-boot application of user-data.

Order of events: decode and split (refusing what we cannot read), parse every
``#cloud-config`` part and merge them, add metadata defaults for what the user-data says
nothing about, plan every handler (each validates its input) and ``sh -n`` every script —
all before the first write. Then each handler applies in its own transaction (a failure
puts its files back and the others still run), and the scripts run with a timeout, their
exit codes recorded. Semaphores keep per-instance work from running twice on one instance.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guestagent import process
from guestagent.files import atomic_write
from guestagent.userdata import cloudconfig, parts, stages
from guestagent.userdata.errors import UserdataError
from guestagent.userdata.handlers import Context, Handler, all_handlers, supported_keys
from guestagent.userdata.semaphores import PER_INSTANCE, Semaphores
from guestagent.userdata.settings import UserdataSettings
from guestagent.userdata.tree import Tree

log = logging.getLogger(__name__)

SCRIPTS = "scripts"
_OUTPUT_LINES = 20


@dataclass(frozen=True)
class Defaults:
    """Values from metadata used when the user-data says nothing about them."""

    nameservers: tuple[str, ...] = ()
    ntp_servers: tuple[str, ...] = ()
    mirrors: tuple[str, ...] = ()


@dataclass
class Outcome:
    name: str
    kind: str  # handler, script, part
    status: str  # applied, unchanged, skipped, deferred, ignored, failed, would-run
    detail: str = ""
    exit_code: int | None = None
    seconds: float = 0.0


@dataclass
class Report:
    instance_id: str
    outcomes: list[Outcome] = field(default_factory=list)
    diff: str = ""
    warnings: list[str] = field(default_factory=list)
    stage: str | None = None
    started_at: str = ""
    finished_at: str = ""

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage or "all",
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "instance_id": self.instance_id,
            "outcomes": [asdict(o) for o in self.outcomes],
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class Prepared:
    """Decoded, validated user-data: what will be applied."""

    config: dict[str, Any]
    scripts: list[parts.Part]
    ignored: list[parts.Part]
    unsupported_keys: list[str]
    cloud_config_parts: int


def prepare(data: bytes | None, settings: UserdataSettings) -> Prepared:
    """Decode, split and parse; raise UserdataError on anything we cannot read."""
    if not data or not data.strip():
        return Prepared({}, [], [], [], 0)
    decoded = parts.decode(data, settings.max_size, settings.max_decoded_size)
    config: dict[str, Any] = {}
    scripts: list[parts.Part] = []
    ignored: list[parts.Part] = []
    n_cc = 0
    for part in parts.split(decoded):
        if part.kind == parts.CLOUD_CONFIG:
            doc = cloudconfig.load(part.content, part.name)
            config = cloudconfig.merge(config, doc, append=cloudconfig.wants_append(doc))
            n_cc += 1
        elif part.kind == parts.SHELL:
            scripts.append(part)
        else:
            ignored.append(part)
    unsupported = sorted(set(config) - supported_keys())
    return Prepared(config, scripts, ignored, unsupported, n_cc)


def check_script(part: parts.Part) -> None:
    """``sh -n`` (for sh/bash scripts) so a syntax error is refused before anything runs."""
    first = part.content.split(b"\n", 1)[0]
    if not any(s in first for s in (b"/sh", b"/bash", b"env sh", b"env bash", b"/dash")):
        return
    shell = "bash" if b"bash" in first else "sh"
    try:
        res = process.run(
            [shell, "-n"],
            input=part.content,
            timeout=30,
            memory_limit=256 << 20,
            die_with_parent=True,
        )
    except process.ProcessError as exc:
        raise UserdataError(f"{part.name}: cannot check shell syntax: {exc}") from None
    if not res.ok:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise UserdataError(f"{part.name}: shell syntax error: {err[0] if err else 'sh -n failed'}")


def with_defaults(
    config: Mapping[str, Any],
    mentioned: set[str],
    defaults: Defaults,
    settings: UserdataSettings,
    tree: Tree,
) -> tuple[dict[str, Any], list[str]]:
    """Metadata defaults for DNS, NTP and the mirror where the user-data (whose keys are
    ``mentioned``) is silent."""
    out = dict(config)
    mentioned = mentioned | set(out)
    used: list[str] = []
    if (
        settings.default_dns
        and defaults.nameservers
        and not {"resolv_conf", "manage_resolv_conf"} & mentioned
    ):
        out["manage_resolv_conf"] = True
        out["resolv_conf"] = {"nameservers": list(defaults.nameservers[:3])}
        used.append("dns")
    if settings.default_ntp and defaults.ntp_servers and "ntp" not in mentioned:
        out["ntp"] = {"enabled": True, "servers": list(defaults.ntp_servers)}
        used.append("ntp")
    if settings.default_mirror and defaults.mirrors and not {"yum_repos", "apt"} & mentioned:
        mirror = mirror_config(defaults.mirrors[0], tree)
        if mirror:
            out.update(mirror)
            used.append("mirror")
    return out, used


def mirror_config(mirror: str, tree: Tree) -> dict[str, Any] | None:
    """The ECS mirror (``source-address``) as a repository for this tree's distribution."""
    release = tree.read_text("/etc/os-release") or ""
    fields = dict(line.split("=", 1) for line in release.splitlines() if "=" in line)
    distro = fields.get("ID", "").strip("\"'")
    base = mirror.rstrip("/")
    if distro in ("debian", "ubuntu") and tree.exists("/etc/apt"):
        src = f"deb {base}/{distro}/ $RELEASE main"
        return {"apt": {"sources": {"guestagent-mirror": {"source": src}}}}
    if distro == "centos" and tree.exists("/etc/yum.repos.d"):
        url = f"{base}/centos/$releasever/os/$basearch/"
        return {
            "yum_repos": {
                "guestagent-mirror": {
                    "name": "ECS mirror",
                    "baseurl": url,
                    "enabled": True,
                    "gpgcheck": False,
                }
            }
        }
    log.info("mirror default: no layout known for %r; skipped", distro or "this distribution")
    return None


def _report_ignored(prepared: Prepared, report: Report) -> None:
    """Parts not for us (Windows, unknown types): a warning and an outcome each."""
    for part in prepared.ignored:
        msg = f"{part.name}: {part.skipped_because()}"
        log.warning("%s", msg)
        report.warnings.append(msg)
        what = "Windows user-data" if part.kind == parts.WINDOWS else part.mime
        report.outcomes.append(Outcome(part.name, "part", "ignored", what))


def _user_config(prepared: Prepared, deferred: bool, report: Report) -> dict[str, Any]:
    """The user's cloud-config to apply: none when cloud-init takes the user-data, else
    all of it, with a warning for each key only cloud-init would apply."""
    if deferred and (prepared.cloud_config_parts or prepared.scripts):
        msg = "cloud-init is installed and enabled: user-data left to it"
        log.info("%s", msg)
        report.warnings.append(msg)
        report.outcomes.append(Outcome("user-data", "part", "deferred", "cloud-init"))
        return {}
    for key in prepared.unsupported_keys:
        msg = f"{key}: not supported by guestagent; ignored (cloud-init would apply it)"
        log.warning("%s", msg)
        report.warnings.append(msg)
    return prepared.config


class Applier:
    def __init__(
        self,
        settings: UserdataSettings | None = None,
        *,
        root: str | os.PathLike[str] = "/",
        state_dir: Path | None = None,
        dry_run: bool = False,
        run_scripts: bool = True,
        stage: str | None = None,
        lock_wait: float = 0.0,
    ) -> None:
        self.settings = settings or UserdataSettings()
        self.root = Path(root)
        self.state_dir = state_dir or self.root / "var/lib/guestagent"
        self.dry_run = dry_run
        self.run_scripts = run_scripts
        self.stage = stages.check_stage(stage)
        # How long to wait for another apply (the other stage, the CLI) to finish.
        self.lock_wait = lock_wait
        self.handlers: list[Handler] = all_handlers()
        self._freq = self.settings.frequency_overrides()

    def frequency(self, name: str, default: str = PER_INSTANCE) -> str:
        return self._freq.get(name, default)

    def apply(
        self, data: bytes | None, instance_id: str, defaults: Defaults = Defaults()
    ) -> Report:
        """Apply this Applier's stage (both when None). Everything is decoded, validated
        and planned first, and refused (UserdataError) before any change; then the apply
        lock is taken, the work done and the stage recorded with its times."""
        sems = Semaphores(self.state_dir, instance_id)
        report = Report(instance_id, stage=self.stage)
        with Tree(self.root, dry_run=self.dry_run, backup_dir=self._backup_dir()) as tree:
            ctx = Context(tree, self.settings, run_script=self._runner(tree, instance_id, report))
            plans, scripts = self._plan(data, defaults, ctx, report)
            if self.dry_run:
                self._execute(plans, scripts, ctx, sems, report)
                report.diff = tree.diff()
                return report
            with stages.apply_lock(self.state_dir, self.lock_wait):
                started, t0 = stages.now(), time.monotonic()
                name = self.stage or "local+final"
                log.info("user-data stage %s: started (instance %s)", name, instance_id)
                self._execute(plans, scripts, ctx, sems, report)
                report.started_at, report.finished_at = started, stages.now()
                log.info(
                    "user-data stage %s: finished in %.2fs (%d failed)",
                    name,
                    time.monotonic() - t0,
                    len(report.failed),
                )
                report.diff = tree.diff()
                self._save(report)
        return report

    def _plan(
        self, data: bytes | None, defaults: Defaults, ctx: Context, report: Report
    ) -> tuple[list[tuple[Handler, Any]], list[parts.Part]]:
        """What this stage will do; raises UserdataError, changing nothing."""
        tree = ctx.tree
        prepared = prepare(data, self.settings)
        _report_ignored(prepared, report)
        deferred = self.settings.defer_to_cloud_init and cloudconfig.cloud_init_active(tree)
        user_cfg = _user_config(prepared, deferred, report)
        cfg, used = with_defaults(user_cfg, set(prepared.config), defaults, self.settings, tree)
        if used:
            log.info("defaults from metadata: %s", ", ".join(used))
        scripts = [] if deferred else prepared.scripts
        plans = self._handler_plans(cfg, ctx, report)
        for script in scripts:
            check_script(script)
        if not stages.runs(self.stage, stages.FINAL):
            scripts = []
        if scripts or any(h.stage == stages.FINAL for h, _ in plans):
            self._check_can_run(tree)
        return plans, scripts

    def _handler_plans(self, cfg: dict[str, Any], ctx: Context, report: Report
                       ) -> list[tuple[Handler, Any]]:
        """Every handler validates (whatever the stage: a document is accepted or refused
        as a whole); those of this stage that have work are kept."""
        plans: list[tuple[Handler, Any]] = []
        for handler in self.handlers:
            plan = handler.plan(cfg, ctx)
            if plan is None or not stages.runs(self.stage, handler.stage):
                continue
            if handler.stage == stages.FINAL and not (self.run_scripts or self.dry_run):
                skipped = Outcome(handler.name, "handler", "skipped", "scripts disabled")
                report.outcomes.append(skipped)
                continue
            plans.append((handler, plan))
        return plans

    def _execute(
        self,
        plans: list[tuple[Handler, Any]],
        scripts: list[parts.Part],
        ctx: Context,
        sems: Semaphores,
        report: Report,
    ) -> None:
        for handler, plan in plans:
            report.outcomes.append(self._apply_one(handler, plan, ctx, sems))
        if scripts:
            report.outcomes += self._scripts(scripts, ctx, sems)
        report.warnings += ctx.notes

    def _backup_dir(self) -> Path:
        return self.state_dir / "userdata" / "backup"

    def _check_can_run(self, tree: Tree) -> None:
        """Scripts into an image tree run chrooted into it, never on this host: refuse
        (before any change) when that cannot work."""
        if tree.root == Path("/") or self.dry_run or not self.run_scripts:
            return
        if not tree.exists("/bin/sh"):
            raise UserdataError(
                f"--root {tree.root}: user-data scripts run chrooted into the image, which "
                "has no /bin/sh; use --no-scripts"
            )
        if os.geteuid() != 0:
            raise UserdataError(
                f"--root {tree.root}: user-data scripts run chrooted into the image, which "
                "needs root; run as root or use --no-scripts"
            )

    def _apply_one(self, handler: Handler, plan: Any, ctx: Context, sems: Semaphores) -> Outcome:
        freq = self.frequency(handler.name, handler.frequency)
        if sems.done(handler.name, freq):
            return Outcome(handler.name, "handler", "skipped", f"{freq}: done before")
        mark = len(ctx.tree.changes)
        start = time.monotonic()
        try:
            with ctx.tree.transaction():
                handler.apply(plan, ctx)
        except (UserdataError, OSError, process.ProcessError) as exc:
            log.error("%s failed, its files were restored: %s", handler.name, exc)
            return Outcome(
                handler.name, "handler", "failed", str(exc), seconds=time.monotonic() - start
            )
        if not self.dry_run:
            sems.mark(handler.name, freq)
        changed = len(ctx.tree.changes) > mark
        return Outcome(
            handler.name,
            "handler",
            "applied" if changed else "unchanged",
            seconds=time.monotonic() - start,
        )

    def _scripts(self, scripts: list[parts.Part], ctx: Context, sems: Semaphores) -> list[Outcome]:
        freq = self.frequency(SCRIPTS)
        if sems.done(SCRIPTS, freq):
            return [Outcome(s.name, "script", "skipped", f"{freq}: done before") for s in scripts]
        if self.dry_run or not self.run_scripts:
            why = "dry run" if self.dry_run else "scripts disabled"
            for s in scripts:
                ctx.tree.note(s.name, f"would run script ({len(s.content)} bytes)")
            return [
                Outcome(s.name, "script", "would-run" if self.dry_run else "skipped", why)
                for s in scripts
            ]
        out = []
        assert ctx.run_script is not None
        for s in scripts:
            start = time.monotonic()
            rc = ctx.run_script(s.name, s.content)
            status = "applied" if rc == 0 else "failed"
            detail = "" if rc == 0 else ("timed out" if rc == -9 else f"exited {rc}")
            out.append(Outcome(s.name, "script", status, detail, rc, time.monotonic() - start))
        # Marked even when one failed (as cloud-init does): its side effects may be half-done.
        sems.mark(SCRIPTS, freq)
        return out

    def _runner(self, tree: Tree, instance_id: str, report: Report) -> Any:
        scripts_dir = self.state_dir / "userdata" / "scripts" / f"instance-{instance_id}"
        chrooted = tree.root != Path("/")

        def run(name: str, body: bytes) -> int:
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64] or "script"
            path = atomic_write(scripts_dir / safe, body, mode=0o700)
            # Under --root the script runs chrooted into the image: what it reads, writes
            # and starts is the image's, never this host's.
            inside = "/" + str(path.relative_to(tree.root)) if chrooted else str(path)
            argv = [inside] if body.startswith(b"#!") else ["/bin/sh", inside]
            if chrooted:
                argv = ["chroot", str(tree.root), *argv]
            env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
            env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            env["GUESTAGENT_INSTANCE_ID"] = instance_id
            env.pop("GUESTAGENT_ROOT", None)
            log.info("running %s%s", name, f" chrooted into {tree.root}" if chrooted else "")
            try:
                res = process.run(
                    argv,
                    timeout=self.settings.script_timeout,
                    env=env,
                    cwd="/" if not chrooted else str(tree.root),
                )
            except process.ProcessError as exc:
                log.error("%s: %s", name, exc)
                return 127
            finally:
                # User-data may carry secrets: no copy is kept in the state directory.
                path.unlink(missing_ok=True)
            for stream, data in (("stdout", res.stdout), ("stderr", res.stderr)):
                lines = data.decode(errors="replace").splitlines()
                for line in lines[-_OUTPUT_LINES:]:
                    log.info("%s %s: %s", name, stream, line)
            if res.timed_out:
                log.error("%s: killed after %.0fs", name, self.settings.script_timeout)
                return -9
            log.log(logging.INFO if res.ok else logging.ERROR, "%s exited %s", name, res.returncode)
            return res.returncode

        return run

    def _save(self, report: Report) -> None:
        body = json.dumps(report.as_dict(), indent=2) + "\n"
        # 0600: an outcome's detail may quote the user-data.
        atomic_write(self.state_dir / "userdata" / "last-run.json", body, mode=0o600)
        stages.record(self.state_dir, report.stage, body)
