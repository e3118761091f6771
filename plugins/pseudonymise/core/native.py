"""The only door to the C engine (``_native.c``): typed column plans in, the plugin's own errors out.

It takes COPY text blocks (:func:`copy_block`) and Arrow arrays (:func:`arrow_column`, read from their
buffers), and encodes and seals escrow for both.

The extension is optional: where it was not built, or with ``PSEUDONYMISE_PURE_PYTHON=1``,
:func:`available` is false and the callers use their pure-Python definitions, which give the same
pseudonyms and escrow bytes. No other module imports ``pseudonymise.core._native``; its calling
conventions (alphabet codes, a normaliser program, tuples per column) stay in this module, and
what it raises (``ValueError``, ``RuntimeError``) becomes a :class:`~pseudonymise.core.errors.PseudonymiseError`.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pyarrow as pa

from pseudonymise.core.copytext import _pg_text
from pseudonymise.core.errors import DataIOError, EscrowError, InvalidTextError, PolicyError, UnsupportedTypeError
from pseudonymise.core.formats import PseudonymFormat

if TYPE_CHECKING:
    from pseudonymise.core._native import Keyed

try:
    from pseudonymise.core import _native as _ext
except ImportError:  # pragma: no cover - built with the package wherever a C compiler and libcrypto are
    _ext = None  # type: ignore[assignment]
if os.environ.get("PSEUDONYMISE_PURE_PYTHON") == "1":
    _ext = None  # type: ignore[assignment]

#: The C engine's code for each alphabet (``ALPHA_*`` in _native.c).
ALPHABET_CODES = {"hex": 0, "base32": 1, "base64url": 2, "digits": 3}
_ACTION_CODES = {"keep": 0, "drop": 1, "pseudonymise": 2}
_ASCII_STEPS = {"strip": b"s", "lower": b"l", "casefold": b"l", "upper": b"u", "remove_whitespace": b"w"}


def available() -> bool:
    """Whether the C engine is in use (set ``PSEUDONYMISE_PURE_PYTHON=1`` to run without it)."""
    return _ext is not None


def _engine() -> ModuleType:
    if _ext is None:
        raise RuntimeError("the C engine is not available here; ask native.available() first")
    return _ext


def keyed(key: bytes, label: bytes) -> Keyed:
    """HMAC-SHA256(key, label + message) with the inner and outer states computed once, in C."""
    return _engine().Keyed(key, label)  # type: ignore[no-any-return]


def ascii_program(names: Sequence[str]) -> bytes:
    """A column's normalisers as the C engine's program for ASCII values (``ascii_normalise`` in _native.c):
    on ASCII text, casefold is lower and only ASCII characters can be removed. The names are the
    policy's, already checked (``remove:<characters>`` or one of the simple ones)."""
    program = b""
    for name in names:
        if name in _ASCII_STEPS:
            program += _ASCII_STEPS[name]
        else:
            chars = bytes(sorted({ord(c) for c in name[len("remove:"):] if ord(c) < 128}))
            program += b"r" + bytes([len(chars)]) + chars
    return program


@dataclass(frozen=True)
class ColumnPlan:
    """What the C engine does with one field of a COPY row.

    ``keep`` copies the field as it is, ``drop`` leaves it out. ``pseudonymise`` unescapes the value,
    runs ``program`` (ASCII values) or ``canonical`` (the others: UTF-8 in, canonical bytes out),
    HMACs it with ``keyed`` (``None``: 32 random bytes, the randomised treatment) and writes it in
    ``format``; ``collect`` keeps every value's canonical bytes (for escrow), and ``check`` counts the
    values not written in that format (secondary input).
    """

    action: Literal["keep", "drop", "pseudonymise"]
    format: PseudonymFormat | None = None
    keyed: Keyed | None = None
    collect: bool = False
    canonical: Callable[[bytes], bytes] | None = None
    program: bytes = b""
    check: PseudonymFormat | None = None

    def __post_init__(self) -> None:
        if self.action not in _ACTION_CODES or (self.action == "pseudonymise") != (self.format is not None):
            raise ValueError("a column plan is keep, drop, or pseudonymise with a format")

    @classmethod
    def pseudonymise(cls, fmt: PseudonymFormat, keyed: Keyed | None, *, collect: bool = False,
                     canonical: Callable[[bytes], bytes] | None = None, program: bytes = b"",
                     check: PseudonymFormat | None = None) -> ColumnPlan:
        return cls("pseudonymise", fmt, keyed, collect, canonical, program, check)

    def _entry(self, copy_text: bool = True) -> tuple[object, ...]:
        """The extension's tuple: (action, keyed, alphabet, length, prefix (COPY-escaped for COPY text, else as
        it is), collect, callback, program[, check])."""
        fmt = self.format
        if fmt is None:
            return (_ACTION_CODES[self.action], None, 0, 0, "", False, None, b"")
        check = None if self.check is None else (
            ALPHABET_CODES[self.check.alphabet], self.check.length, self.check.prefix.encode("utf-8"))
        return (_ACTION_CODES[self.action], self.keyed, ALPHABET_CODES[fmt.alphabet], fmt.length,
                _pg_text(fmt.prefix) if copy_text else fmt.prefix, self.collect, self.canonical, self.program, check)


KEEP = ColumnPlan("keep")
DROP = ColumnPlan("drop")


@dataclass(frozen=True)
class BlockPlan:
    """The :class:`ColumnPlan` of every field of a row, made once per set of source columns."""

    columns: tuple[ColumnPlan, ...]
    _entries: list[tuple[object, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.columns:
            raise ValueError("a block plan needs at least one column")
        object.__setattr__(self, "_entries", [c._entry() for c in self.columns])


class ColumnResult(NamedTuple):
    """One pseudonymised column of a block: its MACs (32 bytes each, non-NULL values in row order), how many
    NULLs, the canonical bytes one after the other and their end offsets (native-endian uint64; ``None``
    unless collected), and how many values failed the column's check."""

    macs: bytes
    nulls: int
    canonicals: bytes | None
    ends: bytes | None
    mismatched: int


class BlockResult(NamedTuple):
    """A block through the C engine: the output rows in COPY text, their count, and one
    :class:`ColumnResult` per pseudonymised column, in order."""

    data: bytes
    rows: int
    columns: list[ColumnResult]


def copy_block(data: bytes, plan: BlockPlan) -> BlockResult:
    """Rows of COPY text through the C engine, as ``plan`` says for each field.

    Text that is not UTF-8 becomes :class:`InvalidTextError`; rows the engine cannot read (a row
    with another number of fields, a block not ending with a whole row) :class:`DataIOError`.
    """
    try:
        out, rows, results = _engine().copy_block(data, plan._entries)
    except UnicodeError as exc:
        raise InvalidTextError(
            "a pseudonymised column holds text that is not valid UTF-8; fix the source encoding"
        ) from exc
    except ValueError as exc:
        raise DataIOError(f"the source's COPY text could not be read: {exc}") from exc
    return BlockResult(out, rows, [ColumnResult(*r) for r in results])


#: The Arrow types the C engine reads from their buffers: their code (``KIND_*`` in _native.c) and the type
#: tag canonical.py gives their values (``str``, ``bytes``, ``int``, ``date``, ``bool``).
_ARROW_KINDS: dict[pa.DataType, tuple[int, str]] = {
    pa.string(): (0, "str"), pa.large_string(): (1, "str"), pa.binary(): (2, "bytes"), pa.large_binary(): (3, "bytes"),
    pa.int8(): (4, "int"), pa.int16(): (5, "int"), pa.int32(): (6, "int"), pa.int64(): (7, "int"),
    pa.uint8(): (8, "int"), pa.uint16(): (9, "int"), pa.uint32(): (10, "int"), pa.uint64(): (11, "int"),
    pa.date32(): (12, "date"), pa.bool_(): (13, "bool"),
}


def arrow_type_tag(arrow_type: pa.DataType) -> str | None:
    """The type tag of an Arrow type's values when the C engine reads that type (``None``: it does not; the
    caller converts the array to Python values and uses the pure-Python engine)."""
    kind = _ARROW_KINDS.get(arrow_type)
    return kind[1] if kind is not None else None


def arrow_column(array: pa.Array, plan: ColumnPlan, column: str) -> tuple[pa.StringArray, ColumnResult]:
    """One Arrow array of a type :func:`arrow_type_tag` knows, pseudonymised by the C engine straight from its
    buffers (the array's ``offset`` respected, NULLs kept): a new string array, and the column's result.

    Values are made canonical as canonical.py does (text NFC through ``plan.canonical``, whose normalisers,
    like ``plan.program``, apply to text only; integers in decimal; dates in ISO 8601; booleans as
    ``true``/``false``; bytes as they are). Text that is not UTF-8 becomes :class:`InvalidTextError`, a date
    Python cannot hold :class:`UnsupportedTypeError`, both naming ``column`` and no value.
    """
    kind = _ARROW_KINDS.get(array.type)
    if kind is None or plan.format is None:
        raise ValueError(f"the C engine does not read Arrow {array.type} arrays, or the plan pseudonymises nothing")
    buffers = array.buffers()
    validity = buffers[0] if array.null_count else None
    offsets, data = (buffers[1], buffers[2]) if len(buffers) == 3 else (None, buffers[1])
    try:
        valid, ends, names, result = _engine().arrow_column(plan._entry(copy_text=False), kind[0], len(array),
                                                             array.offset, validity, offsets, data)
    except UnicodeError:
        error: PolicyError = InvalidTextError(
            f"column {column!r} holds text that is not valid UTF-8; fix the source encoding"
        )
    except ValueError as exc:
        error = UnsupportedTypeError(f"column {column!r}: {exc}; cast the column in the source")
    else:
        found = ColumnResult(*result)
        out = pa.Array.from_buffers(pa.string(), len(array),
                                    [None if valid is None else pa.py_buffer(valid), pa.py_buffer(ends),
                                     pa.py_buffer(names)], null_count=found.nulls)
        return out, found  # type: ignore[return-value]
    raise error


def value_function(plan: ColumnPlan, flush: Callable[[bytes], object], flush_every: int = 1 << 16) -> Callable[[object], str | None]:
    """One pseudonymised column as a C callable taking one value at a time, for SQLite's ``create_function``.

    It takes what Python's sqlite3 module hands a function (``None``, ``int``, ``str``, ``bytes``, ``float``) and
    gives the pseudonym as :func:`arrow_column` would (text through ``plan.program`` or ``plan.canonical``,
    integers in decimal, bytes as they are), ``None`` for ``None``. Every MAC goes, in blocks of ``flush_every``
    and at its ``flush()``, to ``flush`` (the run's collision check). A float is refused with a ``TypeError``
    naming only the type; the first exception raised inside is kept on the callable's ``error`` with the call
    number in ``error_row`` (sqlite3 replaces it with a generic error); counts in ``calls``, ``nulls``, ``values``.
    """
    fmt = plan.format
    if fmt is None or plan.collect or plan.check is not None:
        raise ValueError("a value function pseudonymises, with no escrow collected and no input check")
    return _engine().ValueFunction(plan.keyed, ALPHABET_CODES[fmt.alphabet], fmt.length,  # type: ignore[no-any-return]
                                   fmt.prefix.encode("utf-8"), plan.canonical, plan.program, flush, flush_every)


def sqlite_register(connection: object, name: str, function: Callable[[object], str | None], *,
                    deterministic: bool) -> bool:
    """Make a :func:`value_function` SQLite's own function ``name`` (one argument) on a Python ``sqlite3``
    connection, called by SQLite with no Python object per value (the GIL taken only for non-ASCII text, a block
    of MACs, an error). ``False`` when that cannot be done here (not CPython, or the sqlite3 module's SQLite is
    not the shared ``libsqlite3`` this process loaded, at the version the module reports, the very library the
    module's extension file resolves SQLite's functions to): register ``function``
    with ``connection.create_function`` instead, which gives the same values and errors, slower."""
    module_file = getattr(sys.modules.get("_sqlite3"), "__file__", None)
    if sys.implementation.name != "cpython" or not isinstance(connection, sqlite3.Connection) or not module_file:
        return False
    major, minor, patch = sqlite3.sqlite_version_info
    return bool(_engine().sqlite_register(connection, name, function, deterministic,
                                          major * 1_000_000 + minor * 1_000 + patch, module_file))


def sqlite_unregister(connection: object, name: str) -> None:
    """Remove a function :func:`sqlite_register` registered (it holds the column's key)."""
    _engine().sqlite_unregister(connection, name)


def recent_known(table: memoryview, used: memoryview, macs: bytes) -> bytes:
    """For each 32-byte MAC, 1 if the table of recent MACs (32 bytes per slot, ``used`` one byte per slot, a power
    of two of them; the slot is the MAC's first 8 bytes, native-endian, masked) holds it, else 0."""
    return _engine().recent_known(table, used, macs)  # type: ignore[no-any-return]


def recent_remember(table: memoryview, used: memoryview, macs: bytes) -> None:
    """Every MAC into its slot of the table of recent MACs, in order (:func:`recent_known` says where)."""
    _engine().recent_remember(table, used, macs)


def recent_unseen(table: memoryview, used: memoryview, macs: bytes) -> bytes:
    """For each MAC in order, 1 where the table of recent MACs did not hold it (it is then put in its slot), else 0:
    :func:`recent_known` and :func:`recent_remember` in one pass, but for a MAC repeated in ``macs``, held from its
    second place on."""
    return _engine().recent_unseen(table, used, macs)  # type: ignore[no-any-return]


def seen_known(table: memoryview, used: memoryview, macs: bytes) -> bytes:
    """For each 32-byte MAC, 1 if the open-addressing set (32 bytes per slot, ``used`` one byte per slot, a power of
    two of them; probing starts at the MAC's first 8 bytes, native-endian, masked) holds it, else 0."""
    return _engine().seen_known(table, used, macs)  # type: ignore[no-any-return]


def seen_add(table: memoryview, used: memoryview, macs: bytes, room: int) -> tuple[int, bytes]:
    """The MACs not in the set into it, in order, until ``room`` were added: ``(added, flags)``, flags per MAC 0 if
    the set held it before the call, 1 if it did not and does now (added, or a repeat of one added in this call), 2 if
    it did not and found no room (:func:`seen_known` says where they go)."""
    return _engine().seen_add(table, used, macs, room)  # type: ignore[no-any-return]


def collision_add(slots: memoryview, records: memoryview, count: int, incoming: memoryview,
                  randomised: bool, room: int) -> tuple[int, bytes, int]:
    """The collision check's incoming records (``collisions.RECORD``, 42 bytes each) against and into its table
    (``slots``: 16 bytes each, a power of two, at most half full with ``room`` more; ``records``: the ``count``
    records held, with room for ``room`` more): ``(count, pairs, done)``. ``pairs`` gives a held index and an incoming
    position (native-endian uint32 each) for every held record sharing an incoming record's key, bar a deterministic
    run's repeats of a held MAC, which are left out; every other incoming record is appended and indexed until
    ``room`` ran out: ``done`` says how many incoming records were dealt with."""
    return _engine().collision_add(slots, records, count, incoming, randomised, room)  # type: ignore[no-any-return]


def collision_place(slots: memoryview, records: memoryview, count: int) -> None:
    """Index the first ``count`` records into an empty table (:func:`collision_add` says how)."""
    _engine().collision_place(slots, records, count)


def encode(macs: bytes, fmt: PseudonymFormat) -> bytes:
    """The pseudonyms of ``macs`` (32 bytes each) in ``fmt``, one after the other, as UTF-8."""
    try:
        return _engine().encode(macs, ALPHABET_CODES[fmt.alphabet], fmt.length, fmt.prefix.encode("utf-8"))  # type: ignore[no-any-return]
    except ValueError as exc:
        raise PolicyError(f"the C engine cannot encode pseudonyms in {fmt.alphabet} of length {fmt.length}") from exc


def seal_rows(dek: bytes, *, ad_prefix: bytes, plain_prefix: bytes, pseudonyms: bytes, width: int, canonicals: bytes,
              ends: bytes, row_start: bytes, row_middle: bytes, row_end: bytes, ad_suffix: bytes = b"",
              row_hashes: bytearray | None = None, binary: bool = False) -> bytes:
    """Escrow rows in COPY text, value ``i`` sealed with AES-256-GCM under ``dek`` (nonce ``i``, 96-bit big-endian;
    plaintext ``plain_prefix + canonical``; associated data ``ad_prefix + pseudonym + ad_suffix``) and written as
    ``row_start pseudonym row_middle \\\\x<nonce> TAB \\\\x<ciphertext and tag> row_end``; with ``binary``, in COPY's
    binary format: ``row_start pseudonym row_middle <nonce> <length of the ciphertext, 4 bytes big-endian>
    <ciphertext and tag> row_end`` (the caller frames the other fields; ``row_hashes`` is then required).

    ``pseudonyms`` holds n pseudonyms of ``width`` bytes (needing no COPY escaping), ``canonicals`` their values
    one after the other, ``ends`` the n + 1 offsets (native-endian uint64). ``row_hashes`` (32 bytes per value),
    when given, receives each row's hash in the batch digest (:func:`escrow.batch_digest`'s ``h_i``). Anything
    else, or OpenSSL failing, is an :class:`EscrowError`.
    """
    extra: tuple[Any, ...] = () if row_hashes is None else (row_hashes,)
    if binary:
        if row_hashes is None:
            raise EscrowError("binary escrow rows are sealed with their row hashes")
        extra += (True,)
    try:
        return _engine().seal_rows(dek, ad_prefix, plain_prefix, pseudonyms, width, canonicals, ends,  # type: ignore[no-any-return]
                                   row_start, row_middle, row_end, ad_suffix, *extra)
    except (ValueError, RuntimeError) as exc:
        raise EscrowError(f"the C engine could not seal escrow rows: {exc}") from exc


__all__ = ["ALPHABET_CODES", "DROP", "KEEP", "BlockPlan", "BlockResult", "ColumnPlan", "ColumnResult", "arrow_column",
           "arrow_type_tag", "ascii_program", "available", "collision_add", "collision_place", "copy_block", "encode",
           "keyed", "recent_known", "recent_remember", "recent_unseen", "seal_rows", "seen_add", "seen_known",
           "sqlite_register", "sqlite_unregister",
           "value_function"]
