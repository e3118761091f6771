"""Canonical bytes of a value, and the value back from them (docs/design.md §4 step 2).

The canonical form fixes what "the same identifier" means everywhere: a string and the integer
it spells give the same bytes, NFC and NFD spellings of a name give the same bytes, floats are
refused because their text form is not stable. The per-column normalisers that run before
(step 1) belong to the column policy (``policy.py``).
"""

from __future__ import annotations

import datetime as dt
import numbers
import unicodedata
import uuid
from collections.abc import Sequence
from typing import Any

from pseudonymise.core.errors import InvalidTextError, PolicyError, UnsupportedTypeError

#: Type tags stored inside sealed escrow so a reversal gives back the original type.
TYPE_TAGS = ("str", "int", "bool", "date", "datetime", "uuid", "bytes")


def canonical(value: Any, column: str) -> tuple[str, bytes]:
    """Return (type tag, canonical bytes) of a non-NULL value, or raise naming the column."""
    if isinstance(value, str):
        try:
            return "str", unicodedata.normalize("NFC", value).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidTextError(
                f"column {column!r} holds text that is not valid Unicode (undecodable bytes or lone surrogates); "
                "fix the source encoding or read the file with the right encoding"
            ) from exc
    # numpy's boolean is ``numpy.bool_`` before numpy 2 and ``numpy.bool`` since
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return "bool", b"true" if value else b"false"
    if isinstance(value, numbers.Integral):
        return "int", str(int(value)).encode("ascii")
    if isinstance(value, dt.datetime):
        return "datetime", value.isoformat().encode("ascii")
    if isinstance(value, dt.date):
        return "date", value.isoformat().encode("ascii")
    if isinstance(value, uuid.UUID):
        return "uuid", str(value).encode("ascii")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes", bytes(value)
    kind = "floating-point" if isinstance(value, numbers.Real) else type(value).__name__
    raise UnsupportedTypeError(
        f"column {column!r} holds {kind} values, which cannot be pseudonymised reliably; "
        "cast the column to text or integer in the source query (floats have no stable text form)"
    )


def canonical_many(values: Sequence[Any], column: str) -> tuple[list[str], list[bytes]]:
    """:func:`canonical` of many non-NULL values: (type tags, canonical bytes), a whole column at once.

    A column of plain ``str`` takes a short road: ASCII text is its own NFC form, so it is only
    encoded; other text is normalised value by value. Anything else goes through :func:`canonical`.
    """
    if set(map(type, values)) == {str}:
        try:
            if "".join(values).isascii():
                return ["str"] * len(values), list(map(str.encode, values))
            return ["str"] * len(values), [v.encode() if v.isascii() else unicodedata.normalize("NFC", v).encode()
                                           for v in values]
        except UnicodeEncodeError as exc:
            raise InvalidTextError(
                f"column {column!r} holds text that is not valid Unicode (undecodable bytes or lone surrogates); "
                "fix the source encoding or read the file with the right encoding"
            ) from exc
    pairs = [canonical(v, column) for v in values]
    return [tag for tag, _ in pairs], [data for _, data in pairs]


def from_canonical(tag: str, data: bytes) -> Any:
    """Inverse of :func:`canonical` for the reverse path."""
    text = data.decode("utf-8") if tag != "bytes" else ""
    if tag == "str":
        return text
    if tag == "int":
        return int(text)
    if tag == "bool":
        return text == "true"
    if tag == "date":
        return dt.date.fromisoformat(text)
    if tag == "datetime":
        return dt.datetime.fromisoformat(text)
    if tag == "uuid":
        return uuid.UUID(text)
    if tag == "bytes":
        return data
    raise PolicyError(f"escrow holds an unknown value type {tag!r}; upgrade the plugin")
