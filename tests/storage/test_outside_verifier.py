"""What an outside verifier found by using storage as a new user would: destinations with a
file or directory in the way, `out/` meaning a directory, flags out of range, keys that
collide on download. Each: one clear line, and the tree and bucket unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from storage_helpers import boto, random_file
from test_storage_cli import Cli, write_config
from test_transfer_trees import bucket_state, one_line, snapshot

from guestagent.storage.errors import BadInput
from guestagent.storage.ossurl import OssUrl
from guestagent.storage.settings import MiB
from guestagent.storage.transfer import Transfers


@pytest.fixture
def cli(creds: Any, s3: Any, tmp_path: Path) -> Cli:
    boto(s3.url).create_bucket(Bucket="bkt")
    return Cli(write_config(tmp_path / "agent.toml", creds, s3.url, tmp_path / "state",
                            multipart_threshold=6 * MiB, part_size=5 * MiB))


def put(s3: Any, *keys: str) -> None:
    admin = boto(s3.url)
    for key in keys:
        admin.put_object(Bucket="bkt", Key=key, Body=key.encode())


# -- a file or a directory in the way ------------------------------------------------------


def test_tree_download_with_a_file_where_a_directory_goes(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    put(s3, "in/a.txt", "in/sub/b.txt")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").write_bytes(b"a file, not a directory")
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert f"{dest / 'sub'} is a file, not a directory" in one_line(info.value)
    assert snapshot(dest) == {"sub": b"a file, not a directory"}  # not even a.txt landed


def test_tree_download_with_a_directory_where_a_file_goes(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    put(s3, "in/a.txt", "in/b.txt")
    dest = tmp_path / "dest"
    (dest / "b.txt").mkdir(parents=True)
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert "b.txt is a directory here" in one_line(info.value)
    assert snapshot(dest) == {} and not (dest / "a.txt").exists()


@pytest.mark.parametrize("where", ["root", "ancestor"])
def test_downloads_into_a_path_under_a_file(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any, where: str
) -> None:
    """`cp -r oss://... f` and `cp oss://.../k f/x` with `f` a file: named, no traceback."""
    put(s3, "in/a.txt")
    blocker = random_file(tmp_path / "work" / "f", 3)
    before = blocker.read_bytes()
    root = blocker if where == "root" else blocker / "deeper"
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), root)
    assert f"{blocker} is a file, not a directory" in one_line(info.value)
    with pytest.raises(BadInput) as info:
        transfers.download_file(OssUrl.parse("oss://bkt/in/a.txt"), blocker / "x" / "a.txt")
    assert f"{blocker} is a file, not a directory" in one_line(info.value)
    assert blocker.read_bytes() == before and sorted(blocker.parent.iterdir()) == [blocker]


def test_sync_refuses_a_blocked_tree_in_a_dry_run_too(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    from guestagent.storage import trees

    put(s3, "in/sub/b.txt")
    dest = tmp_path / "dest"
    random_file(dest / "sub", 5)
    before = snapshot(dest)
    with pytest.raises(BadInput, match="is a file, not a directory"):
        trees.download_tree(transfers, OssUrl.parse("oss://bkt/in/"), dest,
                            only_changed=True, dry_run=True)
    assert snapshot(dest) == before


# -- keys that would collide ---------------------------------------------------------------


def test_tree_key_with_an_empty_segment_is_refused(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    """'a//b' and 'a/b' would both be written to a/b (two writers, one file)."""
    put(s3, "in/a/b", "in/a//b")
    dest = tmp_path / "dest"
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert "empty path segment" in one_line(info.value) and "in/a//b" in str(info.value)
    assert not dest.exists()


# -- the command line ----------------------------------------------------------------------


def test_cp_to_a_trailing_slash_puts_the_object_in_that_directory(
    cli: Cli, tmp_path: Path, s3: Any
) -> None:
    put(s3, "in/with space+50%.txt")
    res = cli("storage", "cp", "oss://bkt/in/with space+50%.txt", f"{tmp_path}/new/")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "new" / "with space+50%.txt").read_bytes() == b"in/with space+50%.txt"
    # A file of that name in the way: named, left as it was.
    (tmp_path / "file").write_bytes(b"mine")
    res = cli("storage", "cp", "oss://bkt/in/with space+50%.txt", f"{tmp_path}/file/")
    assert res.returncode == 2 and "is a file, not a directory" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert (tmp_path / "file").read_bytes() == b"mine"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--part-size", "inf"], "not a size: 'inf'"),
        (["--part-size", "nan"], "not a size: 'nan'"),
        (["--part-size", "1M"], "--part-size: must be 5M..5G"),
        (["--part-size", "6G"], "--part-size: must be 5M..5G"),
        (["--concurrency", "0"], "--concurrency: must be 1..256"),
        (["--concurrency", "100000"], "--concurrency: must be 1..256"),
    ],
)
def test_transfer_flags_out_of_range(cli: Cli, tmp_path: Path, s3: Any, flags: list[str],
                                     needle: str) -> None:
    src = random_file(tmp_path / "f.bin", 10)
    res = cli("storage", "cp", *flags, str(src), "oss://bkt/x/")
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].count(needle) == 1
    assert bucket_state(s3.url) == {}


# -- [storage] in agent.toml -------------------------------------------------------------

STORAGE_SETTINGS = [
    # A password in the endpoint was dropped without a word (and shown by `config show`);
    # the message does not repeat it.
    ('endpoint = "http://user:hunter2@127.0.0.1:9000"', "must not carry a user or password"),
    ('endpoint = "http://127.0.0.1:9000/bucket-path"', "without a path or query"),
    ('endpoint = "http://127.0.0.1:9000/?x=1"', "without a path or query"),
    ('endpoint = "http://oss example.com"', "whitespace or a control character"),
    ('endpoint = "http://127.0.0.1:9000\\n"', "whitespace or a control character"),
    ('endpoint = "ftp://127.0.0.1"', "bad URL"),
    ('endpoint = "http://127.0.0.1:99999"', "Port out of range"),
    ('state_dir = "relative/state"', "state_dir: must be an absolute path"),
    ("nas_port = 70000", "nas_port: must be 1..65535"),
    ("nas_port = 0", "nas_port: must be 1..65535"),
    ("nas_mount_port = -1", "nas_mount_port: must be 0..65535"),
    ("part_size = 1024", "part_size: must be"),
    ("part_size = 99999999999999999999", "part_size: must be"),
    ('part_size = "16M"', "part_size: expected an integer"),
    ("concurrency = 0", "concurrency: must be 1..256"),
    ("concurrency = 100000", "concurrency: must be 1..256"),
    ("multipart_threshold = 1", "multipart_threshold: must be >= part_size"),
    ("timeout = nan", "timeout: expected a finite number"),
    ('region = "cn hangzhou"', "region: not a region id"),
    ('network = "vpc"', "network: must be one of"),
    ("no_such_key = 1", "unknown key storage.no_such_key"),
    ('mounts = "oss://bk1/x/:/mnt/x"', "mounts: expected a list"),
    ('mounts = ["oss://bk1/x/:/etc/x"]', "system directory /etc"),
]


@pytest.mark.parametrize(("line", "needle"), STORAGE_SETTINGS,
                         ids=[line.split(" =")[0] + str(i)
                              for i, (line, _n) in enumerate(STORAGE_SETTINGS)])
def test_bad_storage_settings_name_the_key(tmp_path: Path, line: str, needle: str) -> None:
    from guestagent import config

    f = tmp_path / "agent.toml"
    f.write_text(f"[storage]\n{line}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(f, environ={})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value)


# -- real clients: the AWS CLI and rclone write, we read (and back) ------------------------

ODD = 11 * MiB + 1  # three parts of 5 MiB, the last of one byte and a bit


def client_env(tmp_path: Path, s3: Any) -> dict[str, str]:
    """Static test keys for the AWS CLI and rclone on the moto server (never the agent's),
    5 MiB parts for both, nothing read from this machine's own configuration."""
    import os

    aws_config = tmp_path / "aws-config"
    aws_config.write_text("[default]\nregion = us-east-1\ns3 =\n"
                          "    multipart_threshold = 5MB\n    multipart_chunksize = 5MB\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    env.update({
        "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_CONFIG_FILE": str(aws_config),
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
        "RCLONE_CONFIG": "/nonexistent", "RCLONE_CONFIG_M_TYPE": "s3",
        "RCLONE_CONFIG_M_PROVIDER": "Other", "RCLONE_CONFIG_M_ENDPOINT": s3.url,
        "RCLONE_CONFIG_M_ACCESS_KEY_ID": "a", "RCLONE_CONFIG_M_SECRET_ACCESS_KEY": "b",
        "RCLONE_CONFIG_M_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_M_REGION": "us-east-1",
    })
    return env


def run_tool(argv: list[str], env: dict[str, str]) -> str:
    import subprocess

    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (argv, res.stderr)
    return res.stdout


def aws(s3: Any, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "awscli", "--endpoint-url", s3.url, *args]


def rclone(*args: str) -> list[str]:
    from guestagent.storage import rclonebin

    return [rclonebin.locate(""), *args]


def foreign_tree(root: Path) -> Path:
    import os

    random_file(root / "odd.bin", ODD)
    random_file(root / "with space+50%.txt", 7)
    random_file(root / "ünï cødé" / "x.txt", 3)
    (root / "empty").write_bytes(b"")
    for p in root.rglob("*"):
        os.utime(p, (1_557_126_489.5, 1_557_126_489.5))  # older than any upload
    return root


def sync_summary(cli: Cli, *argv: str) -> dict[str, Any]:
    import json

    res = cli("storage", "sync", "--json", *argv)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout.splitlines()[-1]))


@pytest.mark.parametrize("writer", ["aws", "rclone"])
def test_sync_leaves_alone_what_the_aws_cli_and_rclone_wrote(
    cli: Cli, tmp_path: Path, s3: Any, writer: str
) -> None:
    """Multipart objects without our metadata (the AWS CLI's: none; rclone's: its mtime and
    MD5): downloaded once, then unchanged both ways, as their own sync would judge."""
    src = foreign_tree(tmp_path / "src")
    env = client_env(tmp_path, s3)
    if writer == "aws":
        run_tool(aws(s3, "s3", "cp", "--only-show-errors", "--recursive", str(src),
                     "s3://bkt/w/"), env)
    else:
        run_tool(rclone("copy", "--s3-chunk-size", "5M", "--s3-upload-cutoff", "5M",
                        str(src), "M:bkt/w"), env)
    etags = {k: v for k, v in bucket_state(s3.url).items()}
    assert etags["w/odd.bin"].endswith('-3"')  # really multipart

    down = tmp_path / "down"
    first = sync_summary(cli, "oss://bkt/w/", str(down))
    assert first["copied"] == 4 and snapshot(down) == snapshot(src)
    again = sync_summary(cli, "oss://bkt/w/", str(down))
    assert (again["copied"], again["skipped"]) == (0, 4)
    up = sync_summary(cli, "--dry-run", str(src), "oss://bkt/w/")
    assert (up["copied"], up["skipped"]) == (0, 4)
    # Changed since: copied, by either direction's rule.
    (src / "odd.bin").write_bytes(b"\0" * ODD)
    up = sync_summary(cli, "--dry-run", str(src), "oss://bkt/w/")
    assert up["copied"] == 1
    (down / "odd.bin").write_bytes(b"\0" * ODD)
    back = sync_summary(cli, "oss://bkt/w/", str(down))
    assert back["copied"] == 1 and (down / "odd.bin").read_bytes() != b"\0" * ODD
    assert bucket_state(s3.url) == etags


def test_what_we_upload_the_aws_cli_and_rclone_read_as_written(
    cli: Cli, tmp_path: Path, s3: Any
) -> None:
    """Single and multipart: bytes, Content-Type by name (as the AWS CLI and rclone set
    it), and our mtime metadata read by rclone as the file's modification time."""
    import json
    import os

    src = tmp_path / "src"
    random_file(src / "big.bin", 7 * MiB)  # multipart at the fixture's 6 MiB threshold
    (src / "index.html").write_text("<html></html>")
    (src / "data.json").write_text("{}")
    for p in src.iterdir():
        os.utime(p, (1_577_934_245.25, 1_577_934_245.25))
    res = cli("storage", "cp", "-r", str(src), "oss://bkt/ours/")
    assert res.returncode == 0, res.stderr
    assert bucket_state(s3.url)["ours/big.bin"].endswith('-2"')

    admin = boto(s3.url)
    types = {k: admin.head_object(Bucket="bkt", Key=f"ours/{k}")["ContentType"]
             for k in ("index.html", "data.json", "big.bin")}
    assert types == {"index.html": "text/html", "data.json": "application/json",
                     "big.bin": "application/octet-stream"}
    env = client_env(tmp_path, s3)
    listed = json.loads(run_tool(rclone("lsjson", "M:bkt/ours"), env))
    assert {e["Path"]: e["ModTime"][:22] for e in listed} == {
        name: "2020-01-02T03:04:05.25" for name in ("big.bin", "index.html", "data.json")}
    run_tool(rclone("check", str(src), "M:bkt/ours"), env)  # sizes and the MD5s it can see
    got = tmp_path / "got"
    run_tool(aws(s3, "s3", "cp", "--only-show-errors", "--recursive", "s3://bkt/ours/",
                 str(got)), env)
    assert snapshot(got) == snapshot(src)


NAMES = ["with space.txt", "50%off+more.txt", "a+b c/ünï cødé.txt", "plain.txt"]


def test_keys_with_spaces_and_plus_through_rclone_serve_s3(tmp_path: Path,
                                                          rclone_auth: Any) -> None:
    """`rclone serve s3` (and S3 itself) form-encode listed keys: a space comes as '+'.
    Read as plain percent-encoding, 'with space.txt' was listed as 'with+space.txt', whose
    download then failed (404) and whose sync copied it again every time."""
    from guestagent.storage import trees
    from guestagent.storage.keys import Keys, StaticKeys
    from guestagent.storage.s3 import ObjectInfo, S3Client
    from guestagent.storage.transfer import Options

    src = tmp_path / "src"
    for name in NAMES:
        random_file(src / name, 5)
    client = S3Client(rclone_auth.endpoint,
                      StaticKeys(Keys(rclone_auth.key_id, rclone_auth.secret)), retries=2)
    with Transfers(client, Options(state_dir=tmp_path / "st")) as t:
        t.upload_tree(src, OssUrl.parse("oss://bkt/k/"))
        listed = sorted(i.key for i in client.list_objects("bkt", "k/")
                        if isinstance(i, ObjectInfo))
        assert listed == sorted(f"k/{n}" for n in NAMES)
        down = tmp_path / "down"
        t.download_tree(OssUrl.parse("oss://bkt/k/"), down)
        assert snapshot(down) == snapshot(src)
        again = trees.upload_tree(t, src, OssUrl.parse("oss://bkt/k/"), only_changed=True)
        assert again.copied == [] and len(again.skipped) == len(NAMES)


def test_uploading_a_fifo_is_refused_not_waited_on(transfers: Transfers, bkt: str,
                                                   tmp_path: Path, s3: Any) -> None:
    """Opening a FIFO for reading waits for a writer: `cp fifo oss://...` hung for ever."""
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def upload() -> None:
        try:
            transfers.upload_file(fifo, OssUrl.parse("oss://bkt/pipe"))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    worker.join(timeout=120)  # generous under load; the fixed code answers at once
    if worker.is_alive():
        with open(fifo, "wb"):  # release the stuck open, then fail
            pass
        pytest.fail("the upload waited on the FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], BadInput)
    assert "not a regular file" in one_line(outcome[0])
    assert bucket_state(s3.url) == {}


def test_a_dry_run_sync_says_what_it_would_delete(cli: Cli, tmp_path: Path, s3: Any) -> None:
    put(s3, "s/only-remote.txt")
    random_file(tmp_path / "src" / "a.txt", 3)
    res = cli("storage", "sync", "--delete", "--dry-run", str(tmp_path / "src"), "oss://bkt/s/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["copy a.txt", "delete s/only-remote.txt"]
    assert res.stderr.strip() == "would copy 1, unchanged 0, would delete 1"
    assert sorted(bucket_state(s3.url)) == ["s/only-remote.txt"]


def test_a_mount_with_an_ephemeral_credential_port_is_refused_at_once() -> None:
    """tcp_port = 0 (any free port): rclone was told port 0 and the mount failed after
    its 30 s ready timeout with 'no answer'."""
    from guestagent.config import from_mapping
    from guestagent.storage.api import rclone_remote
    from guestagent.storage.errors import StorageError

    settings = from_mapping({"credentials": {"tcp_port": 0},
                             "storage": {"endpoint": "http://127.0.0.1:9000"}})
    with pytest.raises(StorageError) as info:
        rclone_remote(settings, {})
    assert "fixed [credentials] tcp_port" in one_line(info.value)


def test_objects_named_like_anothers_partial_download_are_refused(
    transfers: Transfers, bkt: str, tmp_path: Path, s3: Any
) -> None:
    """'x' is fetched into 'x.part' and renamed: with an object 'x.part' in the same tree
    the two downloads wrote one file, and a pair came out lost or swapped, exit 0."""
    put(s3, *[f"in/f{i}" for i in range(3)], "in/f1.part")
    dest = tmp_path / "dest"
    with pytest.raises(BadInput) as info:
        transfers.download_tree(OssUrl.parse("oss://bkt/in/"), dest)
    assert "in/f1.part: would be overwritten by the partial download of f1" in one_line(
        info.value)
    assert not dest.exists()


def test_the_credential_path_secret_is_not_in_a_mounts_repr() -> None:
    from guestagent.config import from_mapping
    from guestagent.storage.api import rclone_remote

    secret = "CapabilityPath_0123456789"
    settings = from_mapping({"credentials": {"path_secret": secret},
                             "storage": {"endpoint": "http://127.0.0.1:9000"}})
    remote = rclone_remote(settings, {})
    assert secret in remote.credentials_url  # rclone needs it (in its environment only)
    assert secret not in repr(remote) and secret not in " ".join(remote.path(OssUrl("bk1")))
