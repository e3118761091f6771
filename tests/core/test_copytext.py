"""PostgreSQL's COPY text format a column at a time (core/copytext.py): split, decode, encode, build."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pseudonymise.core.copytext import (
    NULL,
    CopyText,
    _pg_text,
    build_rows,
    copy_text_fields,
    decode_column,
    encode_column,
    split_rows,
)

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def test_split_rows_checks_the_width() -> None:
    assert split_rows("1\ta\n2\t\\N", 2) == ["1", "a", "2", "\\N"]
    assert split_rows("1\ta\n2", 2) is None
    assert split_rows("", 1) == [""]


def test_decode_column() -> None:
    assert decode_column(["a", "b"]) == ["a", "b"]
    assert decode_column(["a\\tb", NULL, "\\\\x", "\\n\\r", "\\101\\x41", ""]) == ["a\tb", None, "\\x", "\n\r", "AA", ""]


def test_encode_column() -> None:
    plain = ["a", "b"]
    assert encode_column(plain) is plain  # nothing to escape: the list itself
    assert encode_column(["a", None]) == ["a", NULL]
    assert encode_column(["tab\there", "back\\slash", None]) == ["tab\\there", "back\\\\slash", NULL]
    assert encode_column([1, True, dt.date(2026, 1, 2), b"\x01"]) == ["1", "t", "2026-01-02", "\\\\x01"]
    carried = CopyText(["a\\tb", NULL])
    assert encode_column(carried) is carried  # COPY text passes through untouched


def test_build_rows() -> None:
    assert build_rows([["1", "2"], ["a", NULL]]) == b"1\ta\n2\t\\N\n"
    assert build_rows([[], []]) == b""
    assert build_rows([["é"]]) == "é\n".encode()
    with pytest.raises(ValueError, match="one field per row"):
        build_rows([["1", "2"], ["a"]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(texts | st.none(), texts | st.none()), min_size=1, max_size=30))
def test_round_trip(rows: list[tuple[str | None, str | None]]) -> None:
    columns = [list(c) for c in zip(*rows, strict=True)]
    data = build_rows([encode_column(c) for c in columns])
    fields = split_rows(data.decode()[:-1], 2)
    assert fields is not None
    assert [decode_column(fields[i::2]) for i in range(2)] == columns
    # each row also parses line by line, and every field agrees with the per-value encoder
    for line, row in zip(data.decode()[:-1].split("\n"), rows, strict=True):
        assert copy_text_fields(line) == list(row)
        assert line == "\t".join(_pg_text(v) for v in row)
