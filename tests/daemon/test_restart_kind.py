"""Which unit the agent runs in, read from /proc/self/cgroup (v1 hybrid and v2 shapes): what
the daemon asks systemd about when a SIGTERM comes (restart, or stop?)."""

from __future__ import annotations

from guestagent.daemon.restart import own_unit, restart_pending

V2 = "0::/system.slice/guestagent.service\n"
HYBRID = ("12:pids:/system.slice/guestagent.service\n5:devices:/system.slice/guestagent.service\n"
          "1:name=systemd:/system.slice/guestagent.service\n0::/system.slice/guestagent.service\n")
NESTED = "0::/system.slice/guestagent.service/init.scope\n"


def test_the_unit_is_read_from_either_hierarchy() -> None:
    assert own_unit(V2) == "guestagent.service"
    assert own_unit(HYBRID) == "guestagent.service"
    assert own_unit("1:name=systemd:/user.slice/user-0.slice/session-3.scope\n0::/\n") is None
    assert own_unit("0::/\n") is None and own_unit("") is None
    assert own_unit(NESTED) is None  # a delegated sub-cgroup: not the unit itself


def test_outside_a_restarting_unit_a_sigterm_is_a_stop() -> None:
    # This process is in no service unit (or in no systemd at all): never a restart.
    assert restart_pending() is False
