"""The one way this project runs other programs.

Every subprocess goes through :func:`run` (to completion) or :func:`spawn` (long-running):
argv only (never a shell string built from input), its own process group, tracked while it
lives. What a child leaves behind is ours to end too: each child and its descendants carry
a tag in their environment (:data:`TAG_ENV`), and the agent is a child subreaper
(:func:`become_subreaper`), so a grandchild that escaped the group (``setsid … &`` in a
hook) is re-parented to the agent instead of init and found by its tag. At a child's
deadline the group and every tagged descendant are killed, and reading its output never
waits on a pipe that such a grandchild keeps open.

Children started with ``group="drain"`` (say) can be ended together with
:func:`end_group`, without touching any other child of the agent.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import resource
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TAG_ENV = "GUESTAGENT_CHILD"  # inherited by every descendant: "<agent pid>.<serial>"
LINGER = 0.5  # after the child exits, how long its output may still trickle in
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class ProcessError(Exception):
    """A program could not be started, timed out, or (with ``check``) failed."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False
    leftovers: int = 0  # descendants still running when it ended, killed at its deadline

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def text(self) -> str:
        return self.stdout.decode(errors="replace")


# -- tracking ---------------------------------------------------------------------------

@dataclass
class _Entry:
    tag: str
    pid: int
    group: str | None


_serial = itertools.count(1)
_live: dict[str, _Entry] = {}
_live_lock = threading.Lock()
# Tags of finished children per group: what they left behind is ended with the group.
_past: dict[str, list[str]] = {}
MAX_PAST = 500
_state: dict[str, Any] = {"subreaper": False, "owner": ""}


def _new_tag() -> str:
    return f"{_state['owner']}|{os.getpid()}.{next(_serial)}"


def set_owner(owner: str) -> None:
    """Name the agent instance (its state directory) in every child's tag, so that the next
    instance can find what a killed one left running (:func:`end_orphans`)."""
    _state["owner"] = owner.replace("|", "/")


def end_orphans() -> int:
    """Kill children of a previous agent instance with the same owner that died with their
    parent gone (kill -9, a crash): their output had no reader left and their work is run
    again. Only processes tagged with this owner are looked at, so another agent's children
    are never touched. Returns how many were killed."""
    owner = _state["owner"]
    if not owner:
        return 0
    candidates = _tagged_pids(f"{TAG_ENV}={owner}|".encode())
    if not candidates:
        return 0  # the usual start: psutil stays out of the idle daemon
    import psutil

    killed = 0
    for pid in candidates:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            proc = psutil.Process(pid)
            tag = proc.environ().get(TAG_ENV, "")
            tag_owner, _, rest = tag.rpartition("|")
            if tag_owner != owner:
                continue
            agent = int(rest.split(".", 1)[0])
            if agent == os.getpid() or _alive_since(agent, proc.create_time()):
                continue
            proc.kill()
            killed += 1
    if killed:
        log.warning("killed %d process(es) left running by a previous agent", killed)
    return killed


def _tagged_pids(needle: bytes) -> list[int]:
    """Processes whose environment holds ``needle`` (read from /proc, no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if environ.startswith(needle) or b"\0" + needle in environ:
            found.append(int(entry))
    return found


def _alive_since(pid: int, before: float) -> bool:
    """Whether ``pid`` is a process that already existed at time ``before`` (not a reuse)."""
    import psutil

    try:
        return bool(psutil.Process(pid).create_time() <= before)
    except psutil.Error:
        return False


def _track(entry: _Entry) -> None:
    with _live_lock:
        _live[entry.tag] = entry


def _untrack(tag: str) -> None:
    with _live_lock:
        entry = _live.pop(tag, None)
        if entry is not None and entry.group is not None:
            past = _past.setdefault(entry.group, [])
            past.append(tag)
            del past[:-MAX_PAST]


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (PR_SET_CHILD_SUBREAPER):
    what a hook leaves behind stays in the agent's tree, findable and reapable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        ok = False
    _state["subreaper"] = ok
    if not ok:
        log.info("no child subreaper (prctl failed): escaped grandchildren go to init")
    return ok


def _tagged(tags: set[str]) -> list[int]:
    """Pids of our descendants (and, failing that, of any process we can read) whose
    environment carries one of ``tags``."""
    import psutil  # lazily: only needed when something must be ended

    found = []
    try:
        candidates = psutil.Process().children(recursive=True)
    except psutil.Error:
        candidates = []
    if not _subreaper_on():
        candidates += list(psutil.process_iter())
    seen: set[int] = set()
    for proc in candidates:
        if proc.pid in seen or proc.pid == os.getpid():
            continue
        seen.add(proc.pid)
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(TAG_ENV) in tags:
                found.append(proc.pid)
    return found


def _subreaper_on() -> bool:
    return bool(_state["subreaper"])


def _kill_tree(leader: int, tag: str, sig: int = signal.SIGKILL) -> int:
    """Signal ``leader``'s process group and every descendant tagged ``tag``; returns how
    many processes outside the group were found (escaped ones)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, sig)
    escaped = 0
    # An untagged child (survive_agent) has no descendants we could tell from others.
    for pid in _tagged({tag}) if tag else []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) != leader:
                escaped += 1
            os.kill(pid, sig)
    reap_adopted()
    return escaped


def end_group(group: str, sig: int = signal.SIGKILL) -> int:
    """End every running child started with ``group`` and whatever its children, running
    or finished, left behind; returns how many processes were signalled."""
    with _live_lock:
        entries = [e for e in _live.values() if e.group == group]
        past = set(_past.pop(group, []))
    for entry in entries:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(entry.pid, sig)
    pids = _tagged(past | {e.tag for e in entries}) if (past or entries) else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    reap_adopted()
    return len(set(pids) | {e.pid for e in entries})


def reap_adopted() -> int:
    """Collect exited orphans re-parented to us (we are their subreaper); never touches a
    child that one of our own Popen objects waits for."""
    import psutil

    with _live_lock:
        ours = {e.pid for e in _live.values()}
    reaped = 0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            if child.pid in ours:
                continue
            with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
                    reaped += 1
    return reaped


# -- between fork and exec --------------------------------------------------------------

def _own_oom_adj() -> int:
    """The agent's OOM score adjustment, read once: its unit sets it at start, and a
    /proc read at each spawn showed up in the task launcher's profile."""
    if "oom_adj" not in _state:
        try:
            with open("/proc/self/oom_score_adj") as fh:
                _state["oom_adj"] = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            _state["oom_adj"] = 0
    return int(_state["oom_adj"])


def _preexec(memory_limit: int | None, die_with_parent: bool) -> Callable[[], None] | None:
    """What the child does between fork and exec (system calls only, nothing that locks).

    ``die_with_parent``: PR_SET_PDEATHSIG, the kernel kills the child when the thread that
    forked it ends, which for :func:`run` (it waits) is when the agent dies. A negative
    OOM score adjustment (the agent's unit sets one for the agent alone) is reset to 0:
    hooks and user-data are ordinary work, first in line for the OOM killer like any."""
    reset_oom = _own_oom_adj() < 0
    if memory_limit is None and not die_with_parent and not reset_oom:
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl if die_with_parent else None
    parent = os.getpid()

    def apply() -> None:
        if reset_oom:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the prctl took hold
                os._exit(1)

    return apply


def _untagged(env: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (os.environ if env is None else env).items() if k != TAG_ENV}


def _child_env(env: Mapping[str, str] | None, tag: str) -> dict[str, str]:
    return {**(dict(env) if env is not None else os.environ), TAG_ENV: tag}


# -- run to completion ------------------------------------------------------------------

def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 60.0,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    cwd: str | None = None,
    check: bool = False,
    group: str | None = None,
    memory_limit: int | None = None,
    die_with_parent: bool = False,
) -> Result:
    """Run ``argv`` to completion; at ``timeout`` kill its group and every descendant.

    Output is read until the child exits (plus :data:`LINGER`), never until a grandchild
    that inherited the pipes lets go. ``memory_limit`` caps the child's address space
    (bytes, RLIMIT_AS). ``die_with_parent`` has the kernel SIGKILL the child if the agent
    dies first, for helpers that must never outlive it (a validator, a schema check).
    """
    args = tuple(str(a) for a in argv)
    tag = _new_tag()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(env, tag),
            cwd=cwd,
            start_new_session=True,
            # Only a preloaded prctl/setrlimit runs between fork and exec (see _preexec).
            preexec_fn=_preexec(memory_limit, die_with_parent),  # noqa: PLW1509
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {args[0]}: {exc.strerror or exc}") from exc
    _track(_Entry(tag, proc.pid, group))
    try:
        deadline = None if timeout is None else start + timeout
        out, err, timed_out = _collect(proc, input, deadline)
        leftovers = 0
        if timed_out:
            leftovers = _kill_tree(proc.pid, tag)
            if leftovers:
                log.warning("%s: killed %d process(es) it had left outside its group",
                            args[0], leftovers)
        proc.wait()
    finally:
        _untrack(tag)
    result = Result(args, proc.returncode, out, err, time.monotonic() - start, timed_out,
                    leftovers)
    log.debug("ran %s -> rc=%s in %.3fs", args[0], result.returncode, result.seconds)
    if check and not result.ok:
        why = f"timed out after {timeout}s" if timed_out else f"exited {result.returncode}"
        detail = err.decode(errors="replace").strip().splitlines()
        raise ProcessError(f"{args[0]} {why}" + (f": {detail[-1]}" if detail else ""))
    return result


def _collect(proc: subprocess.Popen[bytes], data: bytes | None,
             deadline: float | None) -> tuple[bytes, bytes, bool]:
    """Feed stdin, read stdout/stderr until the child exits (+LINGER) or ``deadline``.
    Returns (stdout, stderr, timed out). The pipes are closed on return."""
    chunks: dict[int, list[bytes]] = {}
    out_fd = proc.stdout.fileno() if proc.stdout else -1
    err_fd = proc.stderr.fileno() if proc.stderr else -1
    sel = selectors.DefaultSelector()
    pending = memoryview(data or b"")
    try:
        _register(sel, proc, chunks)
        stop_at = deadline
        timed_out = False
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and (stop_at is None or stop_at > now + LINGER):
                stop_at = now + LINGER  # it exited: whoever holds the pipes gets no longer
            if stop_at is not None and now >= stop_at:
                timed_out = proc.poll() is None
                break
            wait = None if stop_at is None else stop_at - now
            for key, _ in sel.select(min(wait, 0.5) if wait is not None else 0.5):
                pending = _step(sel, key, chunks, pending)
    finally:
        sel.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    if timed_out:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return b"".join(chunks.get(out_fd, [])), b"".join(chunks.get(err_fd, [])), timed_out


def _register(sel: selectors.BaseSelector, proc: subprocess.Popen[bytes],
              chunks: dict[int, list[bytes]]) -> None:
    """Watch the child's output pipes (a chunk list each) and its stdin (non-blocking)."""
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            chunks[stream.fileno()] = []
            sel.register(stream, selectors.EVENT_READ)
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)


def _step(sel: selectors.BaseSelector, key: selectors.SelectorKey,
          chunks: dict[int, list[bytes]], pending: memoryview) -> memoryview:
    """One ready pipe: write what is pending to stdin, or read a chunk of output."""
    stream = key.fileobj
    fd = key.fd
    if key.events & selectors.EVENT_WRITE:
        try:
            written = os.write(fd, pending[:65536]) if pending else 0
        except BrokenPipeError:
            written, pending = 0, memoryview(b"")
        pending = pending[written:]
        if not pending:
            sel.unregister(stream)
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        return pending
    data = os.read(fd, 65536)
    if data:
        chunks[fd].append(data)
    else:
        sel.unregister(stream)
    return pending


# -- long-running children --------------------------------------------------------------

class Child:
    """A long-running child started by :func:`spawn`: its own process group, ended with it
    and with whatever it left behind.

    ``stop`` sends SIGTERM to the group, waits ``grace`` seconds, then SIGKILLs the group
    and every tagged descendant.
    """

    def __init__(self, proc: subprocess.Popen[bytes], name: str, tag: str) -> None:
        self._proc = proc
        self.name = name
        self.tag = tag

    def __repr__(self) -> str:  # argv may carry paths, never secrets; keep it short anyway
        return f"Child({self.name!r}, pid={self.pid})"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        code = self._proc.poll()
        if code is not None:
            _untrack(self.tag)
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds.

        With a timeout, the exit is seen the moment it happens (a pidfd), not at the next
        step of :meth:`subprocess.Popen.wait`'s polling, whose sleeps grow to 50 ms: a
        short task would otherwise end up to 50 ms late for whoever waits on it."""
        if timeout is not None and self._proc.returncode is None:
            exited = _exit_within(self._proc.pid, timeout)
            if exited is False:
                return None
            if exited:
                timeout = max(timeout, 1.0)  # it is a zombie: the first waitpid reaps it
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        _untrack(self.tag)
        return code

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM to the group, ``grace`` seconds, then SIGKILL to the group and to every
        descendant still running (escaped ones included)."""
        if self._proc.poll() is None:
            self.signal(signal.SIGTERM)
            self.wait(grace)
        _kill_tree(self._proc.pid, self.tag)
        self.wait(grace)
        _untrack(self.tag)
        return self._proc.returncode


def _exit_within(pid: int, timeout: float) -> bool | None:
    """Whether child ``pid`` exits within ``timeout`` seconds, without reaping it; None
    when no pidfd can tell (no pidfd_open, or the pid is already gone)."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


def spawn(
    argv: Sequence[str],
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
    stdin: bytes | None = None,
    group: str | None = None,
    survive_agent: bool = False,
    stderr_path: str | os.PathLike[str] | None = None,
) -> Child:
    """Start ``argv`` in the background in its own process group.

    Output goes to ``log_path`` (appended) or is discarded: never to a pipe that nobody
    reads; with ``stderr_path`` the error stream goes there instead (a task's two logs).
    The caller ends it with :meth:`Child.stop`. Under systemd it dies with the
    agent's cgroup: work that must outlive an agent restart goes through
    :func:`guestagent.detached.start` (a transient unit there). ``survive_agent`` (used by
    that module without systemd) leaves it untagged and untracked, so nothing of the agent
    ends it as a leftover.
    """
    args = tuple(str(a) for a in argv)
    tag = "" if survive_agent else _new_tag()
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    err = open(stderr_path, "ab") if stderr_path is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err if err is not None else subprocess.STDOUT,
            env=_child_env(env, tag) if tag else _untagged(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_preexec(None, False),  # noqa: PLW1509 - see _preexec
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {args[0]}: {exc.strerror or exc}") from exc
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
        if err is not None:
            err.close()
    if tag:
        _track(_Entry(tag, proc.pid, group))
    if stdin is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        proc.stdin.close()
    log.debug("spawned %s pid=%s", args[0], proc.pid)
    return Child(proc, name or os.path.basename(args[0]), tag)


# -- the init system ----------------------------------------------------------------------

def systemd_running() -> bool:
    """Whether systemd is PID 1 here (``sd_booted()``'s test: /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")
