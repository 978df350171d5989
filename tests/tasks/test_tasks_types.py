"""Job fields of the wrong JSON type, and repeated keys, are refused by name — never
coerced (a number turned into a string, a string read as a list, the last of two keys kept)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from test_tasks_model import GUIDE_CFG, GUIDE_JOB

from guestagent.tasks import jobcfg
from guestagent.tasks.errors import JobError
from guestagent.tasks.model import Job

ENV = "DAG.Tasks.count.Parameters.Command.EnvVars"


def _env(value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Tasks"]["count"]["Parameters"]["Command"]["EnvVars"] = {"K": value}
    return doc


def _split(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Tasks"]["split"].update(changes)
    return doc


def _deps(deps: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Dependencies"] = deps
    return doc


def _package(value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GUIDE_JOB)
    doc["DAG"]["Tasks"]["split"]["Parameters"]["Command"]["PackagePath"] = value
    return doc


WRONG_TYPES = {
    "env integer": (_env(3), f"{ENV}.K: value must be a string, got number (quote it: \"3\")"),
    "env float": (_env(1.5), f"{ENV}.K: value must be a string, got number (quote it: \"1.5\")"),
    "env bool": (_env(True), f"{ENV}.K: value must be a string, got boolean (quote it: \"true\")"),
    "env null": (_env(None), f"{ENV}.K: value must be a string, got null"),
    "env list": (_env(["a"]), f"{ENV}.K: value must be a string, got array"),
    "deps value string": (
        _deps({"split": "count", "count": ["merge"]}),
        "DAG.Dependencies.split: must be a list of task names such as [\"merge\"], got string"),
    "deps value object": (
        _deps({"split": {"count": 1}}), "DAG.Dependencies.split: must be a list of task names"),
    "deps whole string": (_deps("split->count"), "DAG.Dependencies: must be an object, got string"),
    "deps name not a string": (
        _deps({"split": [["count"]]}), "DAG.Dependencies.split: task names must be strings, "
                                       "got array"),
    "deps name a number": (
        _deps({"split": [1]}), "DAG.Dependencies.split: task names must be strings, got number"),
    "events not a list": (
        {**GUIDE_JOB, "Notification": {"Topic": {"Events": "OnJobFinished"}}},
        "Notification.Topic.Events: must be a list of event names, got string"),
    "event an object": (
        {**GUIDE_JOB, "Notification": {"Topic": {"Events": [{"a": 1}]}}}, "unknown event"),
    "count a float": (_split(InstanceCount=2.0), "InstanceCount: must be an integer, got number"),
    "timeout a bool": (_split(Timeout=True), "Timeout: must be an integer, got boolean"),
    "name a number": ({**GUIDE_JOB, "Name": 7}, "Name: must be a string, got number"),
    "package false": (_package(False), "PackagePath: want an OSS URL"),
    "package zero": (_package(0), "PackagePath: want an OSS URL"),
    "locale false": (
        _split(Parameters={"Command": {"CommandLine": "x"},
                           "InputMappingConfig": {"Locale": False}}),
        "InputMappingConfig.Locale: want a string such as \"UTF-8\", got False"),
    "lock a string": (
        _split(Parameters={"Command": {"CommandLine": "x"},
                           "InputMappingConfig": {"Lock": "true"}}),
        "InputMappingConfig.Lock: want true or false"),
    "fail-on a string": (
        {**GUIDE_JOB, "JobFailOnInstanceFail": "false"}, "JobFailOnInstanceFail: must be true"),
    "mapping value a number": (
        _split(InputMapping={"oss://your-bucket/log-count/": 5}), "want string keys and values"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_a_wrong_json_type_is_refused_by_name(case: str) -> None:
    doc, expected = WRONG_TYPES[case]
    before = copy.deepcopy(doc)
    with pytest.raises(JobError) as info:
        Job.parse(doc)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert doc == before  # parsing changed nothing in what it was given


def test_string_env_values_and_an_empty_package_still_parse() -> None:
    job = Job.parse(_package(""))
    assert job.tasks["split"].package_path is None
    assert Job.parse(_env("3")).tasks["count"].env_vars == {"K": "3"}


REPEATED = {
    "top level": ('{"Name": "a", "Name": "b", "DAG": {}}', "key 'Name' appears twice"),
    "in a task": (
        '{"Name": "a", "DAG": {"Tasks": {"t": {"InstanceCount": 1, "InstanceCount": 3,'
        ' "Parameters": {"Command": {"CommandLine": "true"}}}}}}',
        "key 'InstanceCount' appears twice"),
    "two tasks of one name": (
        '{"Name": "a", "DAG": {"Tasks": {"t": {}, "t": {}}}}', "key 't' appears twice"),
    "env var": (
        '{"Name": "a", "DAG": {"Tasks": {"t": {"Parameters": {"Command": {"CommandLine": "x",'
        ' "EnvVars": {"A": "1", "A": "2"}}}}}}}', "key 'A' appears twice"),
}


@pytest.mark.parametrize("case", sorted(REPEATED))
def test_a_repeated_key_in_job_json_is_refused(case: str, tmp_path: Path) -> None:
    text, expected = REPEATED[case]
    path = tmp_path / "job.json"
    path.write_text(text)
    with pytest.raises(JobError) as info:
        jobcfg.load_job(path)
    assert str(info.value) == f"{path}: {expected} in one object: keep one"


def test_the_guide_job_file_has_no_repeats_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(GUIDE_JOB))
    job, _ = jobcfg.load_job(path)
    assert job.name == "log-count"


BAD_CFG_VALUES = {
    "fail-on a word": ("job_fail_on_instance_fail=maybe",
                       "job_fail_on_instance_fail='maybe' must be true or false"),
    "nodes with underscore": ("nodes=1_0", "nodes='1_0' must be an integer"),
    "nodes in another script": ("nodes=\u0663", "must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CFG_VALUES))
def test_job_cfg_values_are_not_coerced(case: str, tmp_path: Path) -> None:
    line, expected = BAD_CFG_VALUES[case]
    (tmp_path / "log-count").mkdir()
    cfg = tmp_path / "job.cfg"
    text = GUIDE_CFG.replace("nodes=3", line) if line.startswith("nodes") else \
        GUIDE_CFG.replace("[DEFAULT]", f"[DEFAULT]\n{line}")
    cfg.write_text(text)
    with pytest.raises(JobError) as info:
        jobcfg.load_job(cfg)
    assert expected in str(info.value)


@pytest.mark.parametrize(("word", "value"), [("no", False), ("False", False), ("on", True)])
def test_job_cfg_booleans_as_configparser_reads_them(word: str, value: bool,
                                                     tmp_path: Path) -> None:
    (tmp_path / "log-count").mkdir()
    cfg = tmp_path / "job.cfg"
    cfg.write_text(GUIDE_CFG.replace("[DEFAULT]",
                                     f"[DEFAULT]\njob_fail_on_instance_fail={word}"))
    job, _ = jobcfg.load_job(cfg)
    assert job.job_fail_on_instance_fail is value
