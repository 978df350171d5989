"""``guestagent run``: the long-running daemon.

The main thread only waits and reacts: signals (SIGTERM/SIGINT stop, SIGHUP reload), the
systemd watchdog (fed only while every service's heartbeat is current), a drain request (the
drain runs in its own thread), and the end of a drain. Everything else runs in supervised
service threads. This core names no capability: what runs comes from the registry, what
reloads from the ``Settings`` sections, what ``status`` shows from the services themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from guestagent import __version__, config, process
from guestagent.config import Settings
from guestagent.daemon import control, memory, restart
from guestagent.daemon.lock import DaemonLock
from guestagent.daemon.notify import Notifier
from guestagent.daemon.registry import Context, ServiceSpec, build, requirements, specs
from guestagent.daemon.supervisor import Supervisor
from guestagent.drain import Drain, DrainRequest, iso_ms, load_report
from guestagent.metadata.client import MetadataClient
from guestagent.service import Service
from guestagent.throttle import ErrorThrottle

log = logging.getLogger(__name__)

IDLE_TICK = 30.0  # main-loop wake-up when nothing asks for one (cheap: one select call)
DRAIN_TICK = 0.1
HOOK_KILL_SLACK = 0.2  # process.run's own timeout normally fires first
KILL_GRACE = 1.0  # after killing an overrunning hook, time left to the drain to wind down
# Past its deadline the drain only skips and records (hooks killed, service drains not
# waited for): it ends in milliseconds, but a loaded machine may take longer to schedule
# it. Waiting this long at most keeps its report whole, well inside TimeoutStopSec.
WIND_DOWN = 5.0


class _Waker:
    """A self-pipe: safe to poke from signal handlers and other threads alike."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.w, b"x")

    def wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self.r], [], [], max(timeout, 0.0))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.r, 512):
                    pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Daemon:
    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = Notifier()
        self.supervisor = Supervisor(
            backoff=settings.daemon.restart_backoff,
            backoff_max=settings.daemon.restart_backoff_max,
            reset_after=settings.daemon.restart_reset,
            error_period=settings.daemon.error_log_period,
        )
        self.started_at = datetime.now(UTC)
        self.phase = "starting"
        self.init = "systemd" if process.systemd_running() else "none"
        self._waker = _Waker()
        self._specs: dict[str, ServiceSpec] = {}
        self._stop_signal: int | None = None
        self._reload = False
        self._request: DrainRequest | None = None
        self._drain: Drain | None = None
        self._drain_thread: threading.Thread | None = None
        self._hard_deadline: float | None = None
        self._last_status = ""
        self._next_ping = 0.0
        self._throttle = ErrorThrottle(settings.daemon.error_log_period)
        self._trimmer = memory.Trimmer(time.monotonic())
        self.client: MetadataClient | None = None
        self.ctx: Context | None = None

    # -- life cycle -------------------------------------------------------------------
    def run(self) -> int:
        d = self.settings.daemon
        lock = DaemonLock(d.state_dir, d.run_dir)
        lock.acquire()
        server: control.ControlServer | None = None
        try:
            process.become_subreaper()
            process.set_owner(str(d.state_dir.resolve()))
            process.end_orphans()
            self.client = MetadataClient(self.settings.metadata)
            self.ctx = Context(self.settings, self.client, self._on_drain_request,
                               config_path=self.config_path, inline_oneshots=False,
                               lookup=self.supervisor.ready_service)
            for spec, service in build(self.ctx):
                self._specs[service.name] = spec
                self.supervisor.add(service, requirements(spec, service))
            server = control.ControlServer(d.run_dir / control.SOCKET_NAME, self.status)
            server.start()
            self._install_signals()
            self.supervisor.start()
            self.phase = "running"
            log.warning("guestagent %s running (init: %s): %s", __version__, self.init,
                        ", ".join(self.supervisor.names))
            self.notifier.ready(self._status_line())
            return self._loop()
        finally:
            if server is not None:
                server.close()
            if self.client is not None:
                self.client.close()
            lock.release()
            self.notifier.close()
            self._waker.close()

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum
        self._waker.wake()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._waker.wake()

    def _on_drain_request(self, request: DrainRequest) -> None:
        # Called from a service thread; the main loop starts the drain.
        if self._request is None:
            self._request = request
            self._waker.wake()

    # -- the main loop: one tick at a time ---------------------------------------------
    def _loop(self) -> int:
        while True:
            code = self._tick(time.monotonic())
            if code is not None:
                return code
            self._waker.wait(self._sleep_for())

    def _tick(self, now: float) -> int | None:
        """React to whatever happened; an exit code once the daemon should end."""
        self._feed_watchdog(now)
        if self._request is not None and self._drain is None:
            self._start_drain(self._request)
        if self._reload:
            self._reload = False
            self._reload_settings()
        if self._stop_signal is not None:
            if self._drain_thread is None:
                return self._shutdown(f"signal {signal.Signals(self._stop_signal).name}")
            self._interrupt_drain()
        code = self._watch_drain(now) if self._drain_thread is not None else None
        self._refresh_status()
        self._trimmer.tick(now)
        return code

    def _sleep_for(self) -> float:
        timeout = min(IDLE_TICK, self._trimmer.due_in(time.monotonic()))
        if self.notifier.watchdog_interval is not None:
            timeout = min(timeout, max(self._next_ping - time.monotonic(), 0.0))
        if self._drain is not None:
            timeout = min(timeout, DRAIN_TICK)  # watch the drain's deadlines closely
        return timeout

    def _feed_watchdog(self, now: float) -> None:
        """WATCHDOG=1 only while every running service's heartbeat is current: a hung
        service stops the feeding and systemd restarts the agent. During a drain it is fed
        regardless: the drain has its own, shorter deadline."""
        interval = self.notifier.watchdog_interval
        if interval is None or now < self._next_ping:
            return
        self._next_ping = now + interval
        process.reap_adopted()
        stale = self.supervisor.stale() if self._drain is None else {}
        if not stale:
            self.notifier.watchdog()
            return
        text = ", ".join(f"{name} ({age:.0f}s)" for name, age in sorted(stale.items()))
        more = self._throttle.suffix("stale\0" + ",".join(sorted(stale)))
        if more is not None:
            log.error("watchdog not fed: no heartbeat from %s%s", text, more)

    # -- drain ------------------------------------------------------------------------
    def _start_drain(self, request: DrainRequest) -> None:
        assert self.ctx is not None
        ctx = self.ctx

        def stop_new_work() -> None:
            ctx.draining.set()
            self.supervisor.freeze()

        def drain_services(deadline: float, on_step: Any) -> None:
            self.supervisor.drain(deadline, on_step)

        self.phase = "draining"
        self.notifier.status(f"draining: {request.reason}")
        self._drain = Drain(request, self.settings.daemon.state_dir,
                            stop_new_work=stop_new_work, drain_services=drain_services)
        drain = self._drain

        def body() -> None:
            try:
                drain.run()
            finally:
                self._waker.wake()

        self._drain_thread = threading.Thread(target=body, name="drain", daemon=True)
        self._drain_thread.start()

    def _watch_drain(self, now: float) -> int | None:
        assert self._drain_thread is not None and self._request is not None
        if not self._drain_thread.is_alive():
            if self._request.exit_after or self._stop_signal is not None:
                return self._finish_after_drain()
        elif self._hard_deadline is not None and now >= self._hard_deadline:
            return self._abandon_drain()
        else:
            self._enforce_hooks_deadline(now)
        return None

    def _interrupt_drain(self) -> None:
        """SIGTERM during a drain: keep draining, but finish within the stop budget."""
        if self._hard_deadline is not None or self._drain is None:
            return
        budget = self.settings.daemon.stop_timeout
        grace = min(KILL_GRACE, budget / 4)
        self._hard_deadline = time.monotonic() + budget - grace
        self._drain.shorten(self._hard_deadline)
        log.warning("stop asked during the drain: finishing within %.1fs", budget)
        self.notifier.stopping("stopping: drain cut to the stop budget")

    def _enforce_hooks_deadline(self, now: float) -> None:
        """A hook started before SIGTERM brought the deadline forward still has its old
        timeout: end the drain's hooks (only those) once the hooks deadline has passed."""
        drain = self._drain
        if drain is None or drain.step != "hooks" or now < drain.hooks_deadline + HOOK_KILL_SLACK:
            return
        killed = drain.end_hooks()
        more = self._throttle.suffix("hooks deadline") if killed else None
        if more is not None:  # checked ten times a second: say it once
            log.error("killed %d drain hook process(es) at the hooks deadline%s", killed, more)

    def _abandon_drain(self) -> int:
        """The drain overran its (shortened) deadline: kill its hooks and go."""
        assert self._drain is not None and self._drain_thread is not None
        killed = self._drain.end_hooks()
        if killed:
            log.error("killed %d overrunning drain hook process(es) at the stop deadline",
                      killed)
        self._drain_thread.join(WIND_DOWN)
        return self._finish_after_drain()

    def _finish_after_drain(self) -> int:
        self.phase = "stopping"
        self.notifier.stopping("stopping: drain done")
        deadline = time.monotonic() + self.settings.daemon.stop_timeout
        if self._hard_deadline is not None:
            deadline = min(deadline, self._hard_deadline + KILL_GRACE)
        if self._drain is not None:
            self._drain.end_hooks()  # what the hooks left behind ends with the drain
        self.supervisor.stop(deadline)
        log.warning("guestagent exits after the drain")
        return 0

    # -- plain stop -------------------------------------------------------------------
    def _shutdown(self, why: str) -> int:
        self.phase = "stopping"
        log.warning("stopping (%s)", why)
        self.notifier.stopping(f"stopping ({why})")
        began = time.monotonic()
        deadline = began + self.settings.daemon.stop_timeout
        assert self.ctx is not None
        self.supervisor.freeze()
        if self.init == "systemd" and restart.restart_pending():
            # A restart: no drain. Mounts and detached work stay; the next agent adopts them.
            self.ctx.restarting.set()
            log.warning("restarting: leaving mounts and detached work to the next agent")
        else:
            self.ctx.draining.set()
            # Drain and stop share the budget: the drain gets at most half of it.
            self.supervisor.drain(began + (deadline - began) / 2)
        stuck = self.supervisor.stop(deadline)
        log.warning("guestagent stopped%s", f" ({', '.join(stuck)} did not)" if stuck else "")
        return 0

    # -- reload -----------------------------------------------------------------------
    def _reload_settings(self) -> None:
        """Build the new settings and services first; swap only when all of it worked. A
        bad value keeps the running settings (one log line); the daemon never exits."""
        if self._drain is not None or self.ctx is None:
            log.warning("SIGHUP ignored: draining")
            return
        self.notifier.reloading()
        try:
            plan = self._plan_reload()
        except Exception as exc:  # config error, bad allow-list user, broken factory ...
            log.error("reload failed, keeping the running settings: %s", exc)
            self.notifier.ready(self._status_line())
            return
        self._apply_reload(*plan)
        self.notifier.ready(self._status_line())

    def _plan_reload(self) -> tuple[Settings, set[str], dict[str, Service],
                                    MetadataClient | None]:
        assert self.ctx is not None
        new = config.load(self.config_path)
        old = self.settings
        changed = {f.name for f in dataclasses.fields(Settings)
                   if getattr(old, f.name) != getattr(new, f.name)}
        client = MetadataClient(new.metadata) if "metadata" in changed else None
        trial = dataclasses.replace(self.ctx, settings=new, client=client or self.ctx.client)
        names = [n for n, spec in self._specs.items() if changed & set(spec.sections)]
        for name in list(names):  # what requires a rebuilt service is rebuilt too
            names += [d for d in self.supervisor.dependents(name) if d not in names]
        built: dict[str, Service] = {}
        try:
            for name in names:
                service = self._specs[name].factory(trial)
                if service is not None:
                    built[name] = service
        except Exception:
            if client is not None:
                client.close()
            raise
        return new, changed, built, client

    def _apply_reload(self, new: Settings, changed: set[str], built: dict[str, Service],
                      client: MetadataClient | None) -> None:
        assert self.ctx is not None
        old = self.settings
        if (old.daemon.state_dir, old.daemon.run_dir) != (new.daemon.state_dir,
                                                          new.daemon.run_dir):
            log.warning("daemon.state_dir/run_dir changes take effect at the next start")
        configure_logging(new.daemon.log_level)
        self.settings = self.ctx.settings = new
        old_client = None
        if client is not None:
            old_client, self.client = self.client, client
            self.ctx.client = client
        for name in self.supervisor.names:
            if name in built:
                self.supervisor.replace(built[name], new.daemon.stop_timeout)
        disabled = sorted(n for n, s in self._specs.items()
                          if changed & set(s.sections) and n not in built)
        if disabled:
            log.warning("disabled now: %s (takes effect at the next start)",
                        ", ".join(disabled))
        if old_client is not None:
            old_client.close()
        log.warning("settings reloaded; changed: %s; restarted: %s",
                    ", ".join(sorted(changed)) or "nothing", ", ".join(built) or "none")

    # -- status -----------------------------------------------------------------------
    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command", "status")
        if command == "ping":
            return {"ok": True, "pid": os.getpid()}
        if command != "status":
            raise ValueError(f"unknown command {command!r}")
        services = self.supervisor.snapshot()
        reply: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "init": self.init,
            "started_at": iso_ms(self.started_at),
            "uptime": round((datetime.now(UTC) - self.started_at).total_seconds(), 1),
            "phase": self.phase,
            "healthy": all(s["healthy"] for s in services),
            "services": services,
        }
        # Each service's own facts under its name; registered ones not running: disabled.
        for spec in specs(self.settings):
            reply.setdefault(spec.name, {"state": "disabled"})
        for entry in services:
            reply[entry["name"]] = dict(entry.get("details", {}))
        drain = self._drain.snapshot() if self._drain is not None else load_report(
            self.settings.daemon.state_dir)
        if drain is not None:
            reply["drain"] = drain
        return reply

    def _status_line(self) -> str:
        services = self.supervisor.snapshot()
        bad = [s["name"] for s in services if not s["healthy"]]
        text = f"{self.phase}: {len(services)} services"
        return text + (f", unhealthy: {', '.join(bad)}" if bad else ", all healthy")

    def _refresh_status(self) -> None:
        if not self.notifier.enabled:
            return
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)


def configure_logging(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def run_once(settings: Settings, names: list[str], verbose: int = 0,
             in_daemon: bool = False) -> int:
    """Run the named one-shot services in start order, in the foreground, then exit: 0 when
    all finished well, 4 when one reports part of its work failed. Holds the daemon lock so
    it never races a running daemon, unless it is that daemon's own child (``in_daemon``)."""
    if not verbose:
        configure_logging(settings.daemon.log_level)
    unknown = set(names) - {spec.name for spec in specs(settings)}
    if unknown:  # before the lock, which creates the state and run directories
        raise ValueError(f"no such enabled service: {', '.join(sorted(unknown))}")
    d = settings.daemon
    lock = DaemonLock(d.state_dir, d.run_dir)
    if not in_daemon:
        lock.acquire()
    client = MetadataClient(settings.metadata)
    stop = threading.Event()
    try:
        ctx = Context(settings, client, lambda request: None)
        # Only the named ones are even built: constructors of the others may have effects.
        built = [spec.factory(ctx) for spec in specs(settings) if spec.name in names]
        chosen = [svc for svc in built if svc is not None]
        missing = set(names) - {svc.name for svc in chosen}
        if missing:
            raise ValueError(f"no such enabled service: {', '.join(sorted(missing))}")
        for svc in chosen:
            if not svc.oneshot:
                raise ValueError(f"{svc.name} is not a one-shot service")

        def on_term(signum: int, frame: FrameType | None) -> None:
            stop.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        for svc in chosen:
            log.info("running %s once", svc.name)
            svc.run(stop)
        return 0 if all(svc.healthy() for svc in chosen) else 4
    finally:
        client.close()
        lock.release()


def run_daemon(settings: Settings, config_path: str | None, verbose: int = 0) -> int:
    memory.limit_arenas()
    if not verbose:
        configure_logging(settings.daemon.log_level)
    return Daemon(settings, config_path).run()


__all__ = ["Daemon", "Service", "run_daemon"]
