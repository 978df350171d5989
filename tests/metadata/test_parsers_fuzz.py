"""Whatever the service answers, a parser gives a model or a BadAnswer — never a traceback."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from guestagent.metadata.errors import BadAnswer
from guestagent.metadata.models import IdentityDocument, MaintenanceEvent, RoleCredentials
from guestagent.metadata.pkcs7 import verify_identity_signature

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=12,
)
CRED_KEYS = ["AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration", "LastUpdated",
             "Code"]
cred_docs = st.dictionaries(st.sampled_from(CRED_KEYS), json_values | st.text(max_size=25))
CA_PEM = (Path(__file__).parents[1] / "data/scenarios/ca/other-ca.pem").read_bytes()
answers = st.text(max_size=200) | json_values.map(json.dumps) | cred_docs.map(json.dumps)


def _total(fn: Any, text: str) -> None:
    try:
        fn(text)
    except BadAnswer as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(answers)
def test_credentials_parser_is_total(text: str) -> None:
    _total(lambda t: RoleCredentials.parse(t, "ram/security-credentials/r"), text)


@settings(max_examples=200, deadline=None)
@given(answers)
def test_identity_parser_is_total(text: str) -> None:
    _total(IdentityDocument.parse, text)


@settings(max_examples=200, deadline=None)
@given(answers)
def test_maintenance_parser_is_total(text: str) -> None:
    _total(MaintenanceEvent.parse_list, text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_pkcs7_verifier_is_total(blob: bytes) -> None:
    sig = base64.b64encode(blob).decode()
    _total(lambda s: verify_identity_signature("{}", s, CA_PEM), sig)
