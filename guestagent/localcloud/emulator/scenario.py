"""Scenario: the emulated instance, described in TOML (YAML too when PyYAML is present).

Shape (every section optional; omitted values come from the built-in ``default.toml``)::

    user_data = "#!/bin/sh\\necho hi"      # or user_data_file = "boot.sh" (relative to the file)
    vendor_data = "..."

    [instance]
    instance_id = "i-bp1..."   region_id = "cn-hangzhou"   zone_id = "cn-hangzhou-h"
    hostname = "..."  image_id = "..."  serial_number = "..."  owner_account_id = "..."
    instance_type = "ecs.g7.large"  instance_name = "..."  network_type = "vpc"
    eipv4 = ""                      # "" = no EIP (leaf absent)
    max_netbw_egress = 2048000      max_netbw_ingress = 2048000
    source_address = ["http://mirrors.cloud.aliyuncs.com"]
    nameservers = ["100.100.2.136", "100.100.2.138"]
    ntp_servers = ["ntp1.aliyun.com"]

    [network]                       # vpc_id vpc_cidr_block vswitch_id vswitch_cidr_block
    [[network.interfaces]]          # the first one is the primary NIC (mac, private-ipv4)
    mac = "00:16:3e:..."  network_interface_id = "eni-..."  netmask = "255.255.255.0"
    gateway = "192.168.0.253"  primary_ip_address = "192.168.0.10"
    private_ipv4s = ["192.168.0.10"]   # default [primary_ip_address]; vpc_id/vswitch_id default
                                       # to [network]'s
    [[disks]]                       # serial id name
    [public_keys]                   # "<key id>" = "ssh-ed25519 AAAA..."

    [ram]
    role = "EcsRamRoleDemo"         # "" = no role attached
    time_scale = 1.0                # durations are divided by it; timestamps stay wall-clock
    validity = 21600                # seconds a set of STS credentials is valid
    overlap = 1800                  # a new set appears this long before the current one expires

    [tokens]
    required = false                # hardened mode: token-less reads get 403

    [spot]
    notice_in = 30                  # seconds after start the notice appears; absent = never
    release_after = 300             # release time = notice + release_after (real seconds)

    [ca]                            # PEM files; absent = a CA generated at start
    cert_file = "ca.pem"  key_file = "ca.key"

    [[faults]]                      # path kind [status latency count method body]
    path = "meta-data/ram/security-credentials/*"  kind = "status"  status = 500  count = 3

    [[maintenance]]                 # code [not_before_in event_id]
    code = "SystemMaintenance.Reboot"  not_before_in = 3600

A bad scenario raises :class:`ScenarioError` whose one-line message names the key.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from guestagent.files import read_input

FAULT_KINDS = ("status", "latency", "reset", "hang", "truncate", "body")


class ScenarioError(ValueError):
    """The scenario is unreadable or invalid; the message names the file and key."""


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    region_id: str
    zone_id: str
    hostname: str
    image_id: str
    serial_number: str
    owner_account_id: str
    instance_type: str
    instance_name: str
    network_type: str = "vpc"
    eipv4: str = ""
    max_netbw_egress: int = 0
    max_netbw_ingress: int = 0
    source_address: list[str] = field(default_factory=list)
    nameservers: list[str] = field(default_factory=list)
    ntp_servers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Interface:
    mac: str
    network_interface_id: str
    netmask: str
    gateway: str
    primary_ip_address: str
    private_ipv4s: list[str]
    vpc_id: str
    vswitch_id: str


@dataclass(frozen=True)
class Network:
    vpc_id: str
    vpc_cidr_block: str
    vswitch_id: str
    vswitch_cidr_block: str
    interfaces: list[Interface]

    @property
    def primary(self) -> Interface:
        return self.interfaces[0]


@dataclass(frozen=True)
class Disk:
    serial: str
    id: str
    name: str


@dataclass(frozen=True)
class RamSpec:
    role: str | None = None
    time_scale: float = 1.0
    validity: float = 21600.0
    overlap: float = 1800.0


@dataclass(frozen=True)
class SpotSpec:
    notice_in: float | None = None
    release_after: float = 300.0


@dataclass(frozen=True)
class FaultSpec:
    """One fault rule as a scenario, the control API or a test describes it."""

    path: str
    kind: str
    status: int = 500
    latency: float = 0.0
    count: int | None = None
    method: str | None = None
    body: str | None = None

    def problem(self) -> str | None:
        """What is wrong with the rule (as ``"key: reason"``), or None when it is fine."""
        if not self.path:
            return "path: must not be empty"
        if self.kind not in FAULT_KINDS:
            return f"kind: must be one of {', '.join(FAULT_KINDS)}, got {self.kind!r}"
        if not 100 <= self.status <= 599:
            return f"status: must be 100..599, got {self.status}"
        if self.latency < 0:
            return f"latency: must be >= 0, got {self.latency}"
        if self.count is not None and self.count < 1:
            return f"count: must be >= 1, got {self.count}"
        if self.method is not None and self.method.upper() not in ("GET", "PUT"):
            return f"method: must be GET or PUT, got {self.method!r}"
        return None


@dataclass(frozen=True)
class MaintenanceSpec:
    code: str
    not_before_in: float = 0.0
    event_id: str | None = None


@dataclass(frozen=True)
class Scenario:
    instance: InstanceInfo
    network: Network
    disks: list[Disk] = field(default_factory=list)
    public_keys: dict[str, str] = field(default_factory=dict)
    ram: RamSpec = field(default_factory=RamSpec)
    tokens_required: bool = False
    spot: SpotSpec = field(default_factory=SpotSpec)
    user_data: bytes | None = None
    vendor_data: str | None = None
    faults: list[FaultSpec] = field(default_factory=list)
    maintenance: list[MaintenanceSpec] = field(default_factory=list)
    ca_cert_file: Path | None = None
    ca_key_file: Path | None = None


def default_text() -> str:
    return resources.files(__package__).joinpath("default.toml").read_text(encoding="utf-8")


def load_scenario(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Scenario:
    """Load a scenario file (None = the built-in default) laid over the default.

    ``overrides`` is a mapping of the same shape merged last, handy in tests:
    ``load_scenario(overrides={"ram": {"time_scale": 3600}})``.
    """
    data = _parse(default_text(), "default.toml", "toml")
    base_dir: Path | None = None
    source = "scenario"
    if path is not None:
        file = Path(path)
        source = str(file)
        base_dir = file.parent
        try:
            text = read_input(file).decode("utf-8")
        except FileNotFoundError as exc:
            raise ScenarioError(f"{file}: scenario file not found") from exc
        except OSError as exc:
            raise ScenarioError(f"{file}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ScenarioError(f"{file}: not UTF-8 text (byte {exc.start})") from exc
        fmt = "yaml" if file.suffix in (".yaml", ".yml") else "toml"
        data = _merge(data, _parse(text, source, fmt))
    if overrides:
        data = _merge(data, overrides)
    return scenario_from_mapping(data, base_dir=base_dir, source=source)


def _unique_keys_loader(yaml: Any) -> Any:
    """PyYAML's safe loader, refusing a key repeated in one mapping (it keeps the last
    silently; TOML scenarios already refuse it). Scenarios are our own format: unlike
    cloud-config, no other reader's semantics to keep."""

    class Loader(yaml.SafeLoader):  # type: ignore[misc]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen and key != "<<":
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping: keep one",
                        key_node.start_mark)
                if isinstance(key, str | int | float | bool):
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def _parse(text: str, source: str, fmt: str) -> dict[str, Any]:
    if fmt == "yaml":
        try:
            import yaml
        except ImportError as exc:
            raise ScenarioError(f"{source}: YAML scenarios need PyYAML; use TOML") from exc
        try:
            loaded = yaml.load(text, Loader=_unique_keys_loader(yaml))  # noqa: S506 (safe)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ScenarioError(f"{source}: not valid YAML{at}: {problem}") from exc
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise ScenarioError(f"{source}: top level must be a mapping")
        return loaded
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError:
        raise ScenarioError(f"{source}: not valid TOML: nested too deeply") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge tables; lists and scalars in ``over`` replace those in ``base``."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Table:
    """Typed reads from one table; every unknown key is an error naming it."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, Mapping):
            raise ScenarioError(f"{source}: {where}: must be a table")
        self.data = data
        self.where = where
        self.source = source
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, what: str) -> ScenarioError:
        return ScenarioError(f"{self.source}: {self._name(key)}: {what}")

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.error(key, "missing")
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {type(value).__name__}")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {type(value).__name__}")
        return value

    def number(self, key: str, default: float | None, minimum: float | None = None) -> float | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {type(value).__name__}")
        if not math.isfinite(value):  # nan/inf broke the clock and timers, or a traceback
            raise self.error(key, f"must be a finite number, got {value}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum:g}, got {value}")
        return float(value)

    def integer(self, key: str, default: int | None, minimum: int | None = None) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {type(value).__name__}")
        return value

    def texts(self, key: str) -> list[str]:
        value = self.raw(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return list(value)

    def tables(self, key: str) -> list[_Table]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, "must be an array of tables")
        return [_Table(v, f"{self._name(key)}[{i}]", self.source) for i, v in enumerate(value)]

    def table(self, key: str) -> _Table:
        return _Table(self.raw(key) or {}, self._name(key), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def scenario_from_mapping(
    data: Mapping[str, Any], base_dir: Path | None = None, source: str = "scenario"
) -> Scenario:
    """Build and validate a :class:`Scenario` from parsed TOML/YAML data."""
    top = _Table(data, "", source)
    inst = top.table("instance")
    instance = InstanceInfo(
        instance_id=inst.text("instance_id"),
        region_id=inst.text("region_id"),
        zone_id=inst.text("zone_id"),
        hostname=inst.text("hostname"),
        image_id=inst.text("image_id"),
        serial_number=inst.text("serial_number"),
        owner_account_id=inst.text("owner_account_id"),
        instance_type=inst.text("instance_type"),
        instance_name=inst.text("instance_name"),
        network_type=inst.text("network_type", "vpc"),
        eipv4=inst.text("eipv4", ""),
        max_netbw_egress=inst.integer("max_netbw_egress", 0, minimum=0) or 0,
        max_netbw_ingress=inst.integer("max_netbw_ingress", 0, minimum=0) or 0,
        source_address=inst.texts("source_address"),
        nameservers=inst.texts("nameservers"),
        ntp_servers=inst.texts("ntp_servers"),
    )
    if not instance.instance_id.startswith("i-"):
        raise inst.error("instance_id", f"must start with 'i-', got {instance.instance_id!r}")
    inst.done()

    net = top.table("network")
    vpc_id = net.text("vpc_id")
    vswitch_id = net.text("vswitch_id")
    interfaces = []
    for nic in net.tables("interfaces"):
        primary_ip = nic.text("primary_ip_address")
        interfaces.append(
            Interface(
                mac=nic.text("mac").lower(),
                network_interface_id=nic.text("network_interface_id"),
                netmask=nic.text("netmask"),
                gateway=nic.text("gateway"),
                primary_ip_address=primary_ip,
                private_ipv4s=nic.texts("private_ipv4s") or [primary_ip],
                vpc_id=nic.text("vpc_id", vpc_id),
                vswitch_id=nic.text("vswitch_id", vswitch_id),
            )
        )
        nic.done()
    if not interfaces:
        raise net.error("interfaces", "at least one interface is needed")
    macs = [nic.mac for nic in interfaces]
    if len(set(macs)) != len(macs):
        raise net.error("interfaces", "two interfaces share a mac")
    network = Network(
        vpc_id=vpc_id,
        vpc_cidr_block=net.text("vpc_cidr_block"),
        vswitch_id=vswitch_id,
        vswitch_cidr_block=net.text("vswitch_cidr_block"),
        interfaces=interfaces,
    )
    net.done()

    disks = []
    for disk in top.tables("disks"):
        disks.append(
            Disk(serial=disk.text("serial"), id=disk.text("id"), name=disk.text("name", ""))
        )
        disk.done()

    keys = top.table("public_keys")
    public_keys = {name: keys.text(name) for name in keys.data}
    keys.done()

    ram_t = top.table("ram")
    role = ram_t.opt_text("role") or None
    ram = RamSpec(
        role=role,
        time_scale=_positive(ram_t, "time_scale", 1.0),
        validity=_positive(ram_t, "validity", 21600.0),
        overlap=ram_t.number("overlap", 1800.0, minimum=0) or 0.0,
    )
    if ram.overlap >= ram.validity:
        raise ram_t.error("overlap", f"must be shorter than validity ({ram.validity:g} s)")
    ram_t.done()

    tok = top.table("tokens")
    tokens_required = tok.flag("required", False)
    tok.done()

    spot_t = top.table("spot")
    spot = SpotSpec(
        notice_in=spot_t.number("notice_in", None, minimum=0),
        release_after=spot_t.number("release_after", 300.0, minimum=0) or 0.0,
    )
    spot_t.done()

    user_data = _user_data(top, base_dir)
    vendor_data = top.opt_text("vendor_data")

    faults = []
    for rule in top.tables("faults"):
        faults.append(_fault(rule))
        rule.done()

    maintenance = []
    for event in top.tables("maintenance"):
        maintenance.append(
            MaintenanceSpec(
                code=event.text("code"),
                not_before_in=event.number("not_before_in", 0.0) or 0.0,
                event_id=event.opt_text("event_id"),
            )
        )
        event.done()

    ca = top.table("ca")
    cert_file = _path(ca.opt_text("cert_file"), base_dir)
    key_file = _path(ca.opt_text("key_file"), base_dir)
    if (cert_file is None) != (key_file is None):
        raise ca.error("key_file" if key_file is None else "cert_file", "both files are needed")
    ca.done()
    top.done()
    return Scenario(
        instance=instance,
        network=network,
        disks=disks,
        public_keys=public_keys,
        ram=ram,
        tokens_required=tokens_required,
        spot=spot,
        user_data=user_data,
        vendor_data=vendor_data,
        faults=faults,
        maintenance=maintenance,
        ca_cert_file=cert_file,
        ca_key_file=key_file,
    )


def _positive(table: _Table, key: str, default: float) -> float:
    value = table.number(key, default)
    assert value is not None
    if value <= 0:
        raise table.error(key, f"must be > 0, got {value:g}")
    return value


def _path(value: str | None, base_dir: Path | None) -> Path | None:
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _user_data(top: _Table, base_dir: Path | None) -> bytes | None:
    inline = top.opt_text("user_data")
    file = _path(top.opt_text("user_data_file"), base_dir)
    if inline is not None and file is not None:
        raise top.error("user_data_file", "give user_data or user_data_file, not both")
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as exc:
            raise top.error("user_data_file", f"cannot read {file}: {exc.strerror}") from exc
    return inline.encode() if inline is not None else None


def _fault(rule: _Table) -> FaultSpec:
    spec = FaultSpec(
        path=rule.text("path"),
        kind=rule.text("kind"),
        status=rule.integer("status", 500) or 500,
        latency=rule.number("latency", 0.0) or 0.0,
        count=rule.integer("count", None),
        method=rule.opt_text("method"),
        body=rule.opt_text("body"),
    )
    problem = spec.problem()
    if problem:
        key, _, what = problem.partition(": ")
        raise rule.error(key, what)
    return spec
