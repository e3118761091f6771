"""PostgreSQL's COPY text format, a column at a time: parse fields, carry them through, build rows back.

A field is text with backslash escapes (``\\t``, ``\\n``, ``\\\\``, octal, hex) and ``\\N`` for
NULL; rows end with a newline and fields are separated by tabs, neither of which can occur
unescaped inside a field. So a block of rows splits into fields with two ``str`` operations and
joins back with two more, with no Python object per row. Columns that only pass through (kept,
not pseudonymised) stay in this form end to end as :class:`CopyText`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_UNESCAPE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
NULL = "\\N"
_TEXT_OR_NULL = {str, type(None)}


@dataclass(frozen=True)
class CopyBlock:
    """Whole rows of COPY text (every row ends with a newline), ``rows`` of them: read from a COPY
    source and written to a COPY target without being cut into fields in Python."""

    data: bytes = field(repr=False)
    rows: int


class CopyText(list[str]):
    """A column still in COPY text form (escaped, ``\\N`` for NULL): written back to PostgreSQL as it is."""

    __slots__ = ()


def _unescape_match(m: re.Match[str]) -> str:
    s = m.group(1)
    if s[0] == "x" and len(s) > 1:
        return chr(int(s[1:], 16))
    if s[0] in "01234567":
        return chr(int(s, 8))
    return _ESCAPES.get(s, s)


def unescape(field: str) -> str | None:
    """The value of one COPY text field (``None`` for ``\\N``)."""
    if "\\" not in field:
        return field
    if field == NULL:
        return None
    return _UNESCAPE.sub(_unescape_match, field)


def copy_text_fields(line: str) -> list[str | None]:
    """Fields of one line of PostgreSQL's COPY text format (``\\N`` is NULL)."""
    return [unescape(f) for f in line.split("\t")]


def decode_column(fields: Sequence[str]) -> list[str | None]:
    """The values of a column of COPY text fields; fields without a backslash are their own value."""
    if "\\" not in "".join(fields):
        return list(fields)
    return [unescape(f) if "\\" in f else f for f in fields]


def split_rows(text: str, width: int) -> list[str] | None:
    """All fields of complete rows ``text`` (no final newline), row after row; ``None`` if a row is not ``width`` wide."""
    fields = text.replace("\n", "\t").split("\t")
    return fields if len(fields) == (text.count("\n") + 1) * width else None


def _pg_text(value: Any) -> str:
    """A Python value in PostgreSQL's COPY text format."""
    if value is None:
        return NULL
    if isinstance(value, str):
        s = value
    elif isinstance(value, bool):
        return "t" if value else "f"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        return "\\\\x" + bytes(value).hex()
    elif isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    else:
        s = str(value)
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s


def encode_column(values: Sequence[Any]) -> Sequence[str]:
    """A column as COPY text fields: :class:`CopyText` as it is, text without specials as it is, the rest escaped."""
    if isinstance(values, CopyText):
        return values
    if set(map(type, values)) <= _TEXT_OR_NULL:
        present = "".join(filter(None, values))
        if not any(c in present for c in "\\\t\n\r"):
            return [NULL if v is None else v for v in values] if None in values else values
    return [_pg_text(v) for v in values]


def build_rows(columns: Sequence[Sequence[str]]) -> bytes:
    """UTF-8 COPY text of rows made of the given columns of fields (all of one length).

    Fields and separators are laid out in one list by slice assignment and joined once, which is
    about twice as fast as joining each row.
    """
    if not columns or not columns[0]:
        return b""
    rows, width = len(columns[0]), 2 * len(columns)
    if any(len(c) != rows for c in columns):
        raise ValueError("the columns of a COPY block must have one field per row")
    parts: list[str | None] = [None] * (rows * width)
    tabs = ["\t"] * rows
    for i, column in enumerate(columns):
        parts[2 * i :: width] = column
        parts[2 * i + 1 :: width] = tabs
    parts[width - 1 :: width] = ["\n"] * rows
    return "".join(parts).encode("utf-8")  # type: ignore[arg-type]
