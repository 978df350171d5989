"""The cloud's state behind the local ECS API: instances (real test hosts) and images.

An intermediate instance's disks are directories on this machine (its mount points, as the
cloud reports them); creating an image records a manifest of the system disk (every path
with type, mode, owner, size and SHA-256) and keeps the received tree beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guestagent.files import atomic_write
from guestagent.localcloud.ecsapi.account import Account
from guestagent.localcloud.hosts import TestHost, new_keypair

log = logging.getLogger(__name__)

OS_IDS = {"debian": "Debian", "ubuntu": "Ubuntu", "centos": "CentOS", "rhel": "RedHat",
          "sles": "SUSE", "opensuse": "OpenSUSE", "opensuse-leap": "OpenSUSE"}
IMAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{1,127}")


class RpcError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class Instance:
    id: str
    name: str
    token: str
    host: TestHost
    root: Path
    data: dict[int, Path] = field(default_factory=dict)
    status: str = "Running"


class Cloud:
    def __init__(self, account: Account, workdir: Path, subnet: str) -> None:
        self.account = account
        self.workdir = workdir
        self.subnet = subnet
        self.instances: dict[str, Instance] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.namespaces: list[str] = []  # every test host's namespace, for leak checks
        self._tokens: dict[str, str] = {}
        self._lock = threading.RLock()
        for name in account.images:
            self.images[f"m-{secrets.token_hex(8)}"] = {"ImageName": name, "Status": "Available"}

    def dispatch(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        handler = getattr(self, f"do_{action}", None)
        if handler is None:
            raise RpcError(400, "InvalidAction.NotFound", f"Specified api {action} is not found.")
        with self._lock:
            result: dict[str, Any] = handler(params)
        return result

    # -- instances -----------------------------------------------------------------------
    def do_CreateInstance(self, p: dict[str, str]) -> dict[str, Any]:
        token = p.get("ClientToken", "")
        if token and token in self._tokens:
            return {"InstanceId": self._tokens[token]}
        if not self.account.whitelisted:
            raise RpcError(403, "OperationDenied", "The account has not been approved for the "
                           "Cloud Migration Tool.")
        if self.account.balance < self.account.instance_price:
            raise RpcError(403, "InvalidAccountStatus.NotEnoughBalance", "Your account does "
                           "not have enough balance.")
        if p.get("RegionId", self.account.region) != self.account.region:
            raise RpcError(404, "InvalidRegionId.NotFound", "The specified RegionId does not "
                           "exist.")
        iid = f"i-{secrets.token_hex(10)}"
        base = self.workdir / "instances" / iid
        host = TestHost(base / "host", self.subnet)
        self.namespaces.append(host.netns)
        host.start()
        inst = Instance(iid, p.get("InstanceName", ""), token, host, base / "disks" / "system")
        inst.root.mkdir(parents=True)
        n = 1
        while f"DataDisk.{n}.Size" in p:
            index = int(p.get(f"DataDisk.{n}.Index", n))
            inst.data[index] = base / "disks" / f"data{index}"
            inst.data[index].mkdir(parents=True)
            n += 1
        self.instances[iid] = inst
        if token:
            self._tokens[token] = iid
        log.info("instance %s up at %s", iid, host.address)
        return {"InstanceId": iid}

    def do_DescribeInstances(self, p: dict[str, str]) -> dict[str, Any]:
        wanted = set(json.loads(p["InstanceIds"])) if p.get("InstanceIds") else None
        items = [{"InstanceId": i.id, "InstanceName": i.name, "Status": i.status,
                  "VpcAttributes": {"PrivateIpAddress": {"IpAddress": [i.host.address]}}}
                 for i in self.instances.values() if wanted is None or i.id in wanted]
        return {"Instances": {"Instance": items}, "TotalCount": len(items)}

    def do_CreateMigrationSession(self, p: dict[str, str]) -> dict[str, Any]:
        inst = self._instance(p)
        private, public = new_keypair(f"migration@{inst.id}")
        inst.host.authorize(public)
        return {"Address": inst.host.address, "Port": inst.host.port, "UserName": "root",
                "PrivateKey": private, "HostPublicKey": inst.host.host_public_key,
                "SystemDiskPath": str(inst.root),
                "DataDisks": {"DataDisk": [{"Index": i, "Path": str(d)}
                                           for i, d in sorted(inst.data.items())]}}

    def do_DeleteInstance(self, p: dict[str, str]) -> dict[str, Any]:
        inst = self._instance(p)
        self._release(inst)
        return {}

    def _instance(self, p: dict[str, str]) -> Instance:
        inst = self.instances.get(p.get("InstanceId", ""))
        if inst is None:
            raise RpcError(404, "InvalidInstanceId.NotFound", "The specified InstanceId does "
                           "not exist.")
        return inst

    def _release(self, inst: Instance) -> None:
        inst.host.stop()
        shutil.rmtree(self.workdir / "instances" / inst.id, ignore_errors=True)
        self.instances.pop(inst.id, None)

    def release_all(self) -> None:
        with self._lock:
            for inst in list(self.instances.values()):
                self._release(inst)

    # -- images ----------------------------------------------------------------------------
    def do_DescribeImages(self, p: dict[str, str]) -> dict[str, Any]:
        name = p.get("ImageName")
        items = [{"ImageId": iid, **{k: v for k, v in rec.items() if k != "Manifest"}}
                 for iid, rec in self.images.items() if not name or rec["ImageName"] == name]
        return {"Images": {"Image": items}, "TotalCount": len(items)}

    def do_CreateImage(self, p: dict[str, str]) -> dict[str, Any]:
        token = p.get("ClientToken", "")
        for iid, rec in self.images.items():
            if token and rec.get("ClientToken") == token:
                return {"ImageId": iid}
        inst = self._instance(p)
        name = p.get("ImageName", "")
        if not IMAGE_NAME.fullmatch(name) or name.startswith(("http://", "https://")):
            raise RpcError(400, "InvalidImageName.Malformed", "Specified image name is not "
                           "valid.")
        if any(rec["ImageName"] == name for rec in self.images.values()):
            raise RpcError(400, "InvalidImageName.Duplicated", "The specified Image name has "
                           "already been used.")
        found = os_platform(inst.root)
        wanted = p.get("Platform") or "Others Linux"
        if wanted not in ("Others Linux", found):
            raise RpcError(500, "UnknownError", "Unknown Error: the image could not be made "
                           "from the received disk.")
        iid = f"m-{secrets.token_hex(8)}"
        where = self.workdir / "images" / iid
        where.mkdir(parents=True)
        manifest = tree_manifest(inst.root)
        atomic_write(where / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        os.rename(inst.root, where / "system")
        inst.root.mkdir()
        for index, disk in inst.data.items():
            os.rename(disk, where / f"data{index}")
            disk.mkdir()
        size = sum(e.get("size", 0) for e in manifest.values())
        self.images[iid] = {"ImageName": name, "Status": "Available", "Platform": wanted,
                            "Architecture": p.get("Architecture") or "x86_64",
                            "ClientToken": token, "Size": size, "Path": str(where)}
        log.info("image %s (%s) made from %s", iid, name, inst.id)
        return {"ImageId": iid}

    def image_records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"ImageId": iid, **rec} for iid, rec in self.images.items()]


def os_platform(root: Path) -> str | None:
    try:
        text = (root / "etc/os-release").read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r'^ID="?([\w.-]+)"?', text, re.MULTILINE)
    return OS_IDS.get(found.group(1).lower()) if found else None


def tree_manifest(root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            entry: dict[str, Any] = {"mode": f"{stat.S_IMODE(st.st_mode):04o}",
                                     "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                entry.update(type="file", size=st.st_size, sha256=_sha256(path))
            elif stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(path))
            else:
                entry["type"] = "dir" if stat.S_ISDIR(st.st_mode) else "other"
            out[str(path.relative_to(root))] = entry
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()
