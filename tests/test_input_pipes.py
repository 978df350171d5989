"""Input files that are not regular files: a named pipe with no writer fails in bounded
time naming the file (it used to block forever); one with a writer, process substitution
(`<(cmd)`) and `-` still work; directories, devices and sockets are refused by type."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for

from guestagent import files

USER_DATA = "#!/bin/sh\necho hi\n"

# Each command with the file it reads as FILE; its refusal leaves STATE untouched.
COMMANDS = {
    "tasks submit": (("tasks", "submit", "FILE", "--foreground"), "job.json"),
    "userdata validate": (("userdata", "validate", "FILE"), "user-data"),
    "userdata apply": (("userdata", "apply", "--file", "FILE", "--instance-id", "i-1",
                        "--root", "ROOT"), "user-data"),
    "migrate check": (("migrate", "check", "--config", "FILE"), "user_config.json"),
    "config": (("--config", "FILE", "config", "show"), "agent.toml"),
}

# The CLI with another FIFO_WAIT: a writer-less pipe refused in a second, not ten; or a
# writer given a minute, however loaded the machine.
WITH_WAIT = ("import sys; import guestagent.files as f; f.FIFO_WAIT = {wait}; "
             "from guestagent.cli import main; sys.exit(main(sys.argv[1:]))")
SHORT_WAIT = WITH_WAIT.format(wait=1.0)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "root").mkdir()
    (tmp_path / "agent.toml").write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                                         f'run_dir = "{tmp_path / "run"}"\n')
    yield tmp_path


def run_cli(home: Path, command: str, path: str, *, wait: float | None = 1.0,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command on ``path`` with FIFO_WAIT ``wait`` (None: the default)."""
    argv, _ = COMMANDS[command]
    args = [path if a == "FILE" else str(home / "root") if a == "ROOT" else a for a in argv]
    if command != "config":
        args = ["--config", str(home / "agent.toml"), *args]
    prefix = ["-m", "guestagent"] if wait is None else ["-c", WITH_WAIT.format(wait=wait)]
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True,
                          input=stdin, timeout=120, cwd=home)


def state_of(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_fifo_with_no_writer_fails_naming_it_and_changes_nothing(
        home: Path, command: str) -> None:
    fifo = home / "in.fifo"
    os.mkfifo(fifo)
    before = state_of(home)
    done = run_cli(home, command, str(fifo))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert str(fifo) in done.stderr and "a named pipe that had no writer for 1 s" in done.stderr
    assert state_of(home) == before


def test_the_default_wait_is_bounded_too(home: Path) -> None:
    fifo = home / "job.json"
    os.mkfifo(fifo)
    done = run_cli(home, "tasks submit", str(fifo), wait=None)
    assert done.returncode == 2
    assert f"{fifo}: cannot read the job file: a named pipe that had no writer for " \
           f"{files.FIFO_WAIT:g} s" in done.stderr
    assert not (home / "state").exists()


def _feed(fifo: Path, text: str) -> threading.Thread:
    """A writer: its open waits for the reader, then it writes everything and closes."""
    def write() -> None:
        with open(fifo, "w") as fh:
            fh.write(text)
    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def test_a_fifo_with_a_writer_is_read_to_its_end(home: Path) -> None:
    fifo = home / "user-data"
    os.mkfifo(fifo)
    writer = _feed(fifo, USER_DATA)
    done = run_cli(home, "userdata validate", str(fifo), wait=60.0)
    writer.join(60)
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout


def test_a_large_fifo_over_the_limit_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "FIFO_WAIT", 60.0)
    fifo = tmp_path / "big"
    os.mkfifo(fifo)
    stop = threading.Event()

    def write() -> None:
        try:
            with open(fifo, "wb") as fh:
                while not stop.is_set():
                    fh.write(b"x" * 65536)
        except BrokenPipeError:  # the reader gave up at the limit: expected
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    with pytest.raises(OSError) as info:
        files.read_input(fifo, limit=1024 * 1024)
    stop.set()
    thread.join(60)
    assert info.value.errno == errno.EFBIG


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_process_substitution_and_stdin_still_work(home: Path, tmp_path: Path) -> None:
    (tmp_path / "ud").write_text(USER_DATA)
    env = dict(os.environ, GUESTAGENT_CONFIG=str(home / "agent.toml"))
    # <(cmd) gives /dev/fd/N, a pipe with no name: read to its end however slow the writer.
    done = subprocess.run(
        ["bash", "-c", f'"$0" -c "$1" userdata validate <(cat {tmp_path / "ud"})',
         sys.executable, SHORT_WAIT],
        capture_output=True, text=True, timeout=120, env=env, cwd=home)
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout
    piped = run_cli(home, "userdata validate", "-", stdin=USER_DATA)
    assert piped.returncode == 0 and "valid" in piped.stdout, piped.stderr


def test_an_anonymous_pipe_is_not_bounded(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Even with no wait at all, a pipe with no name is read until its writer ends it: the
    # writer here sends only once the reader has opened /dev/fd/N and is waiting.
    monkeypatch.setattr(files, "FIFO_WAIT", 0.0)
    read_end, write_end = os.pipe()
    inode = os.fstat(read_end).st_ino

    def opened_by_reader() -> bool:
        fds = os.listdir("/proc/self/fd")
        links = []
        for fd in fds:
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
        return links.count(f"pipe:[{inode}]") >= 3  # our two ends and the reader's

    def write() -> None:
        wait_for(opened_by_reader, timeout=60)
        os.write(write_end, b"late data")
        os.close(write_end)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        assert files.read_input(f"/dev/fd/{read_end}") == b"late data"
    finally:
        thread.join(60)
        os.close(read_end)


def _block_device() -> str | None:
    for entry in os.scandir("/dev"):
        try:
            if stat.S_ISBLK(os.stat(entry.path).st_mode):
                return entry.path
        except OSError:
            continue
    return None


def test_directories_devices_and_sockets_are_refused_by_type(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    cases = {str(tmp_path): "a directory", "/dev/null": "a character device",
             str(sock_path): "a socket"}
    block = _block_device()
    if block is not None:
        cases[block] = "a block device"
    try:
        for path, kind in cases.items():
            with pytest.raises(OSError) as info:
                files.read_input(path)
            assert info.value.strerror == f"{kind}, not a regular file: name the file to read"
    finally:
        server.close()


@pytest.mark.parametrize("command", ["tasks submit", "userdata validate", "migrate check"])
def test_a_directory_given_as_input_is_one_line(home: Path, command: str) -> None:
    before = state_of(home)
    done = run_cli(home, command, str(home / "root"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "a directory, not a regular file" in done.stderr
    assert state_of(home) == before


JOB = ('{"Name": "piped", "DAG": {"Tasks": {"t": {"Parameters": {"Command": '
       '{"CommandLine": "true"}}}}}}')


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("how", ["stdin", "process substitution"])
def test_a_job_json_with_no_telling_name_is_read_as_json(home: Path, how: str) -> None:
    # "-" and /dev/fd/N have no .json suffix: the content says which format it is (they
    # were read as job.cfg and refused).
    (home / "job.json").write_text(JOB)
    env = dict(os.environ, GUESTAGENT_CONFIG=str(home / "agent.toml"))
    source = "- < job.json" if how == "stdin" else "<(cat job.json)"
    done = subprocess.run(
        ["bash", "-c", f'"$0" -m guestagent tasks submit {source} --wait --foreground',
         sys.executable], capture_output=True, text=True, timeout=120, env=env, cwd=home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("job-")
