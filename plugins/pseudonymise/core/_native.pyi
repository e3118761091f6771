"""Types of the C engine (``_native.c``); only ``native.py`` imports it."""

from collections.abc import Callable, Sequence

from typing_extensions import Buffer

HEX: int
BASE32: int
BASE64URL: int
DIGITS: int

class Keyed:
    """HMAC-SHA256(key, label + message) with the inner and outer states computed once (RFC 2104)."""

    def __init__(self, key: Buffer, label: Buffer) -> None: ...
    def mac(self, message: Buffer) -> bytes: ...
    def mac_many(self, messages: Sequence[bytes]) -> bytes: ...

#: (alphabet code, length, prefix as UTF-8): count the values not written in that format.
_Check = tuple[int, int, bytes]
#: (action 0 keep | 1 drop | 2 pseudonymise, keyed or None, alphabet code, length, COPY-escaped prefix, collect,
#: canonical callback or None, ASCII normaliser program[, check or None])
_Column = (
    tuple[int, Keyed | None, int, int, str, bool, Callable[[bytes], bytes] | None, bytes]
    | tuple[int, Keyed | None, int, int, str, bool, Callable[[bytes], bytes] | None, bytes, _Check | None]
)
#: (macs, nulls, canonicals or None, ends or None, mismatched), per pseudonymised column
_ColumnResult = tuple[bytes, int, bytes | None, bytes | None, int]

def copy_block(data: Buffer, columns: Sequence[_Column], /) -> tuple[bytes, int, list[_ColumnResult]]: ...
def encode(macs: Buffer, alphabet: int, length: int, prefix: Buffer = ..., /) -> bytes: ...
def seal_rows(
    dek: Buffer,
    ad_prefix: Buffer,
    plain_prefix: Buffer,
    pseudonyms: Buffer,
    width: int,
    canonicals: Buffer,
    ends: Buffer,
    row_start: Buffer,
    row_middle: Buffer,
    row_end: Buffer,
    ad_suffix: Buffer = ...,
    row_hashes: Buffer = ...,
    binary: bool = ...,
    /,
) -> bytes: ...
def arrow_column(
    column: _Column,
    kind: int,
    length: int,
    offset: int,
    validity: Buffer | None,
    offsets: Buffer | None,
    data: Buffer | None,
    /,
) -> tuple[bytes | None, bytes, bytes, _ColumnResult]: ...
def recent_known(table: Buffer, used: Buffer, macs: Buffer, /) -> bytes: ...
def recent_remember(table: Buffer, used: Buffer, macs: Buffer, /) -> None: ...
def collision_add(slots: Buffer, records: Buffer, count: int, incoming: Buffer, randomised: bool, room: int,
                  /) -> tuple[int, bytes, int]: ...
def collision_place(slots: Buffer, records: Buffer, count: int, /) -> None: ...
def recent_unseen(table: Buffer, used: Buffer, macs: Buffer, /) -> bytes: ...

class ValueFunction:
    """One pseudonymised column as a callable taking one value (for SQLite's create_function)."""

    calls: int
    nulls: int
    values: int
    error: BaseException | None
    error_row: int

    def __init__(self, keyed: Keyed | None, alphabet: int, length: int, prefix: bytes,
                 callback: Callable[[bytes], bytes] | None, program: bytes, flush: Callable[[bytes], object],
                 flush_every: int) -> None: ...
    def __call__(self, value: object, /) -> str | None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...

def sqlite_register(connection: object, name: str, function: ValueFunction, deterministic: bool,
                    expected_version: int, module_file: str, /) -> bool: ...
def sqlite_unregister(connection: object, name: str, /) -> None: ...
def seen_known(table: Buffer, used: Buffer, macs: Buffer, /) -> bytes: ...
def seen_add(table: Buffer, used: Buffer, macs: Buffer, room: int, /) -> tuple[int, bytes]: ...
