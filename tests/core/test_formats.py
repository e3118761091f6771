"""Pseudonym encodings (docs/design.md §4 step 4): lengths, alphabets, prefixes and the 64-bit floor."""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pseudonymise.core.errors import PolicyError
from pseudonymise.core.formats import ALPHABETS, DEFAULT_ALPHABET, DEFAULT_LENGTH, PseudonymFormat

CHARSETS = {
    "hex": set("0123456789abcdef"),
    "base32": set(string.ascii_lowercase + "234567"),
    "base64url": set(string.ascii_letters + string.digits + "-_"),
    "digits": set(string.digits),
}
MINIMUM = {"hex": 16, "base32": 13, "base64url": 11, "digits": 20}
MAXIMUM = {"hex": 64, "base32": 52, "base64url": 43, "digits": 77}
prefixes = st.text(st.characters(blacklist_characters="\x00\r\n\t", blacklist_categories=("Cs",)), max_size=32)


@st.composite
def formats(draw: st.DrawFn) -> PseudonymFormat:
    alphabet = draw(st.sampled_from(sorted(ALPHABETS)))
    return PseudonymFormat(alphabet, draw(st.integers(MINIMUM[alphabet], MAXIMUM[alphabet])), draw(prefixes))


def test_alphabet_table_matches_the_design() -> None:
    assert {a: lo for a, (lo, _hi) in ALPHABETS.items()} == MINIMUM
    assert {a: hi for a, (_lo, hi) in ALPHABETS.items()} == MAXIMUM


def test_default_is_base32_of_26() -> None:
    fmt = PseudonymFormat()
    assert (fmt.alphabet, fmt.length, fmt.prefix) == ("base32", 26, "") == (DEFAULT_ALPHABET, DEFAULT_LENGTH, "")
    assert PseudonymFormat.from_claim(None) == fmt
    assert PseudonymFormat.from_claim({}) == fmt


@settings(max_examples=300, deadline=None)
@given(fmt=formats(), mac=st.binary(min_size=32, max_size=32))
def test_length_charset_and_prefix(fmt: PseudonymFormat, mac: bytes) -> None:
    out = fmt.encode(mac)
    assert len(out) == fmt.width == len(fmt.prefix) + fmt.length
    assert out.startswith(fmt.prefix)
    assert set(out[len(fmt.prefix):]) <= CHARSETS[fmt.alphabet]


@settings(max_examples=200, deadline=None)
@given(length=st.integers(16, 64), mac=st.binary(min_size=32, max_size=32))
def test_hex_is_the_mac_hex_prefix(length: int, mac: bytes) -> None:
    assert PseudonymFormat("hex", length).encode(mac) == mac.hex()[:length]


@settings(max_examples=200, deadline=None)
@given(length=st.integers(13, 52), mac=st.binary(min_size=32, max_size=32))
def test_base32_is_lowercase_rfc4648_without_padding(length: int, mac: bytes) -> None:
    full = base64.b32encode(mac).decode().rstrip("=").lower()
    assert len(full) == 52
    assert PseudonymFormat("base32", length).encode(mac) == full[:length]


@settings(max_examples=200, deadline=None)
@given(length=st.integers(11, 43), mac=st.binary(min_size=32, max_size=32))
def test_base64url_is_rfc4648_section5_without_padding(length: int, mac: bytes) -> None:
    full = base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert len(full) == 43
    assert PseudonymFormat("base64url", length).encode(mac) == full[:length]


@settings(max_examples=200, deadline=None)
@given(length=st.integers(20, 77), mac=st.binary(min_size=32, max_size=32))
def test_digits_are_the_mac_modulo_a_power_of_ten(length: int, mac: bytes) -> None:
    out = PseudonymFormat("digits", length).encode(mac)
    assert int(out) == int.from_bytes(mac, "big") % 10**length
    assert len(out) == length


def test_digits_are_zero_padded() -> None:
    assert PseudonymFormat("digits", 20).encode((5).to_bytes(32, "big")) == "00000000000000000005"
    assert PseudonymFormat("digits", 20).encode(bytes(32)) == "0" * 20
    assert PseudonymFormat("digits", 25, "D").encode((10**20 + 7).to_bytes(32, "big")) == "D00001" + "0" * 19 + "7"


def test_known_encodings_of_one_mac() -> None:
    mac = bytes(range(32))
    assert PseudonymFormat("hex", 16).encode(mac) == "0001020304050607"
    assert PseudonymFormat("base32", 13).encode(mac) == "aaaqeayeaudaoc"[:13]
    assert PseudonymFormat("base64url", 11, "x-").encode(mac) == "x-AAECAwQFBgc"


@pytest.mark.parametrize("alphabet", sorted(MINIMUM))
def test_formats_under_64_bits_are_refused(alphabet: str) -> None:
    PseudonymFormat(alphabet, MINIMUM[alphabet])  # the floor itself is accepted
    with pytest.raises(PolicyError, match="64 bits") as info:
        PseudonymFormat(alphabet, MINIMUM[alphabet] - 1)
    assert alphabet in str(info.value)
    with pytest.raises(PolicyError):
        PseudonymFormat(alphabet, 1)


@pytest.mark.parametrize("alphabet", sorted(MAXIMUM))
def test_lengths_beyond_the_mac_are_refused(alphabet: str) -> None:
    PseudonymFormat(alphabet, MAXIMUM[alphabet])
    with pytest.raises(PolicyError):
        PseudonymFormat(alphabet, MAXIMUM[alphabet] + 1)


@pytest.mark.parametrize("length", [True, 20.0, "26", None])
def test_length_must_be_an_integer(length: object) -> None:
    with pytest.raises(PolicyError):
        PseudonymFormat("base32", length)  # type: ignore[arg-type]


def test_unknown_alphabet_and_bad_prefixes_are_refused() -> None:
    with pytest.raises(PolicyError, match="unknown"):
        PseudonymFormat("base58", 20)
    for prefix in ("x" * 33, "a\nb", "a\x00", "\t", 7):
        with pytest.raises(PolicyError, match="prefix"):
            PseudonymFormat("hex", 16, prefix)  # type: ignore[arg-type]
    PseudonymFormat("hex", 16, "x" * 32)


def test_claim_round_trip_and_unknown_fields() -> None:
    fmt = PseudonymFormat("digits", 24, "PAT-")
    assert fmt.to_claim() == {"alphabet": "digits", "length": 24, "prefix": "PAT-"}
    assert PseudonymFormat.from_claim(fmt.to_claim()) == fmt
    with pytest.raises(PolicyError):
        PseudonymFormat.from_claim({"alphabet": "hex", "length": 16, "salt": "x"})
    with pytest.raises(PolicyError):
        PseudonymFormat.from_claim(["hex", 16])  # type: ignore[arg-type]
