"""``guestagent credentials show|env|check`` against a running service and the emulator."""

from __future__ import annotations

import pytest

from guestagent.cli import main


@pytest.fixture
def configured(credential_service, emulator, tmp_path, monkeypatch):
    svc = credential_service(scaled=False)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[metadata]\nurl = "{emulator.url}"\n'
        f'[credentials]\nsocket_path = "{svc.socket_path}"\n'
    )
    monkeypatch.setenv("GUESTAGENT_CONFIG", str(cfg))
    return svc


def test_show_masks_secrets(configured, emulator, capsys):
    assert main(["credentials", "show"]) == 0
    out = capsys.readouterr().out
    cur = emulator.issued_credentials()[-1]
    assert cur["AccessKeySecret"] not in out and cur["SecurityToken"] not in out
    assert cur["AccessKeyId"][-4:] in out and cur["AccessKeyId"] not in out
    assert "EcsRamRoleDemo" in out
    assert main(["credentials", "show", "--from", "metadata"]) == 0
    assert "metadata service" in capsys.readouterr().out


def test_env_prints_exports_and_warns(configured, emulator, capsys):
    assert main(["credentials", "env"]) == 0
    captured = capsys.readouterr()
    cur = emulator.issued_credentials()[-1]
    assert f"export ALIBABA_CLOUD_ACCESS_KEY_SECRET='{cur['AccessKeySecret']}'" in captured.out
    assert "OSS_SESSION_TOKEN" in captured.out
    assert "warning" in captured.err


def test_check_gives_a_verdict(configured, capsys):
    assert main(["credentials", "check"]) == 0
    out = capsys.readouterr().out
    assert "verdict: credentials are served and fresh" in out


def test_check_reports_no_role(configured, emulator, capsys):
    emulator.detach_role()
    assert main(["credentials", "check"]) == 1
    assert "NOT served" in capsys.readouterr().out


def test_show_without_server_or_service_is_one_line(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[metadata]\nurl = "http://127.0.0.1:9"\ntimeout = 0.2\nretries = 0\n'
                   f'[credentials]\nsocket_path = "{tmp_path / "none.sock"}"\n')
    monkeypatch.setenv("GUESTAGENT_CONFIG", str(cfg))
    assert main(["credentials", "show"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
