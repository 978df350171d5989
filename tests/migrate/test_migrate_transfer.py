"""The rsync command line: sparse handling only when holes exist, excludes anchored per disk,
rsync's own progress and statistics read back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mig_tree import build_tree

from guestagent.migrate import prechecks, transfer


def test_sparse_flag_only_when_the_tree_has_holes(tmp_path: Path) -> None:
    tree = build_tree(tmp_path / "root", big="none")
    skip = list(transfer.DEFAULT_EXCLUDES)
    assert transfer.has_sparse(tree, skip)
    (tree / "var/lib/db/sparse.img").unlink()
    assert not transfer.has_sparse(tree, skip)
    target = transfer.Target("10.0.0.2", 22, "root", Path("/k"), Path("/kh"), "/disk")
    assert transfer.rsync_argv(tree, target, Path("/x"), 0, sparse=False)[1] == "-aHAX"
    argv = transfer.rsync_argv(tree, target, Path("/x"), 500)
    assert argv[1] == "-aHAXS" and "--bwlimit=500" in argv and "--numeric-ids" in argv
    assert argv[-1] == "root@10.0.0.2:/disk/" and not any("BEGIN" in a for a in argv)


def test_excludes_per_disk() -> None:
    user = ["/mnt/disk1/cache/*", "*.tmp", "/var/log/*"]
    system = transfer.disk_excludes(user, "/", ["/data"])
    assert system[:7] == list(transfer.DEFAULT_EXCLUDES)
    assert "/data/*" in system and "/var/log/*" in system
    assert transfer.disk_excludes(user, "/mnt/disk1", []) == ["/cache/*", "*.tmp"]


def test_progress_and_stats_are_read_from_rsync_output() -> None:
    p = transfer.parse_progress("    104857600  45%   31.27MB/s    0:00:03 (xfr#3, to-chk=2/9)")
    assert p == transfer.Progress(104857600, 45, "31.27MB/s", "0:00:03")
    text = ('rsync: [sender] send_files failed to open "/srv/a b": Permission denied (13)\n'
            "Literal data: 1234 bytes\nMatched data: 5678 bytes\n")
    outcome = transfer.parse_outcome(23, text)
    assert outcome.denied == ["/srv/a b"] and not outcome.ok and not outcome.retryable
    assert outcome.stats == {"Literal data": 1234, "Matched data": 5678}
    assert transfer.parse_outcome(12, "").retryable


def test_used_space_of_a_mount_point_is_its_file_system_less_the_excludes(
        tmp_path: Path) -> None:
    """A root that is a mount point is measured by statvfs (no walk), less what the
    default-excluded directories on it hold; a plain directory is walked."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "migused", str(root)], check=True)
    try:
        (root / "srv").mkdir()
        (root / "srv/data").write_bytes(os.urandom(3 * 2**20))
        (root / "mnt/junk").mkdir(parents=True)
        (root / "mnt/junk/excluded").write_bytes(os.urandom(2 * 2**20))
        used = prechecks.used_space(root)
        assert 3 * 2**20 <= used < 3 * 2**20 + 256 * 1024
        plain = tmp_path / "plain"
        (plain / "srv").mkdir(parents=True)
        (plain / "srv/data").write_bytes(os.urandom(2**20))
        (plain / "mnt").mkdir()
        (plain / "mnt/excluded").write_bytes(os.urandom(2**20))
        assert 2**20 <= prechecks.used_space(plain) < 2**20 + 64 * 1024
    finally:
        subprocess.run(["umount", str(root)], check=True)
