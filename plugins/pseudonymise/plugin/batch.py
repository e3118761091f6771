"""A small batch of records in an HTTP request or response: JSON records or CSV, in memory.

:class:`RecordBatch` is the pipeline's :class:`~pseudonymise.core.pipeline.Source` and
:class:`MemorySink` its sink, so the API runs the very flows the operators and the CLI run.
A body is read only as what its ``Content-Type`` declares (:func:`body_format`); CSV answers have
formula cells neutralised (:func:`csv_cell`). Parse errors name the line, record or field, never a
value.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

from pseudonymise.core.errors import RequestError

#: The request bodies the API reads, by declared media type.
BODY_FORMATS = {"application/json": "json", "text/csv": "csv"}
#: A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"-[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


class RecordBatch:
    """Columns and one batch of values by column (the pipeline's Source protocol)."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.columns = list(columns)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        if self.rows:
            yield {name: [row[i] for row in self.rows] for i, name in enumerate(self.columns)}


class MemorySink:
    """Collects the output in memory; ``commit`` and ``abort`` have nothing to flush."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.rows: list[tuple[Any, ...]] = []

    def write(self, batch: dict[str, list[Any]]) -> None:
        self.rows.extend(zip(*(batch[c] for c in self.columns), strict=True))

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        self.rows.clear()


def _check_size(count: int, max_rows: int) -> None:
    if count > max_rows:
        raise RequestError(f"{count} records in one request; the limit is {max_rows} ([pseudonymise] api_max_rows): "
                         "split the batch, or schedule a DAG for bulk data", 413)


def _check_columns(columns: Sequence[str], what: str) -> None:
    if not columns:
        raise RequestError(f"{what} has no columns")
    if any(not isinstance(c, str) or not c for c in columns) or len(set(columns)) != len(columns):
        raise RequestError(f"{what} has empty or duplicate column names")


def from_records(records: Any, max_rows: int) -> RecordBatch:
    """JSON records (a list of objects with the same fields) as a batch."""
    if not isinstance(records, list) or not records:
        raise RequestError('"records" must be a non-empty list of JSON objects', 422)
    _check_size(len(records), max_rows)
    if not all(isinstance(r, dict) for r in records):
        first = next(i for i, r in enumerate(records) if not isinstance(r, dict))
        raise RequestError(f"record {first + 1} is not a JSON object", 422)
    columns = list(records[0])
    _check_columns(columns, "record 1")
    wanted = set(columns)
    rows = []
    for i, record in enumerate(records):
        if record.keys() != wanted:
            missing, extra = sorted(wanted - record.keys()), sorted(record.keys() - wanted)
            raise RequestError(
                f"record {i + 1} has other fields than record 1 (missing: {', '.join(missing) or '-'}; "
                f"extra: {', '.join(extra) or '-'}); every record needs the same fields", 422)
        rows.append([record[c] for c in columns])
    return RecordBatch(columns, rows)


def from_csv(body: bytes, max_rows: int) -> RecordBatch:
    """CSV with a header row (UTF-8, an empty field is NULL), as the CLI and file sources read it."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the CSV body is not valid UTF-8 (byte {exc.start}); send UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise RequestError("the CSV body is empty; it needs a header row and at least one record")
        _check_columns(header, "the CSV header")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise RequestError(f"CSV line {reader.line_num}: {len(row)} fields where the header has {len(header)}; "
                                 "quote fields that contain commas or newlines")
            _check_size(len(rows) + 1, max_rows)
            rows.append([v if v != "" else None for v in row])
    except csv.Error as exc:
        raise RequestError(f"CSV line {reader.line_num}: malformed CSV ({exc})") from exc
    if not rows:
        raise RequestError("the CSV body has a header but no records")
    return RecordBatch(header, rows)


def body_format(content_type: str | None) -> str:
    """``"json"`` or ``"csv"``: how to read a request body, from its declared ``Content-Type`` only.

    Anything else, or none, is refused (415) rather than guessed: a page on another site can send
    ``text/plain``, form or multipart bodies (or none) without asking the browser's permission, but
    not ``application/json`` or ``text/csv``. A ``charset`` other than UTF-8 is refused too.
    """
    media, _, parameters = (content_type or "").partition(";")
    media = media.strip().lower()
    found = BODY_FORMATS.get(media)
    if found is None:
        declared = (f"declared as {media!r}" if _MEDIA_TYPE.fullmatch(media) else
                    "declared as something else" if media else "not declared")
        raise RequestError(f"the request body's Content-Type is {declared}; send it as 'application/json' (a JSON "
                         "object) or 'text/csv' (CSV with a header row), with that Content-Type header", 415)
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise RequestError(f"the request body must be UTF-8; declare it as '{media}' or '{media}; charset=utf-8' "
                             "and send UTF-8", 415)
    return found


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(f"the request body is not valid JSON{where}") from exc


def json_value(value: Any) -> Any:
    """A value of an output record as JSON: originals may be dates, UUIDs or bytes (from a database)."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def to_records(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [{c: json_value(v) for c, v in zip(columns, row, strict=True)} for row in rows]


def csv_cell(value: Any) -> str:
    """A value as a cell of a CSV answer, which a spreadsheet must not run as a formula.

    Following OWASP's advice on CSV injection, a cell that starts with ``=``, ``+``, ``-``, ``@``, a
    tab or a carriage return gets a leading ``'``, whatever made the value: an original revealed by
    a reversal, a kept column, a column name, or a pseudonym (base64url pseudonyms start with ``-``
    one time in 64, and a project's prefix may start with any of these). One exception: a negative
    plain decimal number (``-12``, ``-0.5``, ``-1.5e3``) is left as it is, because a spreadsheet
    reads it as a number, never as a formula, and kept numeric columns stay numbers.

    A cell that already starts with ``'`` gets a second one, so the change is exact to undo: a
    program reading a CSV answer drops the first character of every cell that starts with ``'``
    followed by ``=``, ``+``, ``-``, ``@``, tab, carriage return or ``'``. Programs had better ask for
    JSON (``Content-Type: application/json``), whose values are never altered.
    """
    text = "" if value is None else str(json_value(value))
    if text.startswith("'") or (text.startswith(FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(text)):
        return "'" + text
    return text


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with a header row, formula cells neutralised (:func:`csv_cell`), lines ending in CRLF
    (RFC 4180), so that a value holding a carriage return or a newline is always quoted: a bare
    carriage return would otherwise start a new row whose first cell no ``'`` protects."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([csv_cell(c) for c in columns])
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return out.getvalue()


def policy_from_query(text: str | None) -> Mapping[str, Any]:
    """The column policy of a CSV request, given as JSON in the ``policy`` query parameter."""
    if not text:
        raise RequestError('a CSV request needs the column policy as JSON in the "policy" query parameter, '
                         'for example policy={"patient_id": "pseudonymise", "name": "drop"}', 422)
    try:
        policy = json.loads(text)
    except ValueError as exc:
        raise RequestError('the "policy" query parameter is not valid JSON', 422) from exc
    if not isinstance(policy, dict):
        raise RequestError('the "policy" query parameter must be a JSON object', 422)
    return policy
