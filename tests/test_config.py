from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guestagent import config
from guestagent.config import ConfigError


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = config.from_mapping({})
    assert s.metadata.url == "http://100.100.100.200"
    assert s.metadata.token_ttl == 21600


def test_file_then_env_override(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[metadata]\nurl = "http://127.0.0.1:9"\ntimeout = 2\n')
    s = config.load(f, environ={"GUESTAGENT_METADATA_URL": "http://127.0.0.1:8"})
    assert s.metadata.url == "http://127.0.0.1:8"
    assert s.metadata.timeout == 2.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[metadata]\nurll = 'x'\n", "unknown key metadata.urll"),
        ("[metadataa]\n", "unknown section [metadataa]"),
        ("[metadata]\ntimeout = 'fast'\n", "metadata.timeout: expected a finite number"),
        ("[metadata]\ntimeout = nan\n", "metadata.timeout: expected a finite number, got nan"),
        ("[spot]\nhook_timeout = inf\n", "spot.hook_timeout: expected a finite number"),
        pytest.param("a = " + "[" * 3000 + "]" * 3000 + "\n", "not valid TOML: nested too deeply",
                     id="deep-nesting"),
        ("[metadata]\nurl = 'not a url'\n", "metadata.url: bad URL"),
        ("[metadata]\ntoken_ttl = 0\n", "metadata.token_ttl: must be 1..21600"),
        ("[metadata]\nuse_token = 'yes'\n", "metadata.use_token: expected true or false"),
        ("[metadata]\nversion = '2020'\n", "metadata.version: must be one of"),
        ("[metadata\n", "not valid TOML"),
        # ``^...$`` with re.match took a final newline (then a ValueError traceback at use)
        ('[credentials]\nrole = "Role\\n"\n', "credentials.role: not a RAM role name"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(f, environ={})
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"GUESTAGENT_METADATA_RETRIES \(metadata.retries\)"):
        config.from_mapping({}, {"GUESTAGENT_METADATA_RETRIES": "many"})
    with pytest.raises(ConfigError, match=r"GUESTAGENT_METADATA_TIMEOUT .*: expected a finite"):
        config.from_mapping({}, {"GUESTAGENT_METADATA_TIMEOUT": "nan"})
    with pytest.raises(ConfigError, match=r"GUESTAGENT_METADATA_URL \(metadata.url\): bad URL"):
        config.from_mapping({}, {"GUESTAGENT_METADATA_URL": "ftp://host"})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml", environ={})


def test_config_show_masks_secrets_and_reports_errors(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("[metadata]\nretries = -1\n")
    out = subprocess.run(
        [sys.executable, "-m", "guestagent.cli", "--config", str(f), "config", "show"],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "metadata.retries" in out.stderr
    f.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "guestagent.cli", "--config", str(f), "config", "show", "--json"],
        capture_output=True, text=True, check=True,
    )
    assert '"url": "http://100.100.100.200"' in out.stdout


def test_masking_of_secret_fields() -> None:
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Section:
        token: str = field(default="hunter2", metadata={"secret": True})

    assert config.is_secret(Section, "token")
