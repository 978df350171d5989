"""``guestagent image demo``: the agent baked as on an image, booted under a real systemd
(``systemd-nspawn --boot``) against the local cloud: first boot applies user-data from the
templates, a program reads credentials, a spot notice drains and powers the guest off.

Needs root, ``debootstrap`` and ``systemd-container``; the first run builds the Debian tree
(a few minutes), later runs reuse it from the cache.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from guestagent.images import agent, nspawn, rootfs, tools

# The guest shares this machine's network: keep only the Unix credential socket.
DROP_INS = {
    "etc/systemd/system/guestagent.socket.d/40-demo.conf":
        "[Socket]\nListenStream=\nListenStream=/run/guestagent/credentials.sock\n",
    "etc/systemd/system/guestagent.service.d/40-demo.conf":
        "[Service]\nEnvironment=GUESTAGENT_CREDENTIALS_TCP_PORT=0\n",
}
READ = ("import http.client,json,socket\n"
        "class U(http.client.HTTPConnection):\n"
        "    def connect(self):\n"
        "        self.sock=socket.socket(socket.AF_UNIX)\n"
        "        self.sock.connect('/run/guestagent/credentials.sock')\n"
        "c=U('localhost'); c.request('GET','/v1/credentials/alibaba')\n"
        "d=json.loads(c.getresponse().read()); print(d['Code'], d['AccessKeyId'][:6]+'...')\n")


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def unsupported() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        tools.require("debootstrap", "systemd-nspawn", "nsenter")
    except tools.MissingTool as exc:
        return str(exc)
    return None


def run_demo(cache: Path, user_data: bytes) -> int:
    from guestagent.localcloud.emulator import Emulator

    _say("Debian 12 tree (debootstrap --variant=minbase + systemd, python3), cached")
    base = rootfs.ensure(rootfs.Recipe(), cache)
    print(base)
    with tempfile.TemporaryDirectory(prefix="guestagent-image-demo.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        _say("the agent installed as on an image (images/install-agent)")
        wheels = agent.wheelhouse(agent.checkout_root(), cache, work / "wheels")
        with nspawn.overlay([base], work / "layer", work / "merged") as merged:
            agent.install(merged, wheels, agent.checkout_root())
        with Emulator().start() as emu, \
                nspawn.overlay([work / "layer", base], work / "upper", work / "root") as root:
            emu.set_user_data(user_data)
            (root / "etc/guestagent").mkdir(parents=True, exist_ok=True)
            (root / "etc/guestagent/agent.toml").write_text(f'[metadata]\nurl = "{emu.url}"\n'
                                                            '[spot]\nfinal_action = "poweroff"\n')
            for rel, text in DROP_INS.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text)
            guest = nspawn.Machine(root, f"ga-demo-{os.getpid()}", work / "boot.log")
            try:
                return _inside(guest, emu)
            finally:
                guest.poweroff()


def _inside(guest: nspawn.Machine, emu: object) -> int:
    _say("systemd-nspawn --boot (a real systemd 252 as the guest's PID 1)")
    start = time.monotonic()
    guest.boot()
    guest.wait_unit("guestagent.service")
    print(f"guestagent.service active {time.monotonic() - start:.1f} s after nspawn started")
    guest.wait_booted()
    for title, cmd in (
        ("first boot (local stage: configuration before sshd and network-online)",
         ["systemctl", "--no-pager", "status", "guestagent-firstboot-local.service"]),
        ("DNS from user-data", ["cat", "/etc/resolv.conf"]),
        ("the sudo account from user-data", ["id", "ops"]),
        ("the agent inside", ["guestagent", "status"]),
        ("a plain program reads credentials through the socket", ["python3", "-c", READ]),
    ):
        _say(title)
        print(guest.run(cmd).text().rstrip())
    _say("spot notice from the emulator: drain, then poweroff before the release")
    emu.schedule_termination(in_seconds=0, release_after=120)  # type: ignore[attr-defined]
    noticed = time.monotonic()
    code = guest.wait_exit(120)
    if code is None:
        print("the guest was still running at the release time")
        return 1
    print(f"the guest powered off {time.monotonic() - noticed:.1f} s after the notice "
          "(release after 120 s)")
    return 0
