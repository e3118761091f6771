"""Canonical bytes (docs/design.md §4 step 2): what "the same identifier" means (the normalisers: test_policy.py)."""

from __future__ import annotations

import datetime as dt
import decimal
import fractions
import unicodedata
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pseudonymise.core.canonical import TYPE_TAGS, canonical, from_canonical
from pseudonymise.core.errors import InvalidTextError, PolicyError, UnsupportedTypeError

valid_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(text=valid_text)
def test_nfc_and_nfd_spellings_give_the_same_bytes(text: str) -> None:
    nfc = canonical(unicodedata.normalize("NFC", text), "name")
    nfd = canonical(unicodedata.normalize("NFD", text), "name")
    assert nfc == nfd == ("str", unicodedata.normalize("NFC", text).encode("utf-8"))


def test_composed_and_decomposed_name() -> None:
    assert canonical("Zoe\u0308", "name") == canonical("Zo\u00eb", "name") == ("str", b"Zo\xc3\xab")


@settings(max_examples=300, deadline=None)
@given(number=st.integers(min_value=-(10**40), max_value=10**40))
def test_integer_and_the_text_it_spells_give_the_same_bytes(number: int) -> None:
    tag, data = canonical(number, "id")
    assert tag == "int"
    assert data == canonical(str(number), "id")[1] == str(number).encode("ascii")
    assert from_canonical(tag, data) == number


def test_integer_canonical_form_is_plain_decimal() -> None:
    assert canonical(-42, "id") == ("int", b"-42")
    assert canonical(0, "id") == ("int", b"0")
    assert canonical(np.int64(7), "id") == ("int", b"7")
    assert canonical(np.uint8(255), "id") == ("int", b"255")
    # text is never reinterpreted: leading zeros stay, so "007" is another identifier than 7
    assert canonical("007", "id")[1] == b"007"


def test_bool_is_true_false_and_not_an_integer() -> None:
    assert canonical(True, "flag") == ("bool", b"true")
    assert canonical(False, "flag") == ("bool", b"false")
    assert canonical(np.bool_(True), "flag") == ("bool", b"true")
    assert canonical(np.bool_(False), "flag") == ("bool", b"false")
    assert canonical(1, "flag")[1] != canonical(True, "flag")[1]
    assert from_canonical("bool", b"true") is True
    assert from_canonical("bool", b"false") is False


@settings(max_examples=200, deadline=None)
@given(day=st.dates())
def test_date_is_isoformat(day: dt.date) -> None:
    assert canonical(day, "d") == ("date", day.isoformat().encode("ascii"))
    assert from_canonical("date", canonical(day, "d")[1]) == day


@settings(max_examples=200, deadline=None)
@given(instant=st.datetimes(timezones=st.none() | st.timezones()))
def test_datetime_is_isoformat(instant: dt.datetime) -> None:
    tag, data = canonical(instant, "t")
    assert (tag, data) == ("datetime", instant.isoformat().encode("ascii"))
    back = from_canonical(tag, data)
    assert back.isoformat() == instant.isoformat()


def test_datetime_keeps_its_offset() -> None:
    paris = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    utc = paris.astimezone(dt.UTC)
    assert canonical(paris, "t")[1] == b"2026-03-01T12:00:00+01:00"
    # the same instant written in another offset is another canonical value (isoformat, as docs/design.md §4 fixes)
    assert canonical(utc, "t")[1] == b"2026-03-01T11:00:00+00:00"
    assert canonical(dt.datetime(2026, 3, 1), "t")[1] == b"2026-03-01T00:00:00"
    assert canonical(dt.date(2026, 3, 1), "t") == ("date", b"2026-03-01")


@settings(max_examples=200, deadline=None)
@given(value=st.uuids())
def test_uuid_is_lowercase_hyphenated(value: uuid.UUID) -> None:
    tag, data = canonical(value, "u")
    assert tag == "uuid"
    assert data == str(value).lower().encode("ascii")
    assert len(data) == 36 and data.count(b"-") == 4
    assert data == data.lower()
    assert from_canonical(tag, data) == value


def test_uuid_from_uppercase_text() -> None:
    value = uuid.UUID("A8098C1A-F86E-11DA-BD1A-00112444BE1E")
    assert canonical(value, "u")[1] == b"a8098c1a-f86e-11da-bd1a-00112444be1e"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_bytes_are_taken_as_they_are(data: bytes) -> None:
    assert canonical(data, "b") == ("bytes", data)
    assert canonical(bytearray(data), "b") == ("bytes", data)
    assert canonical(memoryview(data), "b") == ("bytes", data)
    assert from_canonical("bytes", data) == data


@settings(max_examples=200, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True), column=st.text(min_size=1, max_size=20))
def test_floats_are_refused_naming_the_column(value: float, column: str) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        canonical(value, column)
    assert repr(column) in str(info.value)
    assert "float" in str(info.value)


@pytest.mark.parametrize("value", [1234.5678, np.float64(1234.5678), np.float32(2.5), decimal.Decimal("1234.5678"),
                                   fractions.Fraction(1, 3), complex(1, 2), object(), [1], {"a": 1}])
def test_other_types_are_refused_naming_the_column_not_the_value(value: Any) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        canonical(value, "amount")
    message = str(info.value)
    assert "'amount'" in message
    assert "1234" not in message


@pytest.mark.parametrize("text", ["\ud800", "abc\udfff", "\udc80é"])
def test_lone_surrogates_are_invalid_text(text: str) -> None:
    with pytest.raises(InvalidTextError) as info:
        canonical(text, "surname")
    assert "'surname'" in str(info.value)
    assert "abc" not in str(info.value)


def test_invalid_text_is_a_policy_error_and_not_unsupported() -> None:
    assert issubclass(InvalidTextError, PolicyError)
    assert not issubclass(InvalidTextError, UnsupportedTypeError)


def test_type_tags_round_trip() -> None:
    samples = ["Zoë", 12, True, dt.date(2026, 1, 2), dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
               uuid.UUID(int=5), b"\x00\xff"]
    assert sorted(canonical(v, "c")[0] for v in samples) == sorted(TYPE_TAGS)
    for value in samples:
        back = from_canonical(*canonical(value, "c"))
        assert back == value and type(back) is type(value)
    with pytest.raises(PolicyError):
        from_canonical("float", b"1.5")
