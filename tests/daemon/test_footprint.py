"""The idle footprint (DESIGN.md §5: RSS <= 35 MB with every service on) stays in reach:
with every service switched on, the daemon's start imports none of what only transfers,
the CLIs, the local cloud or a child process need (bench/daemon.py prints the RSS each
imported package costs)."""

from __future__ import annotations

from typing import Any

from polling import wait_for

# Loaded where they are used (a transfer, a command, a test), never by an idle daemon.
NOT_AT_START = (
    "guestagent.localcloud", "guestagent.credentials.cli", "guestagent.credentials.clientenv",
    "guestagent.storage.s3", "guestagent.storage.transfer", "guestagent.storage.cli",
    "guestagent.tasks.ossregistry", "guestagent.tasks.cli", "guestagent.migrate.transfer",
    "guestagent.migrate.cli", "guestagent.metadata.cli", "guestagent.metadata.pkcs7",
    "guestagent.userdata.apply", "yaml", "email.mime", "http.server", "xml.etree.ElementTree",
    "multiprocessing", "concurrent.futures.process",
    # Each costs RSS for the life of the daemon and serves rare work: psutil (orphans left
    # by a killed agent, peers found by neither netlink nor /proc/net), urllib.request (a
    # task event URL), tarfile (a package to unpack), configparser (a job.cfg to read), and
    # what parsing a service time or resolving an IP literal no longer needs.
    "psutil", "urllib.request", "tarfile", "configparser", "_strptime", "encodings.idna",
)


def test_every_service_on_imports_nothing_it_does_not_run(agent_factory: Any) -> None:
    agent = agent_factory(
        python_flags=("-X", "importtime"),
        credentials={"enabled": True}, storage={"enabled": True}, tasks={"enabled": True},
        userdata={"enabled": True, "default_dns": False, "default_ntp": False,
                  "defer_to_cloud_init": False},
    )
    names = ("userdata", "metadata", "credentials", "storage", "tasks", "migrate",
             "maintenance", "spot")
    wait_for(lambda: agent.service("userdata")["state"] == "done", timeout=60)
    wait_for(lambda: agent.status()["healthy"], timeout=60)
    running = {s["name"] for s in agent.status()["services"]}
    assert set(names) <= running, running
    # A dozen threads share two malloc arenas (the main one and one more), not one each.
    assert len(_malloc_heaps(agent.pid)) <= 1
    assert agent.stop() == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in agent.log().splitlines()
                if line.startswith("import time:")}
    # The listing is real: what each service runs on is in it (the registry's
    # importlib.import_module of a service module itself is not listed by -X importtime;
    # everything that module imports is).
    for present in ("guestagent.credentials.server", "guestagent.storage.api",
                    "guestagent.tasks.scheduler", "guestagent.spot.watcher"):
        assert present in imported, present
    assert [m for m in NOT_AT_START if m in imported] == []


HEAP = 64 << 20  # glibc's non-main arenas live in 64 MiB-aligned, 64 MiB reservations


def _malloc_heaps(pid: int) -> list[int]:
    """Start addresses of the process's extra malloc arenas, from /proc/<pid>/maps: an
    aligned read-write mapping followed by its reserve (no access) up to the 64 MiB mark."""
    spans = []
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[1], len(fields) > 5))
    heaps = []
    for (start, end, perms, named), nxt in zip(spans, [*spans[1:], (0, 0, "", True)], strict=True):
        if start % HEAP or named or perms != "rw-p":
            continue
        if end - start == HEAP or (nxt[0] == end and nxt[2] == "---p" and nxt[1] == start + HEAP):
            heaps.append(start)
    return heaps
