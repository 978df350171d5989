"""The guide's notification events (OnJobWaiting … OnInstanceFailed) with its JSON bodies.

Every event goes into the job's event log (``tasks show``); the ones the job subscribes
to (``Notification.Topic.Events``; all when it names none) are delivered to the
configured local command (body on stdin) and/or loopback URL (HTTP POST). Delivery never
blocks the scheduler for long and a failure is logged, not fatal: events are advisory.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from guestagent import process
from guestagent.tasks.settings import TasksSettings
from guestagent.tasks.store import Store

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT = 5.0


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Events:
    def __init__(self, store: Store, settings: TasksSettings) -> None:
        self.store = store
        self.command = shlex.split(settings.notify_command) if settings.notify_command else []
        self.url = settings.notify_url
        self._lock = threading.Lock()  # deliveries in event order

    def job(self, job_id: str, subscribed: tuple[str, ...], state: str,
            message: str = "") -> None:
        row = self.store.job(job_id)
        body = {"Category": "Job", "JobId": job_id, "JobName": row["name"],
                "Event": f"OnJob{state}", "State": state,
                "CreationTime": iso(row["created"]), "StartTime": iso(row["started"]),
                "EndTime": iso(row["ended"]), "Message": message}
        self._emit(job_id, subscribed, body)

    def task(self, job_id: str, subscribed: tuple[str, ...], task: str, state: str) -> None:
        row = self.store.tasks(job_id)[task]
        body = {"Category": "Job", "JobId": job_id, "Task": task, "Event": f"OnTask{state}",
                "State": state, "StartTime": iso(row["started"]), "EndTime": iso(row["ended"])}
        self._emit(job_id, subscribed, body)

    def instance(self, job_id: str, subscribed: tuple[str, ...], task: str, index: int,
                 *, redirects: Mapping[str, str], error: str = "") -> None:
        inst = self.store.instance(job_id, task, index)
        body = {"Category": "Job", "JobId": job_id, "Task": task, "InstanceId": str(index),
                "Event": f"OnInstance{inst.state}", "State": inst.state,
                "StartTime": iso(inst.started), "EndTime": iso(inst.ended),
                "RetryCount": str(inst.retries),
                "Progress": "100" if inst.state == "Finished" else "0",
                "StdoutRedirectPath": redirects.get("stdout", ""),
                "StderrRedirectPath": redirects.get("stderr", ""),
                "ExitCode": "" if inst.exit_code is None else str(inst.exit_code),
                "ErrorCode": "", "ErrorMessage": error or inst.message, "Detail": ""}
        self._emit(job_id, subscribed, body)

    def _emit(self, job_id: str, subscribed: tuple[str, ...], body: dict[str, Any]) -> None:
        event = str(body["Event"])
        self.store.add_event(job_id, event, body)
        if subscribed and event not in subscribed:
            return
        if not (self.command or self.url):
            return
        data = json.dumps(body).encode()
        with self._lock:
            self._deliver(event, data)

    def _deliver(self, event: str, data: bytes) -> None:
        start = time.monotonic()
        if self.command:
            try:
                result = process.run(self.command, input=data, timeout=DELIVERY_TIMEOUT)
                if not result.ok:
                    log.warning("notify command for %s exited %s", event, result.returncode)
            except process.ProcessError as exc:
                log.warning("notify command for %s: %s", event, exc)
        if self.url:
            req = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=DELIVERY_TIMEOUT) as resp:
                    resp.read()
            except OSError as exc:
                log.warning("notify URL for %s: %s", event, exc)
        log.debug("delivered %s in %.3fs", event, time.monotonic() - start)
