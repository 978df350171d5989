"""BatchCompute mapping declarations: accepted in their real shapes, refused with one line."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from guestagent.storage.errors import BadInput
from guestagent.storage.mappings import (
    NasSource,
    parse_mount_spec,
    parse_task,
    redirect_object,
)
from guestagent.storage.ossurl import OssUrl

GUIDE_TASK = {
    "InstanceCount": 3,
    "InputMapping": {"oss://mybucket/mydir/": "/home/admin/mydir/"},
    "OutputMapping": {"/home/admin/out/": "oss://mybucket/out/"},
    "LogMapping": {"/home/admin/a.log": "oss://my-bucket/logs/"},
    "Mounts": {
        "Entries": [
            {"Source": "nas://0266e49fea-yio75.cn-beijing.nas.aliyuncs.com:/",
             "Destination": "/home/admin/nas/", "WriteSupport": True},
            {"Source": "oss://mybucket/ref/", "Destination": "/home/admin/ref/",
             "WriteSupport": False},
        ],
        "Locale": "UTF-8",
        "Lock": False,
    },
    "Parameters": {
        "Command": {"CommandLine": "python count.py",
                    "PackagePath": "oss://your-bucket/log-count/worker.tar.gz"},
        "InputMappingConfig": {"Lock": True},
        "StdoutRedirectPath": "oss://your-bucket/log-count/logs/",
        "StderrRedirectPath": "oss://your-bucket/log-count/logs/",
    },
}


def test_the_guides_task_parses_into_its_parts():
    m = parse_task(GUIDE_TASK, streaming=["/home/admin/out"])
    assert m.inputs[0].source == OssUrl("mybucket", "mydir/")
    assert m.inputs[0].local == PurePosixPath("/home/admin/mydir")
    assert m.outputs[0].dest == OssUrl("mybucket", "out/") and m.outputs[0].streaming
    assert m.logs[0].object_for("a.log") == OssUrl("my-bucket", "logs/a.log")
    assert m.package == OssUrl("your-bucket", "log-count/worker.tar.gz")
    assert m.stdout == m.stderr == OssUrl("your-bucket", "log-count/logs/")
    nas, oss = m.mounts
    assert nas.source == NasSource("0266e49fea-yio75.cn-beijing.nas.aliyuncs.com", "/")
    assert nas.write and nas.is_nas and not oss.is_nas
    assert m.input_config.lock and not m.mount_config.lock


def test_a_log_mapping_may_name_the_whole_object():
    m = parse_task({"LogMapping": {"/home/admin/a.log": "oss://my-bucket/a.log"}})
    assert m.logs[0].object_for("a.log") == OssUrl("my-bucket", "a.log")


def test_redirect_objects_are_named_as_batchcompute_names_them():
    base = OssUrl("bucket", "tests/logs/")
    url = redirect_object(base, "stdout", "job-0000000058184218000008150000000D", "task", 0)
    assert str(url) == "oss://bucket/tests/logs/stdout.job-0000000058184218000008150000000D.task.0"
    assert redirect_object(OssUrl("b"), "stderr", "job-1", "count", 2).key == "stderr.job-1.count.2"


def test_a_mount_spec_in_bcs_style():
    e = parse_mount_spec("oss://mybucket/mydir/:/home/admin/mydir/")
    assert e.source == OssUrl("mybucket", "mydir/") and str(e.destination) == "/home/admin/mydir"
    n = parse_mount_spec("nas://1a2b-xyz.cn-hangzhou.nas.aliyuncs.com:/share/:/mnt/share")
    assert n.source == NasSource("1a2b-xyz.cn-hangzhou.nas.aliyuncs.com", "/share/")


BAD = [
    ({"InputMapping": {"oss://bk1/in/": "/data/x/"}, "OutputMapping": {"/data/x/": "oss://bk1/o/"}},
     "InputMapping and OutputMapping may not share a local directory"),
    ({"InputMapping": {"oss://bk1/a/": "/data/x/", "oss://bk1/b/": "/data/x"}},
     "two sources may not map to one local directory"),
    ({"InputMapping": {"oss://bk1/a/": "/data/x/"}, "OutputMapping": {"/data/x/out/": "oss://bk1/o/"}},
     "is inside /data/x"),
    ({"OutputMapping": {"/data/a/": "oss://bk1/o/", "/data/b/": "oss://bk1/o/"}},
     "both upload to oss://bk1/o/"),
    ({"InputMapping": {"oss://B_ad/a/": "/data/x/"}}, "bad bucket name 'B_ad'"),
    ({"InputMapping": {"s3://b1/a/": "/data/x/"}}, "is not an OSS URL"),
    ({"InputMapping": {"oss://bk1/a": "/data/x/"}}, "must be an OSS directory"),
    ({"InputMapping": {"oss://bk1/a/../../": "/data/x/"}}, "'..' segment"),
    ({"InputMapping": {"oss://bk1/a\x01b/": "/data/x/"}}, "control character"),
    # ``^...$`` with re.match let a final newline through into the signed request
    ({"InputMapping": {"oss://bk1\n/a/": "/data/x/"}}, "bad bucket name 'bk1\\n'"),
    ({"Mounts": {"Entries": [{"Source": "nas://fs.cn-beijing.nas.aliyuncs.com\n:/",
                              "Destination": "/mnt/n/"}]}}, "aliyuncs.com\\n' is not a host"),
    ({"InputMapping": {"oss://bk1/" + "a" * 256 + "/": "/data/x/"}}, "over 255 bytes"),
    ({"InputMapping": {"oss://bk1/" + "a/" * 520: "/data/x/"}}, "OSS allows at most 1023"),
    ({"InputMapping": {"oss://bk1/a/": "data/x/"}}, "must be absolute"),
    ({"InputMapping": {"oss://bk1/a/": "/"}}, "may not be '/'"),
    ({"InputMapping": {"oss://bk1/a/": "/proc/self/"}}, "system directory /proc"),
    ({"OutputMapping": {"/etc/": "oss://bk1/o/"}}, "system directory /etc"),
    ({"OutputMapping": {"/dev/shm/x": "oss://bk1/o/"}}, "system directory /dev"),
    ({"LogMapping": {"/sys/a.log": "oss://bk1/o/"}}, "system directory /sys"),
    ({"InputMapping": {"oss://bk1/a/": "/boot"}}, "system directory /boot"),
    ({"InputMapping": {"oss://bk1/a/": "/home/../etc/"}}, "'.' or '..' segment"),
    # refused here, not by mkdir once the run has begun
    ({"InputMapping": {"oss://bk1/a/": "/data/" + "a" * 256 + "/"}}, "at most 255 bytes a name"),
    ({"OutputMapping": {"/data/" + "a/" * 2100: "oss://bk1/o/"}}, "4095 in all"),
    ({"LogMapping": {"/data/\udcff.log": "oss://bk1/o/"}}, "is not valid UTF-8"),
    ({"Parameters": {"Command": {"PackagePath": "oss://bk1/worker.zip"}}}, ".tar.gz, .tgz or .tar"),
    ({"Parameters": {"StdoutRedirectPath": "oss://bk1/logs"}}, "must be an OSS directory"),
    ({"Mounts": {"Entries": [{"Source": "nas://fs.cn-beijing.nas.aliyuncs.com:!/",
                              "Destination": "/mnt/n/"}]}}, "Windows (SMB) source"),
    ({"Mounts": {"Entries": [{"Source": "nas://bad host:/", "Destination": "/mnt/n/"}]}},
     "is not a host name"),
    ({"Mounts": {"Entries": [{"Source": "nas://x.nas.aliyuncs.com:/", "Destination": "/mnt/n/"}]}},
     "is not a NAS mount target"),
    ({"Mounts": {"Entries": [{"Source": "nas://h.cn-beijing.nas.aliyuncs.com",
                              "Destination": "/mnt/n/"}]}},
     "has no export path"),
    ({"Mounts": {"Entries": [{"Source": "oss://bk1/d/", "Destination": "/mnt/n/",
                              "WriteSupport": True}]}}, "writable OSS mounts are not supported"),
    ({"Mounts": {"Entries": [{"Source": "ftp://x/", "Destination": "/mnt/n/"}]}},
     "must start with oss:// or nas://"),
    ({"Mounts": {"Entries": [{"Source": "oss://bk1/d/", "Destination": "/mnt/n/",
                              "WriteSupport": "yes"}]}}, "WriteSupport: want true or false"),
    ({"Mounts": {"Locale": "GBK"}}, "'GBK' is not supported"),
    ({"Parameters": {"InputMappingConfig": {"Lock": "no"}}}, "Lock: want true or false"),
    ({"InputMapping": ["oss://bk1/a/"]}, "InputMapping: want a JSON object"),
]


@pytest.mark.parametrize(("task", "message"), BAD, ids=[m for _t, m in BAD])
def test_bad_mappings_get_one_clear_line(task, message, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(BadInput) as err:
        parse_task(task)
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert sorted(tmp_path.rglob("*")) == before


def test_unknown_streaming_directory_is_refused():
    with pytest.raises(BadInput, match="is not an OutputMapping directory"):
        parse_task({"OutputMapping": {"/data/a/": "oss://bk1/o/"}}, streaming=["/data/b"])


@pytest.mark.parametrize(("spec", "says"), [
    ("out/:oss://bkt/out/", "want /local/dir/:oss://bucket/dir/"),
    ("/data/out/", "want /local/dir/:oss://bucket/dir/"),
    ("/data/out/:oss://bkt/out", "must be an OSS directory"),
    ("/etc/:oss://bkt/out/", "/etc"),
    ("/data/out/:oss://B@d/out/", "bucket"),
])
def test_a_bad_declared_output_is_one_clear_line(spec: str, says: str) -> None:
    from guestagent.config import ConfigError, from_mapping

    with pytest.raises(ConfigError) as err:
        from_mapping({"storage": {"outputs": [spec]}})
    text = str(err.value)
    assert "outputs" in text and says in text and "\n" not in text


@pytest.mark.parametrize(("storage", "says"), [
    ({"mounts": ["oss://bk1/a/:/data/in", "oss://bk1/b/:/data/in"]},
     "two sources may not map to one local directory"),
    ({"mounts": ["oss://bk1/a/:/data/in", "nas://h.example.com:/x:/data/in/sub"]},
     "/data/in/sub is inside /data/in"),
    ({"mounts": ["oss://bk1/a/:/data/io"], "outputs": ["/data/io/:oss://bk1/o/"]},
     "/data/io"),
])
def test_declared_mounts_that_would_hide_each_other_are_refused(storage: dict[str, list[str]],
                                                                says: str) -> None:
    from guestagent.config import ConfigError, from_mapping

    with pytest.raises(ConfigError) as err:
        from_mapping({"storage": storage})
    text = str(err.value)
    assert "storage.mounts: " in text and says in text and "\n" not in text


def test_a_declared_output_names_its_directory_and_oss_directory() -> None:
    from guestagent.storage.mappings import parse_output_spec

    out = parse_output_spec("/var/log/app/:oss://bkt/logs/app/")
    assert (str(out.local), str(out.dest)) == ("/var/log/app", "oss://bkt/logs/app/")
