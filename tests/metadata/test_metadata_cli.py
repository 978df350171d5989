"""`guestagent metadata ...` as a user runs it, and real clients nobody here wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest


def run_cli(url: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GUESTAGENT_METADATA_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "guestagent.cli", "metadata", *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )


@pytest.mark.parametrize("required", [False, True])
def test_identity_json(emulator: Any, required: bool) -> None:
    emulator.set_token_required(required)
    out = run_cli(emulator.url, "identity", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["instance-id"].startswith("i-")
    assert set(doc) >= {"zone-id", "region-id", "private-ipv4", "owner-account-id", "image-id"}


def test_identity_verify_with_ca(emulator: Any, tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(emulator.ca_cert_pem)
    out = run_cli(emulator.url, "identity", "--verify", "--ca", str(ca))
    assert out.returncode == 0, out.stderr
    # Success is said, in one line naming what was checked (silence used to be all).
    instance = out.stdout.split("instance-id", 1)[1].split()[0]
    last = out.stdout.splitlines()[-1]
    assert last.startswith(f"verified: the identity document of {instance} is signed (pkcs7)")
    assert "CN=" in last
    as_json = run_cli(emulator.url, "identity", "--verify", "--json", "--ca", str(ca))
    assert json.loads(as_json.stdout)["instance-id"] == instance  # stdout: the document only
    assert as_json.stderr.startswith(f"guestagent: verified: the identity document of {instance}")
    assert as_json.stderr.count("\n") == 1


@pytest.mark.parametrize("ca", ["none", "not-pem", "missing", "other-ca"])
def test_identity_verify_a_ca_problem_is_the_users_a_bad_signature_the_services(
        emulator: Any, tmp_path: Any, ca: str) -> None:
    # Exit 2 (fix your input) for the CA, 3 (bad answer) only when the signature fails;
    # a missing or non-PEM CA was 3, as if the service were at fault.
    from pathlib import Path

    files = {"not-pem": tmp_path / "hostname", "missing": tmp_path / "nope.pem",
             "other-ca": Path(__file__).parent.parent / "data/scenarios/ca/other-ca.pem"}
    files["not-pem"].write_text("not a certificate\n")
    args = () if ca == "none" else ("--ca", str(files[ca]))
    out = run_cli(emulator.url, "identity", "--verify", *args)
    assert out.returncode == (3 if ca == "other-ca" else 2), out.stderr
    assert out.stderr.count("\n") == 1
    assert {"none": "--verify needs the CA", "not-pem": "not a PEM certificate",
            "missing": "No such file", "other-ca": "does not verify"}[ca] in out.stderr


def test_nothing_listening_exits_3_quickly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    out = run_cli(f"http://127.0.0.1:{port}", "identity", "--json")
    assert out.returncode == 3
    assert time.monotonic() - start < 3.0
    assert out.stderr.count("\n") == 1 and "unavailable" in out.stderr


def test_get_ls_and_absent(emulator: Any) -> None:
    out = run_cli(emulator.url, "get", "meta-data/instance-id")
    assert out.returncode == 0 and out.stdout.strip().startswith("i-")
    out = run_cli(emulator.url, "ls", "meta-data/")
    assert "instance-id" in out.stdout.split() and "network/" in out.stdout.split()
    out = run_cli(emulator.url, "get", "meta-data/nope")
    assert out.returncode == 1 and "not found" in out.stderr
    out = run_cli(emulator.url, "get", "meta-data/../etc")
    assert out.returncode == 2 and "bad metadata path" in out.stderr


def test_credentials_masked_unless_asked(emulator: Any) -> None:
    issued = emulator.issued_credentials()
    out = run_cli(emulator.url, "credentials", "--json")
    assert out.returncode == 0, out.stderr
    masked = json.loads(out.stdout)
    secrets = {c["AccessKeySecret"] for c in emulator.issued_credentials()} | {
        c["SecurityToken"] for c in emulator.issued_credentials()}
    assert issued and not any(s in out.stdout for s in secrets)
    assert masked["Code"] == "Success"
    out = run_cli(emulator.url, "credentials", "--json", "--show-secret")
    assert json.loads(out.stdout)["AccessKeySecret"] in secrets
    out = run_cli(emulator.url, "credentials", "NoSuchRole")
    assert out.returncode == 1 and "not attached" in out.stderr


def test_bad_answer_exits_3(emulator: Any) -> None:
    emulator.add_fault("dynamic/instance-identity/document", "body", body='{"zone-id": ')
    out = run_cli(emulator.url, "identity")
    assert out.returncode == 3 and "not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr


def test_curl_reads_the_emulator_in_hardened_mode(emulator: Any) -> None:
    emulator.set_token_required(True)
    base = emulator.url
    token = subprocess.run(
        ["curl", "-sS", "-X", "PUT", f"{base}/latest/api/token",
         "-H", "X-aliyun-ecs-metadata-token-ttl-seconds: 60"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert token
    got = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", f"{base}/latest/meta-data/instance-id",
         "-H", f"X-aliyun-ecs-metadata-token: {token}"],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    assert got[0].startswith("i-") and got[-1] == "200"
    denied = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
         f"{base}/latest/meta-data/instance-id"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert denied == "403"


def test_oss2_provider_reads_role_credentials(emulator: Any) -> None:
    from oss2.credentials import EcsRamRoleCredentialsProvider

    from guestagent.metadata.client import MetadataClient

    (role,) = MetadataClient.from_url(emulator.url).ram_role_names()
    provider = EcsRamRoleCredentialsProvider(
        f"{emulator.url}/latest/meta-data/ram/security-credentials/{role}"
    )
    creds = provider.get_credentials()
    issued = {c["AccessKeyId"]: c for c in emulator.issued_credentials()}
    assert creds.access_key_id in issued
    assert creds.access_key_secret == issued[creds.access_key_id]["AccessKeySecret"]
    assert creds.security_token == issued[creds.access_key_id]["SecurityToken"]
