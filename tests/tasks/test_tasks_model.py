"""Job JSON and job.cfg: the guide's forms parse; every bad input is one clear refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from guestagent.tasks import jobcfg
from guestagent.tasks.errors import JobError
from guestagent.tasks.model import Job

GUIDE_JOB: dict[str, Any] = {
    "Name": "log-count",
    "Type": "DAG",
    "Description": "batchcompute job",
    "Priority": 0,
    "JobFailOnInstanceFail": True,
    "Notification": {"Topic": {"Name": "t", "Endpoint": "http://1.mns.cn-shenzhen.aliyuncs.com/",
                               "Events": ["OnJobFinished", "OnInstanceFailed"]}},
    "DAG": {
        "Tasks": {
            "split": {
                "InstanceCount": 1, "MaxRetryCount": 0, "Timeout": 21600,
                "Parameters": {
                    "Command": {"CommandLine": "python split.py",
                                "PackagePath": "oss://your-bucket/log-count/worker.tar.gz",
                                "EnvVars": {}},
                    "StdoutRedirectPath": "oss://your-bucket/log-count/logs/",
                    "StderrRedirectPath": "oss://your-bucket/log-count/logs/",
                    "InputMappingConfig": {"Lock": True},
                },
                "InputMapping": {"oss://your-bucket/log-count/": "/home/input/"},
                "OutputMapping": {"/home/output/": "oss://your-bucket/log-count/"},
                "LogMapping": {},
                "AutoCluster": {"ResourceType": "OnDemand", "ImageId": "img-ubuntu",
                                "InstanceType": "ecs.sn1.medium"},
            },
            "count": {
                "InstanceCount": 3,
                "Parameters": {"Command": {"CommandLine": "python count.py",
                                           "EnvVars": {"k1": "v1"}}},
            },
            "merge": {"Parameters": {"Command": {"CommandLine": "python merge.py"}},
                      "ClusterId": "cls-0101010299123"},
        },
        "Dependencies": {"split": ["count"], "count": ["merge"]},
    },
}


def test_guide_json_parses_with_order_and_defaults() -> None:
    job = Job.parse(GUIDE_JOB)
    assert job.order() == ["split", "count", "merge"]
    assert job.predecessors("merge") == ["count"]
    count = job.tasks["count"]
    assert count.instance_count == 3 and count.max_retry_count == 0
    assert count.timeout == 21600 and count.env_vars == {"k1": "v1"}
    split = job.tasks["split"]
    assert split.input_mapping == {"oss://your-bucket/log-count/": "/home/input/"}
    assert split.output_mapping == {"/home/output/": "oss://your-bucket/log-count/"}
    assert split.argv == ["python", "split.py"]
    assert job.notification.events == ("OnJobFinished", "OnInstanceFailed")
    assert job.uses_cluster()


def test_guide_second_dag_example_fans_out_and_in() -> None:
    doc = copy.deepcopy(GUIDE_JOB)
    tasks = doc["DAG"]["Tasks"]
    tasks["count2"] = copy.deepcopy(tasks["count"])
    doc["DAG"]["Dependencies"] = {"split": ["count", "count2"], "count": ["merge"],
                                 "count2": ["merge"]}
    job = Job.parse(doc)
    assert job.order() == ["split", "count", "count2", "merge"]
    assert job.predecessors("merge") == ["count", "count2"]


GUIDE_CFG = """\
[DEFAULT]
job_name=log-count
description=demo
pack=./log-count/
deps=split->count;count->merge

[split]
cmd=python split.py

[count]
cmd=python count.py
nodes=3

[merge]
cmd=python merge.py
"""


def test_guide_job_cfg_with_bcs_flags(tmp_path: Path) -> None:
    (tmp_path / "log-count").mkdir()
    cfg = tmp_path / "job.cfg"
    cfg.write_text(GUIDE_CFG)
    flags = jobcfg.Flags(
        read_mounts=["oss://your-bucket/log-count/:/home/input"],
        write_mounts=["oss://your-bucket/log-count/:/home/output"],
        docker="localhost:5000/myubuntu@oss://your-bucket/dockers/",
    )
    job, doc = jobcfg.load_job(cfg, flags)
    assert job.name == "log-count" and job.description == "demo"
    assert job.order() == ["split", "count", "merge"]
    count = job.tasks["count"]
    assert count.instance_count == 3
    assert count.package_path == str(tmp_path / "log-count")
    assert count.input_mapping == {"oss://your-bucket/log-count/": "/home/input/"}
    assert count.output_mapping == {"/home/output/": "oss://your-bucket/log-count/"}
    assert count.docker_image == "localhost:5000/myubuntu"
    assert count.registry_path == "oss://your-bucket/dockers/"
    # The document is plain JSON (stored with the job).
    assert json.loads(json.dumps(doc))["DAG"]["Dependencies"]["split"] == ["count"]


def _task(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Tasks"]["split"].update(changes)
    return doc


def _cmd(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Tasks"]["split"]["Parameters"]["Command"].update(changes)
    return doc


def _deps(deps: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Dependencies"] = deps
    return doc


BAD_JSON = {
    "cycle": (_deps({"split": ["count"], "count": ["merge"], "merge": ["split"]}), "cycle"),
    "unknown task in deps value": (_deps({"split": ["cuont"]}), "unknown task 'cuont'"),
    "unknown task in deps key": (_deps({"spilt": ["count"]}), "unknown task 'spilt'"),
    "self dependency": (_deps({"split": ["split"]}), "itself"),
    "instance count 0": (_task(InstanceCount=0), "InstanceCount: must be between 1"),
    "instance count string": (_task(InstanceCount="3"), "InstanceCount: must be an integer"),
    "timeout 0": (_task(Timeout=0), "Timeout: must be between 1 and 21600"),
    "timeout too long": (_task(Timeout=86401), "Timeout: must be between 1 and 21600"),
    "negative retries": (_task(MaxRetryCount=-1), "MaxRetryCount"),
    "input not oss": (_task(InputMapping={"/tmp/x/": "/home/in/"}), "not an OSS URL"),
    "bad bucket": (_task(InputMapping={"oss://My_Bucket/x/": "/home/in/"}), "bucket"),
    "dotdot key": (_task(InputMapping={"oss://bucket/a/../b/": "/home/in/"}), "'..'"),
    "relative local": (_task(InputMapping={"oss://bucket/a/": "home/in/"}), "absolute"),
    "input file not dir": (_task(InputMapping={"oss://bucket/a": "/home/in/"}), "directory"),
    "in and out share dir": (
        _task(OutputMapping={"/home/input/": "oss://bucket/out/"}),
        "InputMapping and OutputMapping may not share a local directory"),
    "two oss one dir": (
        _task(InputMapping={"oss://bucket/a/": "/home/in/", "oss://bucket/b/": "/home/in"}),
        "two sources may not map to one local directory"),
    "control char key": (_task(LogMapping={"/var/a.log": "oss://bucket/a\x01.log"}), "control"),
    "env name": (_cmd(EnvVars={"1BAD": "x"}), "not an environment variable name"),
    "env name with dash": (_cmd(EnvVars={"A-B": "x"}), "not an environment variable name"),
    "env overrides reserved": (
        _cmd(EnvVars={"BATCH_COMPUTE_DAG_INSTANCE_ID": "7"}), "cannot be overridden"),
    "image tag injection": (
        _cmd(EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": "busybox:latest --privileged"}),
        "not a Docker image name"),
    "image two tags": (
        _cmd(EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": "busybox:1:2"}), "not a Docker image name"),
    "image newline": (
        _cmd(EnvVars={"BATCH_COMPUTE_DOCKER_IMAGE": "busybox\nFROM x"}), "not a Docker image"),
    "package dir": (_cmd(PackagePath="oss://bucket/pkg/"), "must name a .tar.gz"),
    # The storage capability's mapping rules apply to jobs as they are (one place).
    "mapping under a system dir": (
        _task(InputMapping={"oss://bucket/a/": "/proc/in/"}), "system directory /proc"),
    "output inside input": (
        _task(OutputMapping={"/home/input/out/": "oss://bucket/out/"}), "is inside /home/input"),
    "writable oss mount": (
        _task(Mounts={"Entries": [{"Source": "oss://bucket/m/", "Destination": "/mnt/m/",
                                   "WriteSupport": True}]}), "writable OSS mounts"),
    "unsupported locale": (
        _task(Parameters={"Command": {"CommandLine": "x"},
                          "InputMappingConfig": {"Locale": "GBK"}}), "'GBK' is not supported"),
    "empty command": (_cmd(CommandLine="  "), "CommandLine: empty"),
    "unbalanced quote": (_cmd(CommandLine="sh -c 'echo"), "cannot split"),
    "unknown task key": (_task(InstanceCont=3), "unknown key 'InstanceCont'"),
    "not DAG": ({**GUIDE_JOB, "Type": "Batch"}, "only \"DAG\""),
    "no name": ({**GUIDE_JOB, "Name": ""}, "Name:"),
    "no tasks": ({**GUIDE_JOB, "DAG": {"Tasks": {}}}, "no task"),
    "bad task name": (
        {**GUIDE_JOB, "DAG": {"Tasks": {"a/b": {"Parameters": {"Command": {"CommandLine": "x"}}}}}},
        "task name"),
    "bad event": (
        {**GUIDE_JOB, "Notification": {"Topic": {"Events": ["OnEverything"]}}}, "unknown event"),
    "nas without path": (
        _task(Mounts={"Entries": [{"Source": "nas://fs.nas.aliyuncs.com",
                                   "Destination": "/mnt/nas/"}]}), "nas://"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_job_json_is_one_clear_line(case: str) -> None:
    doc, expected = BAD_JSON[case]
    with pytest.raises(JobError) as info:
        Job.parse(doc)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


BAD_CFG = {
    "missing section": (GUIDE_CFG.replace("[merge]\ncmd=python merge.py\n", ""),
                        "no [merge] section"),
    "no cmd": (GUIDE_CFG.replace("cmd=python merge.py", "nodes=1"), "[merge] has no cmd"),
    "bad deps": (GUIDE_CFG.replace("split->count;", "split=>count;"), "want a->b"),
    "bad nodes": (GUIDE_CFG.replace("nodes=3", "nodes=three"), "nodes='three'"),
    "zero nodes": (GUIDE_CFG.replace("nodes=3", "nodes=0"), "InstanceCount: must be between 1"),
    "cycle": (GUIDE_CFG.replace("count->merge", "count->merge;merge->split"), "cycle"),
    "unknown key": (GUIDE_CFG.replace("nodes=3", "nodez=3"), "unknown key 'nodez'"),
    "docker without oss": (GUIDE_CFG.replace("[split]", "[split]\ndocker=myubuntu"),
                           "want image@oss://"),
    "docker tag injection": (
        GUIDE_CFG.replace("[split]", "[split]\ndocker=my;ubuntu@oss://bucket/d/"),
        "not a Docker image name"),
    "not ini": ("this is not a job file", "not a valid job.cfg"),
    "deps in a task section": (  # configparser would let it pass, unread
        GUIDE_CFG.replace("nodes=3", "nodes=3\ndeps=count->zz"),
        "[count] deps= is a job setting: move it to [DEFAULT]"),
    "job name in a task section": (
        GUIDE_CFG.replace("[merge]", "[merge]\njob_name=other"),
        "[merge] job_name= is a job setting"),
    "env overrides reserved": (
        GUIDE_CFG.replace("nodes=3", "nodes=3\nenv=BATCH_COMPUTE_DAG_JOB_ID:x"),
        "cannot be overridden"),
}


@pytest.mark.parametrize("case", sorted(BAD_CFG))
def test_bad_job_cfg_is_one_clear_line(case: str, tmp_path: Path) -> None:
    text, expected = BAD_CFG[case]
    (tmp_path / "log-count").mkdir()
    cfg = tmp_path / "job.cfg"
    cfg.write_text(text)
    with pytest.raises(JobError) as info:
        jobcfg.load_job(cfg)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("flags", "expected"), [
    (jobcfg.Flags(docker="localhost:5000/myubuntu"), "want image@oss://"),
    (jobcfg.Flags(read_mounts=["/home/input"]), "-r"),
    (jobcfg.Flags(write_mounts=["oss://bucket/out/:relative"]), "want oss://bucket/dir/:/local"),
    (jobcfg.Flags(write_mounts=["oss://bucket/out/:/a/../b"]), "'..' segment"),
    (jobcfg.Flags(env=["novalue"]), "want key:value"),
])
def test_bad_bcs_flags_are_refused(flags: jobcfg.Flags, expected: str, tmp_path: Path) -> None:
    (tmp_path / "log-count").mkdir()
    cfg = tmp_path / "job.cfg"
    cfg.write_text(GUIDE_CFG)
    with pytest.raises(JobError, match=expected):
        jobcfg.load_job(cfg, flags)


def test_pack_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "job.cfg"
    cfg.write_text(GUIDE_CFG)
    with pytest.raises(JobError, match="does not exist"):
        jobcfg.load_job(cfg)


def test_job_json_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text("[" * 100_000)  # json recurses per level: a RecursionError unless caught
    with pytest.raises(JobError) as info:
        jobcfg.load_job(path)
    assert str(info.value) == f"{path}: not valid JSON: nested too deeply"
