"""Host-mode task instances under a real systemd 252: each runs in a transient unit of its
own (outside guestagent.service's cgroup, which KillMode=mixed empties at every stop), so
``systemctl restart guestagent`` and a kill -9 of the agent neither kill nor duplicate it;
the next agent re-adopts it, its task credentials answer again, and it finishes once with
its outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# The instance: counts its starts, waits for the test's gate, then asks for credentials
# with what it was given at its start (before both agent restarts).
BODY = """
import json, os, time, urllib.request as u
with open("/var/tmp/task-runs", "a") as runs:
    runs.write(str(os.getpid()) + "\\n")
while not os.path.exists("/var/tmp/task-gate"):
    time.sleep(0.2)
# As an SDK would, retry while the new agent is still re-adopting this instance.
for _ in range(120):
    try:
        doc = json.loads(u.urlopen(os.environ["ALIBABA_CLOUD_CREDENTIALS_URI"], timeout=5).read())
        break
    except OSError as exc:
        print("not yet:", exc, flush=True)
        time.sleep(0.5)
print("credentials", doc["Code"])
open("/var/tmp/task-out", "w").write("done\\n")
"""

JOB = {"Name": "held", "Type": "DAG", "DAG": {"Tasks": {"hold": {"Parameters": {
    "Command": {"CommandLine": "python3 /var/tmp/task-body.py"}}}}, "Dependencies": {}}}


def runs(guest: Any) -> list[str]:
    res = guest.run(["cat", "/var/tmp/task-runs"])
    return res.text().split() if res.ok else []


def show(guest: Any, job_id: str) -> dict[str, Any]:
    res = guest.run(["guestagent", "tasks", "show", job_id, "--json"])
    assert res.ok, res.stderr
    return dict(json.loads(res.stdout))


def agent_pid(guest: Any) -> str:
    return guest.show("guestagent.service", "MainPID")["MainPID"]


def test_host_instance_outlives_agent_restarts(emulator: Any, guest_factory: Any) -> None:
    guest = guest_factory(emulator, files={"/var/tmp/task-body.py": BODY,
                                           "/var/tmp/job.json": json.dumps(JOB)})
    guest.boot()
    guest.wait_unit("guestagent.service")
    # The daemon's tasks service takes the job (without it, submit would run it itself).
    wait_for(lambda: guest.run(["test", "-S", "/run/guestagent/tasks.sock"]).ok, timeout=120,
             step=0.5)
    submitted = guest.run(["guestagent", "tasks", "submit", "/var/tmp/job.json"])
    assert submitted.ok, submitted.stderr
    job_id = submitted.text().strip()
    wait_for(lambda: len(runs(guest)) == 1, timeout=120, step=0.5)
    pid = runs(guest)[0]

    # Its own transient unit, not the agent's cgroup.
    cgroup = guest.run(["cat", f"/proc/{pid}/cgroup"]).text()
    assert "/guestagent-task-" in cgroup and "/guestagent.service" not in cgroup, cgroup

    # A restart (SIGTERM, then KillMode=mixed empties the agent's cgroup) ...
    before = agent_pid(guest)
    assert guest.systemctl("restart", "guestagent.service").ok
    guest.wait_unit("guestagent.service")
    assert agent_pid(guest) != before
    # ... and a kill -9 of the agent (systemd restarts it: Restart=on-failure).
    before = agent_pid(guest)
    assert guest.systemctl("kill", "--signal=SIGKILL", "--kill-whom=main",
                           "guestagent.service").ok
    wait_for(lambda: agent_pid(guest) not in ("0", before), timeout=120, step=0.5)
    guest.wait_unit("guestagent.service")
    assert guest.run(["test", "-d", f"/proc/{pid}"]).ok, "the instance died with the agent"
    assert show(guest, job_id)["state"] == "Running"

    assert guest.run(["touch", "/var/tmp/task-gate"]).ok
    wait_for(lambda: show(guest, job_id)["state"] in ("Finished", "Failed"), timeout=180,
             step=1.0)
    shown = show(guest, job_id)
    assert shown["state"] == "Finished", (shown, guest.journal("-u", "guestagent.service"))
    (inst,) = shown["tasks"][0]["instances"]
    assert inst["exit_code"] == 0 and inst["retries"] == 0
    assert runs(guest) == [pid]  # started once, never again
    assert guest.run(["cat", "/var/tmp/task-out"]).text() == "done\n"
    logs = guest.run(["guestagent", "tasks", "logs", job_id, "hold", "0"])
    assert "credentials Success" in logs.text(), logs.text()
    # The transient unit is collected once the instance ended.
    wait_for(lambda: guest.run(["systemctl", "list-units", "--all", "--no-legend",
                                "guestagent-task-*"]).text().strip() == "", timeout=60)
