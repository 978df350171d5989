"""The Packer template (alicloud-ecs builder) validates offline with Debian's packer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).parents[2] / "images" / "packer" / "guestagent-debian12.json"


def validate(template: Path, wheels: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ALICLOUD_ACCESS_KEY": "LTAI-test", "ALICLOUD_SECRET_KEY": "test",
           "ALICLOUD_REGION": "cn-hangzhou", "CHECKPOINT_DISABLE": "1"}
    return subprocess.run(
        ["packer", "validate", "-var", f"wheels_dir={wheels}", str(template)],
        capture_output=True, text=True, timeout=120, env=env,
    )


@pytest.fixture
def packer() -> str:
    path = shutil.which("packer")
    if path is None:
        pytest.skip("packer is not installed (Debian package packer; bootstrap installs it)")
    return path


def test_template_validates(packer, tmp_path):
    res = validate(TEMPLATE, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_deprovision_is_the_last_step(packer, tmp_path):
    doc = json.loads(TEMPLATE.read_text())
    assert [b["type"] for b in doc["builders"]] == ["alicloud-ecs"]
    last = doc["provisioners"][-1]["inline"][-1]
    assert last == "guestagent deprovision --yes"
    # and the validator is not a rubber stamp: a template without a region is refused
    broken = tmp_path / "broken.json"
    del doc["builders"][0]["region"]
    broken.write_text(json.dumps(doc))
    assert validate(broken, tmp_path).returncode != 0
