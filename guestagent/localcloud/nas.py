"""NAS for the local cloud: nfs-ganesha exporting a directory on loopback.

Ganesha listens on 127.0.0.1 on free ports (NFS and MOUNT), registers with rpcbind (started
here if none runs; stopped again if we started it) and exports ``<workdir>/export`` (under
the same path) over NFSv3 and NFSv4 (TCP). This machine's kernel has no NFS client: the export
is reached with libnfs (``nfs-ls``), which needs none.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from guestagent import process

RPCBIND_SOCKET = Path("/run/rpcbind.sock")

CONFIG = """\
NFS_CORE_PARAM {{
  NFS_Port = {nfs_port};
  MNT_Port = {mnt_port};
  Bind_Addr = 127.0.0.1;
  Protocols = 3, 4;
  Enable_NLM = false;
  Enable_RQUOTA = false;
}}
NFSV4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
  Export_Id = 1;
  Path = {export};
  Pseudo = {export};
  Access_Type = RW;
  Squash = No_Root_Squash;
  SecType = sys;
  Protocols = 3, 4;
  Transports = TCP;
  FSAL {{ Name = VFS; }}
}}
"""


class NasServer:
    """A running ganesha: ``url`` is the ``nas://`` source of its export."""

    def __init__(self, workdir: Path, ready_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.export_dir = self.workdir / "export"
        self.ready_timeout = ready_timeout
        self.nfs_port = 0
        self.mount_port = 0
        self._ganesha: process.Child | None = None
        self._rpcbind: process.Child | None = None

    @property
    def url(self) -> str:
        # NFSv3 mounts name the export by its real path: the pseudo path is the same.
        return f"nas://127.0.0.1:{self.export_dir}/"

    def start(self) -> NasServer:
        for tool in ("ganesha.nfsd", "rpcbind"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found: apt-get install nfs-ganesha "
                                   "nfs-ganesha-vfs rpcbind")
        self.export_dir.mkdir(parents=True, exist_ok=True)
        if not _rpcbind_running():
            self._rpcbind = process.spawn(["rpcbind", "-f"], name="rpcbind",
                                          log_path=self.workdir / "rpcbind.log")
            _wait(_rpcbind_running, 10.0, "rpcbind did not start")
        self.nfs_port, self.mount_port = _free_port(), _free_port()
        conf = self.workdir / "ganesha.conf"
        conf.write_text(CONFIG.format(nfs_port=self.nfs_port, mnt_port=self.mount_port,
                                      export=self.export_dir))
        log = self.workdir / "ganesha.log"
        self._ganesha = process.spawn(
            ["ganesha.nfsd", "-F", "-L", str(log), "-f", str(conf),
             "-p", str(self.workdir / "ganesha.pid")],
            name="ganesha", log_path=self.workdir / "ganesha.out", cwd=str(self.workdir))

        def ready() -> bool:
            if self._ganesha is not None and self._ganesha.poll() is not None:
                raise RuntimeError(f"ganesha.nfsd exited: see {log}")
            # Exports are served once ganesha says so, a moment after it listens.
            return _initialized(log) and _listening(self.nfs_port)

        try:
            _wait(ready, self.ready_timeout, f"ganesha did not come up: see {log}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._ganesha is not None:
            self._ganesha.stop(5.0)
            self._ganesha = None
        if self._rpcbind is not None:
            self._rpcbind.stop(5.0)
            self._rpcbind = None

    def __enter__(self) -> NasServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NasComponent:
    """``guestagent localcloud up --with nas``."""

    name = "nas"

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self._server = NasServer(Path(workdir) / "nas")

    def start(self) -> dict[str, str]:
        server = self._server.start()
        return {
            "GUESTAGENT_LOCALCLOUD_NAS": server.url,
            "GUESTAGENT_LOCALCLOUD_NAS_DIR": str(server.export_dir),
            "GUESTAGENT_LOCALCLOUD_NAS_PORT": str(server.nfs_port),
            "GUESTAGENT_LOCALCLOUD_NAS_MOUNT_PORT": str(server.mount_port),
        }

    def stop(self) -> None:
        self._server.stop()


def _rpcbind_running() -> bool:
    if not RPCBIND_SOCKET.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(RPCBIND_SOCKET))
        except OSError:
            return False
    return True


def _initialized(log: Path) -> bool:
    try:
        return b"NFS SERVER INITIALIZED" in log.read_bytes()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _wait(cond: Callable[[], bool], timeout: float, message: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(message)
        time.sleep(0.1)


__all__ = ["NasComponent", "NasServer"]
