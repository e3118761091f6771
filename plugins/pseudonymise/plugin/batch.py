"""A small batch of records in an HTTP request or response: JSON records or CSV, in memory.

:class:`RecordBatch` is the pipeline's :class:`~pseudonymise.core.pipeline.Source` and
:class:`MemorySink` its sink, so the API runs the very flows the operators and the CLI run.
Parse errors name the line, record or field, never a value.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID


class BatchError(ValueError):
    """The request's records cannot be read; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
        raise BatchError(f"{count} records in one request; the limit is {max_rows} ([pseudonymise] api_max_rows): "
                         "split the batch, or schedule a DAG for bulk data", 413)


def _check_columns(columns: Sequence[str], what: str) -> None:
    if not columns:
        raise BatchError(f"{what} has no columns")
    if any(not isinstance(c, str) or not c for c in columns) or len(set(columns)) != len(columns):
        raise BatchError(f"{what} has empty or duplicate column names")


def from_records(records: Any, max_rows: int) -> RecordBatch:
    """JSON records (a list of objects with the same fields) as a batch."""
    if not isinstance(records, list) or not records:
        raise BatchError('"records" must be a non-empty list of JSON objects', 422)
    _check_size(len(records), max_rows)
    if not all(isinstance(r, dict) for r in records):
        first = next(i for i, r in enumerate(records) if not isinstance(r, dict))
        raise BatchError(f"record {first + 1} is not a JSON object", 422)
    columns = list(records[0])
    _check_columns(columns, "record 1")
    wanted = set(columns)
    rows = []
    for i, record in enumerate(records):
        if record.keys() != wanted:
            missing, extra = sorted(wanted - record.keys()), sorted(record.keys() - wanted)
            raise BatchError(
                f"record {i + 1} has other fields than record 1 (missing: {', '.join(missing) or '-'}; "
                f"extra: {', '.join(extra) or '-'}); every record needs the same fields", 422)
        rows.append([record[c] for c in columns])
    return RecordBatch(columns, rows)


def from_csv(body: bytes, max_rows: int) -> RecordBatch:
    """CSV with a header row (UTF-8, an empty field is NULL), as the CLI and file sources read it."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchError(f"the CSV body is not valid UTF-8 (byte {exc.start}); send UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise BatchError("the CSV body is empty; it needs a header row and at least one record")
        _check_columns(header, "the CSV header")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise BatchError(f"CSV line {reader.line_num}: {len(row)} fields where the header has {len(header)}; "
                                 "quote fields that contain commas or newlines")
            _check_size(len(rows) + 1, max_rows)
            rows.append([v if v != "" else None for v in row])
    except csv.Error as exc:
        raise BatchError(f"CSV line {reader.line_num}: malformed CSV ({exc})") from exc
    if not rows:
        raise BatchError("the CSV body has a header but no records")
    return RecordBatch(header, rows)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BatchError(f"the request body is not valid JSON{where}") from exc


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


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else str(json_value(v)) for v in row])
    return out.getvalue()


def policy_from_query(text: str | None) -> Mapping[str, Any]:
    """The column policy of a CSV request, given as JSON in the ``policy`` query parameter."""
    if not text:
        raise BatchError('a CSV request needs the column policy as JSON in the "policy" query parameter, '
                         'for example policy={"patient_id": "pseudonymise", "name": "drop"}', 422)
    try:
        policy = json.loads(text)
    except ValueError as exc:
        raise BatchError('the "policy" query parameter is not valid JSON', 422) from exc
    if not isinstance(policy, dict):
        raise BatchError('the "policy" query parameter must be a JSON object', 422)
    return policy
