"""The metadata tree of one instance: version-relative path -> leaf text, listing or a
dynamic leaf the server computes per request (credentials, spot, pkcs7, ...).

Built once from the scenario and rebuilt only when the control API changes it, so a read is
one dict lookup. Directory listings are precomputed: children one per line, sub-directories
with a trailing ``/``, no trailing newline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guestagent.localcloud.emulator.scenario import Scenario

LEAF, DIRECTORY, DYNAMIC = 0, 1, 2

# Dynamic leaves, resolved by the server at request time.
USER_DATA = "user-data"
SPOT = "spot"
CREDENTIALS = "credentials"
MAINTENANCE = "maintenance"
PKCS7 = "pkcs7"

SPOT_PATH = "meta-data/instance/spot/termination-time"
CREDENTIALS_DIR = "meta-data/ram/security-credentials"
IDENTITY_PATH = "dynamic/instance-identity/document"
IDENTITY_KEYS = (
    ("zone-id", "meta-data/zone-id"),
    ("serial-number", "meta-data/serial-number"),
    ("instance-id", "meta-data/instance-id"),
    ("region-id", "meta-data/region-id"),
    ("private-ipv4", "meta-data/private-ipv4"),
    ("owner-account-id", "meta-data/owner-account-id"),
    ("mac", "meta-data/mac"),
    ("image-id", "meta-data/image-id"),
    ("instance-type", "meta-data/instance/instance-type"),
)


@dataclass(frozen=True)
class Node:
    kind: int
    data: bytes = b""  # leaf text or listing; for DYNAMIC the marker name
    name: str = ""


def normalize(path: str) -> str:
    """``/meta-data//disks/`` -> ``meta-data/disks``."""
    return "/".join(part for part in path.split("/") if part)


def scenario_leaves(scenario: Scenario) -> dict[str, str]:
    """The ``meta-data/`` leaves of a scenario, as text."""
    inst, net = scenario.instance, scenario.network
    primary = net.primary
    md: dict[str, str] = {
        "instance-id": inst.instance_id,
        "region-id": inst.region_id,
        "zone-id": inst.zone_id,
        "hostname": inst.hostname,
        "image-id": inst.image_id,
        "serial-number": inst.serial_number,
        "owner-account-id": inst.owner_account_id,
        "source-address": "\n".join(inst.source_address),
        "mac": primary.mac,
        "network-type": inst.network_type,
        "private-ipv4": primary.primary_ip_address,
        "vpc-id": net.vpc_id,
        "vpc-cidr-block": net.vpc_cidr_block,
        "vswitch-id": net.vswitch_id,
        "vswitch-cidr-block": net.vswitch_cidr_block,
        "dns-conf/nameservers": "\n".join(inst.nameservers),
        "ntp-conf/ntp-servers": "\n".join(inst.ntp_servers),
        "instance/instance-type": inst.instance_type,
        "instance/instance-name": inst.instance_name,
        "instance/max-netbw-egress": str(inst.max_netbw_egress),
        "instance/max-netbw-ingress": str(inst.max_netbw_ingress),
    }
    if inst.eipv4:
        md["eipv4"] = inst.eipv4
    for nic in net.interfaces:
        base = f"network/interfaces/macs/{nic.mac}/"
        md[base + "network-interface-id"] = nic.network_interface_id
        md[base + "netmask"] = nic.netmask
        md[base + "gateway"] = nic.gateway
        md[base + "primary-ip-address"] = nic.primary_ip_address
        md[base + "private-ipv4s"] = json.dumps(nic.private_ipv4s)
        md[base + "vpc-id"] = nic.vpc_id
        md[base + "vswitch-id"] = nic.vswitch_id
    for disk in scenario.disks:
        md[f"disks/{disk.serial}/id"] = disk.id
        md[f"disks/{disk.serial}/name"] = disk.name
    for key_id, key in scenario.public_keys.items():
        md[f"public-keys/{key_id}/openssh-key"] = key
    return {"meta-data/" + k: v for k, v in md.items()}


def _overridden(leaves: dict[str, str], overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The scenario's leaves with the overrides: a value set, None removes the path (and
    everything under it)."""
    for path, value in overrides.items():
        if value is None:
            gone = [p for p in leaves if p == path or p.startswith(path + "/")]
            for p in gone:
                del leaves[p]
        else:
            leaves[path] = value
    return leaves


def _dynamic(role: str | None) -> dict[str, str]:
    """Paths answered at request time, and what answers them."""
    dynamic = {
        SPOT_PATH: SPOT,
        "user-data": USER_DATA,
        "maintenance/active-system-events": MAINTENANCE,
        "dynamic/instance-identity/pkcs7": PKCS7,
    }
    if role is not None:
        dynamic[f"{CREDENTIALS_DIR}/{role}"] = CREDENTIALS
    return dynamic


class Tree:
    def __init__(
        self,
        scenario: Scenario,
        *,
        role: str | None,
        overrides: Mapping[str, str | None],
        vendor_data: str | None,
    ) -> None:
        leaves = _overridden(scenario_leaves(scenario), overrides)
        self.identity = {name: leaves.get(path, "") for name, path in IDENTITY_KEYS}
        nodes: dict[str, Node] = {p: Node(LEAF, v.encode()) for p, v in leaves.items()}
        for path, marker in _dynamic(role).items():
            if overrides.get(path, "") is None:
                continue  # removed on purpose
            nodes.setdefault(path, Node(DYNAMIC, name=marker))
        if vendor_data is not None:
            nodes["vendor-data"] = Node(LEAF, vendor_data.encode())
        self.document = self.identity_json()
        nodes[IDENTITY_PATH] = Node(LEAF, self.document.encode())

        children: dict[str, set[str]] = {}
        for path in nodes:
            parts = path.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                child = parts[depth] + ("/" if depth < len(parts) - 1 else "")
                children.setdefault(parent, set()).add(child)
        for parent, names in children.items():
            nodes[parent] = Node(DIRECTORY, "\n".join(sorted(names)).encode())
        # A dump of meta-data for one-shot readers; not listed, as on the real service.
        nodes["meta-data/all"] = Node(LEAF, json.dumps(_nest(leaves), indent=2).encode())
        self.nodes = nodes

    def identity_json(self, audience: str | None = None) -> str:
        """The document as served; with an audience, the content the pkcs7 signs instead:
        the document plus ``audience``, compact with sorted keys (the client rebuilds it)."""
        if audience is None:
            return json.dumps(self.identity, separators=(",", ":"))
        doc: dict[str, Any] = {**self.identity, "audience": audience}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    def lookup(self, path: str) -> Node | None:
        return self.nodes.get(path) or self.nodes.get(normalize(path))


def _nest(leaves: Mapping[str, str]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    multi = {"source-address", "nameservers", "ntp-servers"}
    for path, value in sorted(leaves.items()):
        parts = path.split("/")[1:]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value.split("\n") if parts[-1] in multi else value
    return root
