"""Reading request bodies into a batch and writing the answer: JSON records and CSV, errors without values."""

from __future__ import annotations

import uuid
from datetime import date, datetime

import pytest
from pseudonymise.plugin.batch import BatchError, MemorySink, from_csv, from_records, json_value, to_csv, to_records


def test_csv_like_the_file_sources() -> None:
    batch = from_csv('\ufeffid,note\n1,"a, b"\n\n2,"two\nlines"\n3,\n'.encode(), max_rows=10)
    assert batch.columns == ["id", "note"] and len(batch) == 3
    assert list(batch.batches()) == [{"id": ["1", "2", "3"], "note": ["a, b", "two\nlines", None]}]


@pytest.mark.parametrize(("body", "message"), [
    (b"", "empty"), (b"id\n", "no records"), (b"id,\n1,2\n", "empty or duplicate"),
    (b'id\n"secret-value\n', "malformed CSV"), (b"a,b\n1\n", "1 fields where the header has 2"),
    (b"id\nsecret\xe9\n", "not valid UTF-8"),
])
def test_bad_csv(body: bytes, message: str) -> None:
    with pytest.raises(BatchError, match=message) as caught:
        from_csv(body, max_rows=10)
    assert caught.value.status == 400 and "secret" not in str(caught.value)


def test_row_limit() -> None:
    with pytest.raises(BatchError, match="3 records") as caught:
        from_csv(b"id\n1\n2\n3\n", max_rows=2)
    assert caught.value.status == 413
    with pytest.raises(BatchError, match="3 records"):
        from_records([{"id": 1}] * 3, max_rows=2)


def test_records_need_the_same_fields() -> None:
    batch = from_records([{"a": 1, "b": None}, {"b": 2, "a": "x"}], max_rows=5)
    assert batch.columns == ["a", "b"] and list(batch.batches()) == [{"a": [1, "x"], "b": [None, 2]}]
    with pytest.raises(BatchError, match=r"record 2 has other fields than record 1 \(missing: b; extra: c\)"):
        from_records([{"a": 1, "b": "secret"}, {"a": 2, "c": 3}], max_rows=5)
    with pytest.raises(BatchError, match="record 1 has no columns"):
        from_records([{}], max_rows=5)


def test_output_values() -> None:
    day, moment, ident = date(2026, 1, 2), datetime(2026, 1, 2, 3, 4, 5), uuid.UUID(int=1)
    assert [json_value(v) for v in (day, moment, ident, b"\x00\xff", None, 1.5)] == [
        "2026-01-02", "2026-01-02T03:04:05", "00000000-0000-0000-0000-000000000001", "AP8=", None, 1.5]
    sink = MemorySink(["id", "when"])
    sink.write({"id": ["x", None], "when": [day, None], "dropped": [1, 2]})
    assert to_records(sink.columns, sink.rows) == [{"id": "x", "when": "2026-01-02"}, {"id": None, "when": None}]
    assert to_csv(sink.columns, sink.rows) == "id,when\nx,2026-01-02\n,\n"
    sink.abort()
    assert sink.rows == []
