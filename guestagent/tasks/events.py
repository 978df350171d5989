"""The guide's notification events (OnJobWaiting … OnInstanceFailed) with its JSON bodies.

Every event goes into the job's event log (``tasks show``); the ones the job subscribes
to (``Notification.Topic.Events``; all when it names none) are delivered to the
configured local command (body on stdin) and/or loopback URL (HTTP POST). An event is in
the log (the store) before the step that follows it; delivery is in event order by one
thread of its own, so a slow command or URL never holds up an instance, and a failure is
logged, not fatal: events are advisory. ``flush`` waits for the deliveries (a job's run
returns only once its events went out).
"""

from __future__ import annotations

import json
import logging
import queue
import shlex
import threading
import time
from collections.abc import Mapping
from typing import Any

from guestagent import process
from guestagent.tasks.settings import TasksSettings
from guestagent.tasks.store import Store

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT = 5.0


def iso(ts: float | None) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (time.strftime: datetime's was a hot spot)."""
    if ts is None:
        return ""
    whole = int(ts)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            + f".{min(999999, int((ts - whole) * 1e6)):06d}Z")


class Events:
    def __init__(self, store: Store, settings: TasksSettings) -> None:
        self.store = store
        self.command = shlex.split(settings.notify_command) if settings.notify_command else []
        self.url = settings.notify_url
        # (event, body) to deliver, or a flush's marker, set once all before it are done
        self._queue: queue.Queue[tuple[str, bytes] | threading.Event] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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
        self._queue.put((event, json.dumps(body).encode()))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliveries, name="task-events",
                                                daemon=True)
                self._thread.start()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every event emitted so far was delivered (or failed); False when
        ``timeout`` ran out first."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _deliveries(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            event, data = item
            try:
                self._deliver(event, data)
            except Exception:  # never lose the thread: later events still go out
                log.exception("delivering %s", event)

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
            import urllib.request  # lazily: most instances set no URL

            req = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=DELIVERY_TIMEOUT) as resp:
                    resp.read()
            except OSError as exc:
                log.warning("notify URL for %s: %s", event, exc)
        log.debug("delivered %s in %.3fs", event, time.monotonic() - start)
