"""The emulator's metadata tree: listings, leaves, versions, identity and its pkcs7."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from _emulator_http import get, request
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from guestagent.localcloud.emulator import Emulator, load_scenario

DATA = Path(__file__).parents[1] / "data" / "scenarios"

META_KEYS = [
    "instance-id",
    "region-id",
    "zone-id",
    "hostname",
    "image-id",
    "serial-number",
    "owner-account-id",
    "source-address",
    "mac",
    "network-type",
    "private-ipv4",
    "eipv4",
    "vpc-id",
    "vpc-cidr-block",
    "vswitch-id",
    "vswitch-cidr-block",
]


def test_version_and_root_listings(emulator: Any) -> None:
    assert get(emulator.url, "/") == (200, "2016-01-01\nlatest")
    for version in ("latest", "2016-01-01"):
        status, body = get(emulator.url, f"/{version}/")
        assert status == 200
        assert body.split("\n") == [
            "dynamic/",
            "maintenance/",
            "meta-data/",
            "user-data",
            "vendor-data",
        ]
    # A directory asked for without its slash is listed too.
    assert get(emulator.url, "/latest/meta-data")[1] == get(emulator.url, "/latest/meta-data/")[1]


def test_meta_data_listing_has_every_key(emulator: Any) -> None:
    status, body = get(emulator.url, "/latest/meta-data/")
    names = body.split("\n")
    assert status == 200
    for key in META_KEYS:
        assert key in names, key
    for sub in (
        "dns-conf/",
        "ntp-conf/",
        "instance/",
        "network/",
        "disks/",
        "public-keys/",
        "ram/",
    ):
        assert sub in names, sub
    assert "all" not in names and not body.endswith("\n")
    for key in META_KEYS:
        status, value = get(emulator.url, f"/latest/meta-data/{key}")
        assert status == 200 and value, key


def test_leaves_follow_the_scenario(emulator: Any) -> None:
    sc = emulator.scenario
    url = emulator.url
    assert get(url, "/latest/meta-data/instance-id") == (200, sc.instance.instance_id)
    assert get(url, "/2016-01-01/meta-data/region-id") == (200, "cn-hangzhou")
    assert get(url, "/latest/meta-data/dns-conf/nameservers") == (
        200,
        "100.100.2.136\n100.100.2.138",
    )
    assert get(url, "/latest/meta-data/ntp-conf/ntp-servers")[1].split("\n")[0] == "ntp1.aliyun.com"
    assert get(url, "/latest/meta-data/source-address")[1] == "http://mirrors.cloud.aliyuncs.com"
    assert get(url, "/latest/meta-data/instance/")[1].split("\n") == [
        "instance-name",
        "instance-type",
        "max-netbw-egress",
        "max-netbw-ingress",
        "spot/",
    ]
    assert get(url, "/latest/meta-data/instance/spot/") == (200, "termination-time")
    macs = get(url, "/latest/meta-data/network/interfaces/macs/")[1].split("\n")
    assert len(macs) == 2 and all(m.endswith("/") for m in macs)
    primary = sc.network.interfaces[0]
    base = f"/latest/meta-data/network/interfaces/macs/{primary.mac}/"
    assert get(url, base)[1].split("\n") == [
        "gateway",
        "netmask",
        "network-interface-id",
        "primary-ip-address",
        "private-ipv4s",
        "vpc-id",
        "vswitch-id",
    ]
    assert json.loads(get(url, base + "private-ipv4s")[1]) == primary.private_ipv4s
    assert get(url, "/latest/meta-data/mac")[1] == primary.mac
    disks = get(url, "/latest/meta-data/disks/")[1].split("\n")
    assert len(disks) == 2
    assert get(url, f"/latest/meta-data/disks/{disks[0]}id")[1].startswith("d-")
    (key_dir,) = get(url, "/latest/meta-data/public-keys/")[1].split("\n")
    assert get(url, f"/latest/meta-data/public-keys/{key_dir}openssh-key")[1].startswith(
        "ssh-ed25519 "
    )
    assert get(url, "/latest/meta-data/ram/security-credentials/") == (200, "EcsRamRoleDemo")
    assert get(url, "/latest/vendor-data")[0] == 200
    assert get(url, "/latest/dynamic/") == (200, "instance-identity/")
    assert get(url, "/latest/dynamic/instance-identity/") == (200, "document\npkcs7")


def test_absent_things_are_404_and_other_methods_405(emulator: Any) -> None:
    url = emulator.url
    assert get(url, "/latest/user-data")[0] == 404
    assert get(url, "/latest/maintenance/active-system-events")[0] == 404
    assert get(url, "/latest/meta-data/instance/spot/termination-time")[0] == 404
    assert get(url, "/latest/meta-data/nope")[0] == 404
    assert get(url, "/2099-01-01/meta-data/")[0] == 404
    assert get(url, "/latest/meta-data/../../etc/passwd")[0] == 404
    for method in ("POST", "DELETE", "PATCH"):
        assert request(url, "/latest/meta-data/instance-id", method, body=b"x")[0] == 405
    assert request(url, "/latest/meta-data/instance-id", "PUT")[0] == 405
    assert get(url, "/latest/api/token")[0] == 405


def test_meta_data_all_is_a_json_dump(emulator: Any) -> None:
    status, body = get(emulator.url, "/latest/meta-data/all")
    dump = json.loads(body)
    assert status == 200
    assert dump["instance-id"] == emulator.scenario.instance.instance_id
    assert dump["dns-conf"]["nameservers"] == ["100.100.2.136", "100.100.2.138"]
    assert "ram" not in dump  # credentials are never dumped


def test_keep_alive_and_content_length(emulator: Any) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/latest/meta-data/instance-id")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(body)
        assert resp.headers["Content-Type"] == "text/plain" and not resp.will_close
    conn.close()
    assert emulator.request_count == 3
    assert emulator.requests_log[-1] == ("/latest/meta-data/instance-id", "GET", 200)


def test_user_data_maintenance_values_and_instance_id(emulator: Any) -> None:
    url = emulator.url
    emulator.set_user_data(b"#!/bin/sh\necho hi\n")
    assert get(url, "/latest/user-data") == (200, "#!/bin/sh\necho hi\n")
    emulator.set_user_data(None)
    assert get(url, "/latest/user-data")[0] == 404

    event_id = emulator.add_maintenance_event("SystemMaintenance.Reboot", 600)
    (event,) = json.loads(get(url, "/latest/maintenance/active-system-events")[1])
    assert event["EventId"] == event_id and event["Code"] == "SystemMaintenance.Reboot"
    assert event["EventStatus"] == "Scheduled" and event["NotBefore"].endswith("Z")
    emulator.clear_maintenance_events()
    assert get(url, "/latest/maintenance/active-system-events")[0] == 404

    emulator.set_value("meta-data/dns-conf/nameservers", "10.0.0.2")
    assert get(url, "/latest/meta-data/dns-conf/nameservers") == (200, "10.0.0.2")
    emulator.set_value("/latest/meta-data/eipv4", None)
    assert get(url, "/latest/meta-data/eipv4")[0] == 404
    assert "eipv4" not in get(url, "/latest/meta-data/")[1].split("\n")
    emulator.set_value("meta-data/region-id", "cn-shanghai")
    assert (
        json.loads(get(url, "/latest/dynamic/instance-identity/document")[1])["region-id"]
        == "cn-shanghai"
    )

    emulator.set_instance_id("i-bp1newinstance0000001")
    assert get(url, "/latest/meta-data/instance-id") == (200, "i-bp1newinstance0000001")
    doc = json.loads(get(url, "/latest/dynamic/instance-identity/document")[1])
    assert doc["instance-id"] == "i-bp1newinstance0000001"
    with pytest.raises(ValueError):
        emulator.set_instance_id("bad")


def test_identity_document_fields(emulator: Any) -> None:
    doc = json.loads(get(emulator.url, "/latest/dynamic/instance-identity/document")[1])
    assert list(doc) == [
        "zone-id",
        "serial-number",
        "instance-id",
        "region-id",
        "private-ipv4",
        "owner-account-id",
        "mac",
        "image-id",
        "instance-type",
    ]
    assert doc["instance-type"] == emulator.scenario.instance.instance_type


def _signed(emulator: Any, query: str = "") -> tuple[bytes, list[x509.Certificate]]:
    status, body = get(emulator.url, "/latest/dynamic/instance-identity/pkcs7" + query)
    assert status == 200 and "BEGIN" not in body
    der = base64.b64decode(body)
    return der, pkcs7.load_der_pkcs7_certificates(der)


def test_pkcs7_carries_the_ca_certificate(emulator: Any) -> None:
    _, certs = _signed(emulator)
    ca = x509.load_pem_x509_certificate(emulator.ca_cert_pem)
    assert certs == [ca]


def _openssl_verify(signature: Path, ca: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", "smime", "-verify", "-inform", "DER", "-in", str(signature),
         "-CAfile", str(ca)],
        capture_output=True,
        check=False,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("audience", [None, "sts.aliyuncs.com"])
def test_pkcs7_verifies_with_openssl(emulator: Any, tmp_path: Path, audience: str | None) -> None:
    der, _ = _signed(emulator, f"?audience={audience}" if audience else "")
    (tmp_path / "sig.der").write_bytes(der)
    (tmp_path / "ca.pem").write_bytes(emulator.ca_cert_pem)
    out = _openssl_verify(tmp_path / "sig.der", tmp_path / "ca.pem")
    assert out.returncode == 0, out.stderr
    content = json.loads(out.stdout)
    document = json.loads(get(emulator.url, "/latest/dynamic/instance-identity/document")[1])
    if audience:
        assert content.pop("audience") == audience
    assert content == document
    # A different CA does not verify it.
    other = Emulator(
        load_scenario(
            overrides={
                "ca": {
                    "cert_file": str(DATA / "ca" / "other-ca.pem"),
                    "key_file": str(DATA / "ca" / "other-ca.key"),
                }
            }
        )
    )
    (tmp_path / "other.pem").write_bytes(other.ca_cert_pem)
    out = _openssl_verify(tmp_path / "sig.der", tmp_path / "other.pem")
    assert out.returncode != 0


def test_scenario_ca_files_sign(tmp_path: Path) -> None:
    scenario = load_scenario(
        overrides={
            "ca": {
                "cert_file": str(DATA / "ca" / "other-ca.pem"),
                "key_file": str(DATA / "ca" / "other-ca.key"),
            }
        }
    )
    with Emulator(scenario).start() as emu:
        assert emu.ca_cert_pem == (DATA / "ca" / "other-ca.pem").read_bytes()
        _, certs = _signed(emu)
        assert certs[0].public_bytes(Encoding.PEM) == emu.ca_cert_pem
