"""Reading request bodies into a batch and writing the answer: JSON records and CSV, errors without values."""

from __future__ import annotations

import uuid
from datetime import date, datetime

import pytest
from pseudonymise.core.errors import PseudonymiseError, RequestError
from pseudonymise.plugin.batch import (
    MemorySink,
    body_format,
    csv_cell,
    from_csv,
    from_records,
    json_value,
    to_csv,
    to_records,
)


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
    with pytest.raises(RequestError, match=message) as caught:
        from_csv(body, max_rows=10)
    assert caught.value.status == 400 and "secret" not in str(caught.value)


def test_row_limit() -> None:
    with pytest.raises(RequestError, match="3 records") as caught:
        from_csv(b"id\n1\n2\n3\n", max_rows=2)
    assert caught.value.status == 413
    with pytest.raises(RequestError, match="3 records"):
        from_records([{"id": 1}] * 3, max_rows=2)


def test_records_need_the_same_fields() -> None:
    batch = from_records([{"a": 1, "b": None}, {"b": 2, "a": "x"}], max_rows=5)
    assert batch.columns == ["a", "b"] and list(batch.batches()) == [{"a": [1, "x"], "b": [None, 2]}]
    with pytest.raises(RequestError, match=r"record 2 has other fields than record 1 \(missing: b; extra: c\)"):
        from_records([{"a": 1, "b": "secret"}, {"a": 2, "c": 3}], max_rows=5)
    with pytest.raises(RequestError, match="record 1 has no columns"):
        from_records([{}], max_rows=5)


def test_output_values() -> None:
    day, moment, ident = date(2026, 1, 2), datetime(2026, 1, 2, 3, 4, 5), uuid.UUID(int=1)
    assert [json_value(v) for v in (day, moment, ident, b"\x00\xff", None, 1.5)] == [
        "2026-01-02", "2026-01-02T03:04:05", "00000000-0000-0000-0000-000000000001", "AP8=", None, 1.5]
    sink = MemorySink(["id", "when"])
    sink.write({"id": ["x", None], "when": [day, None], "dropped": [1, 2]})
    assert to_records(sink.columns, sink.rows) == [{"id": "x", "when": "2026-01-02"}, {"id": None, "when": None}]
    assert to_csv(sink.columns, sink.rows) == "id,when\r\nx,2026-01-02\r\n,\r\n"
    sink.abort()
    assert sink.rows == []


@pytest.mark.parametrize(("value", "cell"), [
    ('=HYPERLINK("http://evil.example/","x")', '\'=HYPERLINK("http://evil.example/","x")'),
    ("+1+1", "'+1+1"), ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"), ("\r=1", "'\r=1"),
    ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
    ("-AbC_9xYz012", "'-AbC_9xYz012"),  # a base64url pseudonym: a spreadsheet would evaluate it too
    ("-", "'-"), ("-1-1", "'-1-1"), ("-1e5x", "'-1e5x"), ("-inf", "'-inf"), ("+12", "'+12"),
    ("'=1", "''=1"), ("'quoted", "''quoted"),  # so the prefix is exact to undo
    ("-12", "-12"), ("-0.5", "-0.5"), ("-1.5e3", "-1.5e3"), (-7, "-7"), (-2.5, "-2.5"),
    ("P-0001", "P-0001"), ("a=b", "a=b"), ("", ""), (None, ""),
])
def test_csv_cells_a_spreadsheet_would_run_are_neutralised(value: object, cell: str) -> None:
    assert csv_cell(value) == cell
    if isinstance(value, str) and cell != value:  # the documented way back
        assert cell[0] == "'" and cell[1] in "=+-@\t\r'" and cell[1:] == value


def test_csv_answers_quote_line_breaks_so_no_row_starts_unprotected() -> None:
    text = to_csv(["=a", "b"], [["x\r=HYPERLINK(1)", "y\n@SUM(1)"], ["\r=1", -3]])
    assert text == '\'=a,b\r\n"x\r=HYPERLINK(1)","y\n@SUM(1)"\r\n"\'\r=1",-3\r\n'


@pytest.mark.parametrize(("content_type", "found"), [
    ("application/json", "json"), ("Application/JSON; charset=UTF-8", "json"), ("text/csv", "csv"),
    ('text/csv; charset="utf-8"; header=present', "csv"), ("text/csv;charset=utf8", "csv"),
])
def test_bodies_are_read_as_declared(content_type: str, found: str) -> None:
    assert body_format(content_type) == found


@pytest.mark.parametrize(("content_type", "message"), [
    (None, "not declared"), ("", "not declared"), ("text/plain", "declared as 'text/plain'"),
    ("application/x-www-form-urlencoded", "declared as 'application/x-www-form-urlencoded'"),
    ("multipart/form-data; boundary=x", "declared as 'multipart/form-data'"),
    ("application/json-seq", "declared as 'application/json-seq'"), ("text/csv2", "'text/csv2'"),
    ("<script>/x y", "declared as something else"),
    ("application/json; charset=latin-1", "must be UTF-8"), ("text/csv; charset=utf-16", "must be UTF-8"),
])
def test_other_bodies_are_refused_with_415(content_type: str | None, message: str) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        body_format(content_type)
    assert caught.value.status == 415
    if "UTF-8" not in message:
        assert "'application/json'" in str(caught.value) and "'text/csv'" in str(caught.value)


def test_request_errors_are_the_plugins_own_errors() -> None:
    """One hierarchy: a bad request body is a PseudonymiseError, whose status the API answers with."""
    with pytest.raises(PseudonymiseError) as caught:
        from_records([], max_rows=10)
    assert isinstance(caught.value, RequestError) and caught.value.status == 422
