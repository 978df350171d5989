"""Who may read credentials: allow-list on both listeners, tokens, proxies, secrets kept out
of logs, argv and files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CLIENT = r"""
import http.client, json, socket, sys
kind, where, path = sys.argv[1], sys.argv[2], sys.argv[3]
token = sys.argv[4] if len(sys.argv) > 4 else None
if kind == "unix":
    class C(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(where)
    conn = C("localhost", timeout=10)
else:
    host, port = where.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
try:
    conn.request("GET", path, headers={"Authorization": token} if token else {})
    r = conn.getresponse(); print(json.dumps([r.status, json.loads(r.read())]))
except OSError as e:
    print(json.dumps([0, {"message": str(e)}]))
"""


def as_user(uid: int, gid: int, *args: str) -> tuple[int, dict]:
    """Run the tiny client as another user (setpriv from util-linux), return (status, doc)."""
    out = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", sys.executable, "-c",
         CLIENT, *args],
        capture_output=True, text=True, timeout=30, check=True,
    )
    status, doc = json.loads(out.stdout)
    return status, doc


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # pytest's tmp dirs are 0700 root: other users could not even reach the socket.
    path = Path(tempfile.mkdtemp(prefix="ga-cred-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="session")
def test_group(test_users: dict[str, int]) -> int:
    import grp

    try:
        gid = grp.getgrnam("ga-test").gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", "ga-test"], check=True, capture_output=True)
        gid = grp.getgrnam("ga-test").gr_gid
    for user in test_users:
        subprocess.run(["usermod", "-a", "-G", "ga-test", user], check=True, capture_output=True)
    return gid


def test_allow_list_on_unix_socket_and_tcp(credential_service, test_users, test_group,
                                           shared_dir):
    import pwd

    svc = credential_service(
        socket_path=shared_dir / "credentials.sock", socket_group="ga-test",
        allow_users=["ga-test-allowed"],
    )
    sock = str(svc.socket_path)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    assert os.stat(sock).st_gid == test_group
    tcp = "{}:{}".format(*svc.tcp)
    for name, expect in (("ga-test-allowed", 200), ("ga-test-denied", 403)):
        pw = pwd.getpwnam(name)
        for kind, where in (("unix", sock), ("tcp", tcp)):
            status, doc = as_user(pw.pw_uid, pw.pw_gid, kind, where, "/v1/credentials/aws",
                                  *([svc.token] if kind == "tcp" else []))
            assert status == expect, (name, kind, doc)
            if expect == 403:
                assert doc["code"] == "Forbidden"
                assert "allow_users" in doc["message"]  # says how to be allowed
                assert "SecretAccessKey" not in doc
    # Root is always allowed.
    assert svc.get("/v1/credentials/aws")[0] == 200
    assert svc.get("/v1/credentials/aws", via="tcp")[0] == 200


def test_allow_groups_admits_supplementary_group_members(credential_service, test_users,
                                                          test_group, shared_dir):
    import pwd

    svc = credential_service(socket_path=shared_dir / "c.sock", socket_group="ga-test",
                             allow_groups=["ga-test"])
    pw = pwd.getpwnam("ga-test-denied")  # primary group is its own; ga-test is supplementary
    path = "/v1/credentials/aws"
    assert as_user(pw.pw_uid, pw.pw_gid, "unix", str(svc.socket_path), path)[0] == 200
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", "{}:{}".format(*svc.tcp), path,
                   svc.token)[0] == 200


def test_token_is_required_on_tcp(credential_service, tmp_path):
    token_file = tmp_path / "token"
    svc = credential_service(token_file=token_file)
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text().strip()
    # The Unix socket identifies the process exactly (no request forgery): no token needed.
    assert svc.get("/v1/credentials/aws")[0] == 200
    for via in ("unix", "tcp"):
        if via == "tcp":
            status, doc = svc.get("/v1/credentials/aws", via=via, auth=False)
            assert (status, doc["code"]) == (401, "Unauthorized")
            status, doc = svc.get("/v1/credentials/aws", via=via,
                                  headers={"Authorization": "wrong"})
            assert status == 401
        status, doc = svc.get("/v1/credentials/aws", via=via, headers={"Authorization": token})
        assert status == 200 and doc["AccessKeyId"].startswith("STS.")
        status, _ = svc.get("/v1/credentials/aws", via=via,
                            headers={"Authorization": f"Bearer {token}"})
        assert status == 200


def test_token_file_with_loose_mode_is_refused(credential_service, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("x" * 32)
    token_file.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        credential_service(token_file=token_file)


def test_capability_path(credential_service):
    secret = "cap-" + "a1b2c3d4" * 4
    svc = credential_service(path_secret=secret)
    for via in ("unix", "tcp"):
        # The path alone is enough (the Alibaba SDKs cannot send a header) ...
        assert svc.get(f"/{secret}/v1/credentials/alibaba", via=via, auth=False)[0] == 200
    # ... and on TCP without it (or with a wrong one) the token is needed.
    for path in ("/v1/credentials/alibaba", f"/{secret[:-1]}x/v1/credentials/alibaba"):
        status, doc = svc.get(path, via="tcp", auth=False)
        assert status in (401, 404) and "AccessKeyId" not in doc


def test_x_forwarded_for_is_refused(credential_service):
    svc = credential_service()
    status, doc = svc.get("/v1/credentials/aws", via="tcp",
                          headers={"X-Forwarded-For": "10.0.0.1"})
    assert status == 403 and "X-Forwarded-For" in doc["message"]


def test_scoped_consumer_minted_per_task(credential_service, test_users, shared_dir):
    import pwd

    svc = credential_service(socket_path=shared_dir / "c.sock")
    registry = svc.service.registry
    pw = pwd.getpwnam("ga-test-allowed")
    minted = registry.mint("task-1", svc.service.rotator, uids=[pw.pw_uid])
    assert minted.token not in repr(minted) and minted.token not in repr(registry.names())
    tcp = "{}:{}".format(*svc.tcp)
    path = f"{minted.path}/v1/credentials/aws"
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, minted.token)[0] == 200
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path)[0] == 401  # token missing
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, "nope" * 8)[0] == 401
    # The task's user is not allowed on the host endpoint.
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, "/v1/credentials/aws")[0] == 403
    # Token-only consumer: the Authorization header alone selects it.
    only_token = registry.mint("task-2", svc.service.rotator, uids=[pw.pw_uid], with_path=False)
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, "/v1/credentials/aws", only_token.token)[0] \
        == 200
    registry.remove("task-1")
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, minted.token)[0] in (401, 403, 404)


def test_task_consumer_restored_from_digests(credential_service, test_users, shared_dir):
    """After an agent restart a task's consumer is registered again from the digests of its
    token and path: the same URL and token work; the path alone answers (no token sent),
    a wrong token does not; removing it closes it."""
    import pwd

    from guestagent.credentials.consumers import digest

    svc = credential_service(socket_path=shared_dir / "c.sock")
    registry = svc.service.registry
    pw = pwd.getpwnam("ga-test-allowed")
    minted = registry.mint("task:x", svc.service.rotator, uids=[pw.pw_uid],
                           path_unless_token=True)
    registry.remove("task:x")  # what a restart loses
    restored = registry.restore("task:x", svc.service.rotator, uids=[pw.pw_uid],
                                token_digest=digest(minted.token),
                                path_digest=digest(minted.path.strip("/")),
                                path_unless_token=True)
    assert minted.token not in repr(restored) and minted.path not in repr(restored)
    tcp = "{}:{}".format(*svc.tcp)
    path = f"{minted.path}/v1/credentials/aws"
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, minted.token)[0] == 200
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path)[0] == 200
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, "nope" * 8)[0] == 401
    other = registry.mint("task:y", svc.service.rotator, uids=[pw.pw_uid],
                          path_unless_token=True)
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, other.token)[0] == 401
    registry.remove("task:x")
    assert as_user(pw.pw_uid, pw.pw_gid, "tcp", tcp, path, minted.token)[0] in (401, 403, 404)


def test_no_secret_in_logs_argv_or_files(credential_service, emulator, tmp_path, caplog):
    profile = tmp_path / "home" / ".alibabacloud" / "credentials"
    env_file = tmp_path / "etc" / "credentials.env"
    with caplog.at_level(logging.DEBUG):
        # Unscaled (6 h sets): only the explicit rotation below changes the set, so the
        # files and "the newest issued set" cannot drift apart under a slow machine.
        svc = credential_service(scaled=False, poll_interval=0.2, profile_file=profile,
                                 env_file=env_file, token_file=tmp_path / "t")
        token = (tmp_path / "t").read_text().strip()
        svc.get("/v1/credentials/aws", headers={"Authorization": token})
        svc.get("/v1/credentials/aws")  # refused: logged
        emulator.rotate_credentials()
        newest = emulator.issued_credentials()[-1]["AccessKeyId"]
        svc.wait_for(lambda: svc.served_key() == newest)
        # Both files are rewritten one after the other: wait for the second too.
        svc.wait_for(lambda: newest in profile.read_text() and newest in env_file.read_text())
        svc.service.status()
        repr(svc.service.rotator.snapshot)
        probe = logging.getLogger("probe")
        probe.debug("%r %r", svc.service.rotator.snapshot, svc.service.status())
    issued = emulator.issued_credentials()
    secrets = [s for c in issued for s in (c["AccessKeySecret"], c["SecurityToken"])] + [token]
    text = caplog.text + "\n".join(repr(r.args) for r in caplog.records)
    for secret in secrets:
        assert secret not in text
    # The agent's own records do not even carry full key ids (masked).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("guestagent"))
    for c in issued:
        assert c["AccessKeyId"] not in ours
    # argv of this process and its threads.
    cmdline = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().decode(errors="replace")
    assert not any(s in cmdline for s in secrets)
    # The opt-in files are 0600 and hold the current set; no other file under tmp has secrets.
    for path in (profile, env_file):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    current = issued[-1]
    assert current["AccessKeySecret"] in profile.read_text()
    assert f"OSS_SESSION_TOKEN='{current['SecurityToken']}'" in env_file.read_text()
    for path in tmp_path.rglob("*"):
        if path.is_file() and path not in (profile, env_file, tmp_path / "t"):
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    # Detach: the files go away with the role.
    emulator.detach_role()
    svc.wait_for(lambda: not profile.exists() and not env_file.exists())


def test_allow_users_alone_opens_the_socket_and_token_to_them(credential_service, test_users,
                                                              shared_dir):
    """One setting, one effect: no socket_group needed (the allow-list becomes an ACL)."""
    import pwd

    svc = credential_service(socket_path=shared_dir / "c.sock", allow_users=["ga-test-allowed"])
    sock = str(svc.socket_path)
    assert os.stat(sock).st_mode & 0o007 == 0  # still closed to others by mode
    token_file = svc.service.token_file
    allowed, denied = pwd.getpwnam("ga-test-allowed"), pwd.getpwnam("ga-test-denied")
    status, doc = as_user(allowed.pw_uid, allowed.pw_gid, "unix", sock, "/v1/credentials/aws")
    assert status == 200 and doc["AccessKeyId"]
    # The allowed user can read the token its AWS SDK sends on TCP; the other cannot.
    read = [sys.executable, "-c", f"print(open({str(token_file)!r}).read())"]
    for pw, ok in ((allowed, True), (denied, False)):
        res = subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                              "--init-groups", *read], capture_output=True, text=True,
                             timeout=30, check=False)
        assert (res.returncode == 0) is ok, res.stderr
    token = token_file.read_text().strip()
    tcp = "{}:{}".format(*svc.tcp)
    assert as_user(allowed.pw_uid, allowed.pw_gid, "tcp", tcp, "/v1/credentials/aws",
                   token)[0] == 200
    # Anyone else: the file system refuses the socket (and the peer check would too).
    status, doc = as_user(denied.pw_uid, denied.pw_gid, "unix", sock, "/v1/credentials/aws")
    assert status in (0, 403) and "AccessKeyId" not in doc
    assert as_user(denied.pw_uid, denied.pw_gid, "tcp", tcp, "/v1/credentials/aws",
                   token)[0] == 403


def test_extra_listener_for_task_consumers(credential_service):
    """The task launcher's way in: one more listening socket, served like the others, and
    consumers that admit peers by address (containers on a bridge have no uid here)."""
    import http.client
    import socket

    from guestagent.credentials.consumers import Consumer
    from guestagent.credentials.peers import Peer

    svc = credential_service(scaled=False)
    server = svc.service.server
    extra = socket.socket()
    extra.bind(("127.0.0.1", 0))
    extra.listen(16)
    try:
        server.add_listener(extra, loopback_only=False)
        minted = svc.service.mint("task-x", addresses=["127.0.0.1"])
        conn = http.client.HTTPConnection(*extra.getsockname(), timeout=10)
        conn.request("GET", f"{minted.path}/v1/credentials/aws",
                     headers={"Authorization": minted.token})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["AccessKeyId"]
        conn.close()
        server.remove_listener(extra)
    finally:
        extra.close()
    consumer = Consumer("c", svc.service.rotator, addresses=frozenset({"172.17.0.2"}))
    assert consumer.permits(Peer("172.17.0.2:40000", why="not a loopback address"))
    assert not consumer.permits(Peer("172.17.0.3:40000", why="not a loopback address"))
