"""Which services the daemon runs, in which order, and what each may reach.

This is the one module of the daemon that names capabilities. A capability plugs in with
one :func:`register` call: ``order`` places it (lower starts first), ``requires`` names the
services it needs ready before it starts (they then drain and stop after it), ``sections``
the settings sections whose change (SIGHUP) rebuilds it. A service reaches a required
service through :meth:`Context.service`, typed by the protocol that service offers (for
example ``guestagent.credentials.consumers.CredentialAccess``), never through another
package's internals.

A built-in whose module is not installed (a slimmer build) or whose section says
``enabled = false`` is simply left out; ``daemon.extra_services`` adds "module:factory"
entries from outside the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from guestagent.drain import DrainRequest
from guestagent.service import Service

if TYPE_CHECKING:
    from guestagent.config import Settings
    from guestagent.metadata.client import MetadataClient

T = TypeVar("T")


class NotReady(LookupError):
    """A service asked for another that is not running, not ready or not of that kind."""


def _nothing(name: str) -> Service | None:
    return None

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a service factory may use. Services share one metadata client."""

    settings: Settings
    client: MetadataClient
    request_drain: Callable[[DrainRequest], None]
    # Set once the instance drains: take no new work.
    draining: threading.Event = field(default_factory=threading.Event)
    # Set when systemd restarts the agent (no drain): leave detached work for the next one.
    restarting: threading.Event = field(default_factory=threading.Event)
    # The settings file the daemon was started with (for child processes).
    config_path: str | None = None
    # False in the daemon: heavy one-shots run as child processes (see daemon/child.py).
    inline_oneshots: bool = True
    # How the daemon finds a ready service by name (set by the daemon).
    lookup: Callable[[str], Service | None] = _nothing

    def service(self, name: str, kind: type[T]) -> T:
        """The ready service ``name``, as ``kind`` (a class or runtime-checkable protocol
        it offers). Declare ``name`` in your spec's ``requires`` so it is ready first."""
        found = self.lookup(name)
        if found is None:
            raise NotReady(f"service {name!r} is not running or not ready")
        if not isinstance(found, kind):
            raise NotReady(f"service {name!r} does not offer {kind.__name__}")
        return found

    @property
    def state_dir(self) -> Path:
        return self.settings.daemon.state_dir

    @property
    def run_dir(self) -> Path:
        return self.settings.daemon.run_dir


Factory = Callable[[Context], Service | None]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    order: int
    factory: Factory
    # Settings sections whose change (SIGHUP) rebuilds the service.
    sections: tuple[str, ...] = ()
    # Services that must be ready before this one starts (and drain/stop after it).
    requires: tuple[str, ...] = ()


_SPECS: dict[str, ServiceSpec] = {}
EXTRA_ORDER = 60  # extras go after credentials, before the watchers


def register(spec: ServiceSpec) -> None:
    _SPECS[spec.name] = spec


def specs(settings: Settings) -> list[ServiceSpec]:
    """The enabled specs, built-in and extra, in start order."""
    chosen = [s for s in _SPECS.values() if s.name not in settings.daemon.disabled_services]
    for i, entry in enumerate(settings.daemon.extra_services):
        chosen.append(ServiceSpec(entry, EXTRA_ORDER + i, _extra(entry), ("daemon",)))
    return sorted(chosen, key=lambda s: s.order)


def requirements(spec: ServiceSpec, service: Service) -> tuple[str, ...]:
    """What a service requires: its spec's list plus the class's own ``requires``."""
    return tuple(dict.fromkeys([*spec.requires, *getattr(service, "requires", ())]))


def build(ctx: Context) -> list[tuple[ServiceSpec, Service]]:
    """The enabled services, each after the ones it requires. A service whose requirement
    is not enabled is left out with one warning line."""
    built: list[tuple[ServiceSpec, Service]] = []
    for spec in specs(ctx.settings):
        service = spec.factory(ctx)
        if service is None:
            log.info("service %s: not enabled", spec.name)
            continue
        built.append((spec, service))
    return _dependency_order(built)


Built = list[tuple[ServiceSpec, Service]]


def _dependency_order(built: Built) -> Built:
    """Stable topological order (``order`` breaks ties); drops what cannot be satisfied."""
    pending = list(built)
    placed: list[tuple[ServiceSpec, Service]] = []
    names: set[str] = set()
    available = {svc.name for _, svc in built}
    while pending:
        for item in pending:
            needs = requirements(*item)
            missing = [n for n in needs if n not in available]
            if missing:
                log.warning("service %s not started: it requires %s, which is not enabled",
                            item[1].name, ", ".join(missing))
                available.discard(item[1].name)
                pending.remove(item)
                break
            if set(needs) <= names:
                placed.append(item)
                names.add(item[1].name)
                pending.remove(item)
                break
        else:
            cycle = ", ".join(svc.name for _, svc in pending)
            raise ValueError(f"services require each other in a cycle: {cycle}")
    return placed


def _extra(entry: str) -> Factory:
    module_name, _, attr = entry.partition(":")

    def factory(ctx: Context) -> Service | None:
        try:
            make = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"daemon.extra_services: cannot load {entry!r}: {exc}") from None
        result = make(ctx)
        if result is not None and not isinstance(result, Service):
            raise ValueError(f"daemon.extra_services: {entry!r} did not return a Service")
        return result

    return factory


def _optional(module: str, attr: str) -> Any:
    """A class of a capability that may not be part of this build."""
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise
    except AttributeError:
        return None


# -- the built-ins ------------------------------------------------------------------------

def _firstboot(ctx: Context) -> Service | None:
    if not ctx.settings.userdata.enabled:
        return None
    module = "guestagent.userdata.service"
    if not ctx.inline_oneshots:
        # In the daemon: not even imported here (YAML, templates, MIME stay out of a process
        # that lives for months); the child runs it.
        if importlib.util.find_spec(module) is None:
            return None
        from guestagent.daemon.child import ChildOneshot

        # Bounded: scripts have their own timeout; several may run, plus the templates.
        timeout = 3 * ctx.settings.userdata.script_timeout + 60
        return ChildOneshot("userdata", ctx.config_path, timeout)
    cls = _optional(module, "FirstBootService")
    if cls is None:
        return None
    return cls(ctx.settings, ctx.client)  # type: ignore[no-any-return]


def _metadata(ctx: Context) -> Service | None:
    from guestagent.daemon.metawatch import MetadataWatch

    return MetadataWatch(ctx.client, ctx.settings.daemon.metadata_check_interval)


def _credentials(ctx: Context) -> Service | None:
    if not ctx.settings.credentials.enabled:
        return None
    cls = _optional("guestagent.credentials.service", "CredentialService")
    if cls is None:
        return None
    service: Service = cls(ctx.settings, ctx.client)
    return service


def _storage(ctx: Context) -> Service | None:
    if not ctx.settings.storage.enabled:
        return None
    cls = _optional("guestagent.storage.service", "StorageService")
    if cls is None:
        return None
    from guestagent.credentials.consumers import CredentialAccess

    def source() -> Any:
        return ctx.service("credentials", CredentialAccess).source  # type: ignore[type-abstract]

    service: Service = cls(ctx.settings, source=source)
    return service


def _maintenance(ctx: Context) -> Service | None:
    if not (ctx.settings.spot.enabled and ctx.settings.spot.maintenance_enabled):
        return None
    from guestagent.spot.maintenance import MaintenanceWatcher

    return MaintenanceWatcher(ctx.client, ctx.settings.spot, ctx.state_dir, ctx.draining,
                              ctx.settings.daemon.error_log_period)


def _spot(ctx: Context) -> Service | None:
    if not ctx.settings.spot.enabled:
        return None
    from guestagent.spot.watcher import SpotWatcher

    return SpotWatcher(ctx.client, ctx.settings.spot, ctx.state_dir, ctx.request_drain,
                       ctx.settings.daemon.error_log_period)


def _tasks(ctx: Context) -> Service | None:
    factory = _optional("guestagent.tasks.service", "factory")
    if factory is None:
        return None
    service: Service | None = factory(ctx)
    return service


def _migrate(ctx: Context) -> Service | None:
    cls = _optional("guestagent.migrate.jobs", "MigrateService")
    if cls is None:
        return None
    service: Service = cls(ctx.settings.migrate, ctx.state_dir / "migrate", ctx.config_path)
    return service


register(ServiceSpec("userdata", 10, _firstboot, ("userdata", "metadata")))
register(ServiceSpec("metadata", 20, _metadata, ("metadata", "daemon")))
register(ServiceSpec("credentials", 30, _credentials, ("credentials", "metadata")))
# After credentials (rclone and uploads need them), drained before them: outputs flushed.
register(ServiceSpec("storage", 40, _storage, ("storage", "credentials", "daemon"),
                     requires=("credentials",)))
register(ServiceSpec("tasks", 70, _tasks, ("tasks", "daemon")))
register(ServiceSpec("migrate", 70, _migrate, ("migrate",)))
register(ServiceSpec("maintenance", 80, _maintenance, ("spot", "metadata")))
register(ServiceSpec("spot", 90, _spot, ("spot", "metadata")))
