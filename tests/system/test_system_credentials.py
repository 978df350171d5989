"""The credential listeners under a real systemd: guestagent.socket holds the Unix socket,
the agent is handed it (socket activation), and a restart of the agent leaves it bound."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SOCK = "/run/guestagent/credentials.sock"
ASK = f"""
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.settimeout(30)
        self.sock.connect({SOCK!r})
c = C("localhost", timeout=30)
c.request("GET", sys.argv[1])
r = c.getresponse()
print(json.dumps([r.status, json.loads(r.read())]))
"""


def test_socket_unit_holds_the_credential_socket_across_a_restart(emulator, guest_factory):
    from polling import wait_for

    guest = guest_factory(emulator)
    guest.boot()
    guest.wait_unit("guestagent.service")
    assert guest.show("guestagent.socket", "ActiveState")["ActiveState"] == "active"

    def ask(path: str) -> tuple[int, dict]:
        res = guest.run(["/opt/guestagent/bin/python", "-c", ASK, path])
        assert res.ok, res.stderr.decode()
        status, doc = json.loads(res.stdout)
        return status, doc

    def inode() -> str:
        return guest.run(["stat", "-c", "%i", SOCK]).text().strip()

    wait_for(lambda: ask("/v1/health")[0] == 200, timeout=120, step=0.5)
    status, doc = ask("/v1/credentials/aws")
    assert status == 200 and doc["AccessKeyId"]
    before = inode()
    assert guest.systemctl("restart", "guestagent.service").ok
    guest.wait_unit("guestagent.service")
    # The same socket (systemd's, not re-created by the agent), answering again.
    assert inode() == before
    wait_for(lambda: ask("/v1/health")[0] == 200, timeout=120, step=0.5)
    assert ask("/v1/credentials/alibaba")[1]["Code"] == "Success"
    # The endpoints the agent reports (for `credentials env`) come from what it serves.
    status, where = ask("/v1/endpoints")
    assert status == 200 and where["socket"] == SOCK
