"""Error lines stay readable whatever the input: binary user-data is named as such (not
quoted as a garbage "first line"), a value of kilobytes is cut to its start and length."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guestagent.cli import clip
from guestagent.storage.errors import BadInput
from guestagent.storage.ossurl import check_key
from guestagent.userdata.parts import binary_at


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "agent.toml").write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                                         f'run_dir = "{tmp_path / "run"}"\n')
    env = dict(os.environ, GUESTAGENT_CONFIG=str(tmp_path / "agent.toml"))
    return subprocess.run([sys.executable, "-m", "guestagent", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)


@pytest.mark.parametrize(("data", "at"), [
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), 0),  # a program
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 0),  # an image: invalid UTF-8 first
    (b"hello there\x00\x01\x02", 11),  # text, then a NUL
    (b"dns config\n\xff\xfe", 11),  # text, then invalid UTF-8
])
def test_binary_user_data_is_named_not_quoted(tmp_path: Path, data: bytes, at: int) -> None:
    path = tmp_path / "user-data"
    path.write_bytes(data)
    done = run(tmp_path, "userdata", "validate", str(path))
    assert done.returncode == 2
    assert done.stderr == (f"guestagent: {path}: part-001: not text: binary data at byte {at} "
                           "(a program, image or archive?); user-data is a #!/bin/sh script, "
                           "#cloud-config or MIME multipart\n")
    assert not (tmp_path / "state").exists()


def test_text_of_no_known_type_is_still_quoted(tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    path.write_text("[unit]\nname = x\n")
    done = run(tmp_path, "userdata", "validate", str(path))
    assert done.returncode == 2 and "unknown user-data type (first line '[unit]')" in done.stderr


def test_binary_at_ignores_a_character_cut_by_its_window() -> None:
    text = ("é" * 3000).encode()  # 2-byte characters: the 4096-byte window cuts none...
    assert binary_at(text) is None
    assert binary_at(b"a" + text) is None  # ...or one, which is not an error in the data
    assert binary_at(b"ends cut \xc3") == 9  # the data itself ends inside a character


def test_a_long_key_segment_is_shown_by_its_start_and_size() -> None:
    with pytest.raises(BadInput) as info:
        check_key("dir/" + "s" * 1000 + "/x", "--dest")
    message = str(info.value)
    assert message == (f"--dest: object key segment {'s' * 40!r}... (1000 bytes) is over 255 "
                       "bytes: OSS allows at most that between two '/'")


@pytest.mark.parametrize("args", [
    ("storage", "ls", "oss://" + "b" * 70000 + "/x"),  # a bucket name
    ("storage", "umount", "/home/" + "d" * 70000),  # a local path
    ("tasks", "show", "job-" + "0" * 70000),  # a job id
])
def test_a_huge_value_in_an_error_is_cut_to_its_start_and_length(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    done = run(tmp_path, *args)
    assert done.returncode in (1, 2), done.stderr
    assert done.stderr.count("\n") == 1 and len(done.stderr) < 600, done.stderr[:600]
    assert "characters)" in done.stderr or "characters]" in done.stderr
    assert not (tmp_path / "state").exists()


def test_clip_keeps_what_follows_a_long_value() -> None:
    assert clip("short words stay") == "short words stay"
    cut = clip("key " + "k" * 5000 + " is refused: rename it")
    assert cut == "key " + "k" * 120 + "...[5000 characters] is refused: rename it"
