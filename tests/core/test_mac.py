"""The MAC primitives (docs/design.md §4 steps 3 and 5): RFC 4231 vectors, the design's messages written out with
stdlib ``hmac``, the secondary-key derivation with RFC 5869 HKDF written out, and the custody check."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

import pytest
from pseudonymise.core import native
from pseudonymise.core.errors import TokenKindError
from pseudonymise.core.mac import (
    PRIMARY_LABEL,
    SECONDARY_LABEL,
    Keyed,
    TransitKeyed,
    check_custody,
    derive_secondary_key,
    keyed,
    primary_label,
    pseudonym_mac,
    random_macs,
    token_macs,
)

from tests.core.conftest import Mint
from tests.reference import rfc4231_cases

# --- RFC 4231 -----------------------------------------------------------------------------------
RFC4231 = rfc4231_cases()


def test_rfc4231_file_holds_every_sha256_case_but_truncation() -> None:
    # RFC 4231 §4.2-4.8 minus §4.6 (truncated output, which the file leaves out)
    assert len(RFC4231) == 6
    assert RFC4231[0]["MD"].hex() == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    assert len(RFC4231[-1]["Key"]) == 131  # the larger-than-block-size key cases are included


@pytest.mark.parametrize("case", RFC4231, ids=[f"case-{i}" for i in range(len(RFC4231))])
def test_rfc4231_keyed_hmac(case: dict[str, bytes]) -> None:
    assert Keyed(case["Key"], b"").mac(case["Msg"]) == case["MD"]
    assert hmac.new(case["Key"], case["Msg"], hashlib.sha256).digest() == case["MD"]


@pytest.mark.parametrize("case", RFC4231, ids=[f"case-{i}" for i in range(len(RFC4231))])
def test_rfc4231_keyed_hmac_label_is_a_message_prefix(case: dict[str, bytes]) -> None:
    """The precomputed label is the start of the message: HMAC(key, label + msg)."""
    label, rest = case["Msg"][:3], case["Msg"][3:]
    assert Keyed(case["Key"], label).mac(rest) == case["MD"]


@pytest.mark.parametrize("case", RFC4231, ids=[f"case-{i}" for i in range(len(RFC4231))])
def test_rfc4231_with_the_engine_in_use(case: dict[str, bytes]) -> None:
    """``keyed`` (the C twin when the C engine is there) gives the same MACs as the definition."""
    assert keyed(case["Key"], b"").mac(case["Msg"]) == case["MD"]
    assert keyed(case["Key"], case["Msg"][:3]).mac_many([case["Msg"][3:]] * 2) == case["MD"] * 2
    assert Keyed(case["Key"], b"").mac_many([case["Msg"], case["Msg"]]) == case["MD"] * 2
    assert (type(keyed(b"k", b"")) is Keyed) is not native.available()


def test_the_design_messages() -> None:
    key, canonical = os.urandom(32), "Zoë".encode()
    assert PRIMARY_LABEL == b"pseudonymise/v1\x00" and SECONDARY_LABEL == b"pseudonymise/v1/secondary\x00"
    assert primary_label("") == b"pseudonymise/v1\x00\x00"
    assert primary_label("visité") == b"pseudonymise/v1\x00visit\xc3\xa9\x00"
    expected = hmac.new(key, b"pseudonymise/v1\x00visits\x00" + canonical, hashlib.sha256).digest()
    assert pseudonym_mac(key, "visits", canonical) == expected
    assert keyed(key, primary_label("visits")).mac(canonical) == expected


def test_secondary_key_is_rfc5869_hkdf_of_the_project_key() -> None:
    """docs/design.md §4 step 5 (v1.1): HKDF-SHA256 with an empty salt, written out with ``hmac``."""
    project_key = os.urandom(32)
    prk = hmac.new(b"", project_key, hashlib.sha256).digest()
    okm = hmac.new(prk, b"pseudonymise/v1/secondary-key\x00research-a\x01", hashlib.sha256).digest()
    assert derive_secondary_key(project_key, "research-a") == okm
    assert derive_secondary_key(project_key, "research-b") != okm


def test_random_macs_are_fresh() -> None:
    macs = random_macs(1000)
    assert len(macs) == 32_000
    assert len({macs[i:i + 32] for i in range(0, len(macs), 32)}) == 1000
    assert random_macs(0) == b""


class _RecordingTransit:
    """Stands in for :class:`~pseudonymise.core.transit.TransitMac` (Vault itself: tests/core/test_transit.py)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def macs(self, messages: list[bytes]) -> list[bytes]:
        self.messages += messages
        return [hashlib.sha256(m).digest() for m in messages]


def test_transit_macs_get_the_same_messages() -> None:
    transit: Any = _RecordingTransit()
    macs = TransitKeyed(transit, primary_label("d")).mac_many([b"a", b"bc"])
    assert transit.messages == [b"pseudonymise/v1\x00d\x00a", b"pseudonymise/v1\x00d\x00bc"]
    assert macs == b"".join(hashlib.sha256(m).digest() for m in transit.messages)


def test_custody_is_checked(mint: Mint) -> None:
    token = mint("research-b")
    check_custody(token, None)
    with pytest.raises(TokenKindError, match="does not use Vault Transit"):
        check_custody(token, _RecordingTransit())  # type: ignore[arg-type]
    assert token.key is not None
    assert token_macs(token, None, SECONDARY_LABEL).mac_many([b"x"]) == hmac.digest(token.key, SECONDARY_LABEL + b"x",
                                                                                     "sha256")
