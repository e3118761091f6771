"""Whole-batch pseudonym encoding (PseudonymFormat.encode_many) equals the per-value definition."""

from __future__ import annotations

import os

import pytest
from pseudonymise.core import formats
from pseudonymise.core.formats import ALPHABETS, PseudonymFormat


@pytest.mark.parametrize("alphabet", sorted(ALPHABETS))
def test_every_length_and_prefix(alphabet: str) -> None:
    macs = [os.urandom(32) for _ in range(300)] + [b"\x00" * 32, b"\xff" * 32]
    lo, hi = ALPHABETS[alphabet]
    for length in range(lo, hi + 1):
        for prefix in ("", "P-", "é\\"):
            fmt = PseudonymFormat(alphabet, length, prefix)
            assert fmt.encode_many(macs) == [fmt.encode(m) for m in macs], (alphabet, length, prefix)


def test_empty_batch() -> None:
    assert PseudonymFormat().encode_many([]) == []


def test_a_replaced_encoder_is_used_value_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(formats._ENCODERS, "base32", lambda mac, length: mac.hex()[:length].upper())
    macs = [os.urandom(32) for _ in range(5)]
    assert PseudonymFormat(prefix="x").encode_many(macs) == ["x" + m.hex()[:26].upper() for m in macs]
