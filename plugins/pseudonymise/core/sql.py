"""SQL sources and table targets: streamed reads, one-transaction writes, PostgreSQL COPY both ways.

Sources yield batches of columns with flat memory: a streamed cursor on any SQLAlchemy database
(``fetchmany`` on the DB-API cursor itself where SQLAlchemy would not change a value, as on SQLite;
as Python columns or ``pyarrow`` record batches), or ``COPY (query) TO STDOUT`` on PostgreSQL, read
through a pipe from a reader thread and cut into columns block by block in the text format
(:mod:`pseudonymise.core.copytext`). Targets write inside the caller's transaction with ``INSERT``
(generic; the DB-API cursor's ``executemany`` on SQLite) or ``COPY FROM STDIN`` (PostgreSQL), after
the write mode's preparation (delete the run's partition, or the whole table)
in that same transaction, so a failed or killed task leaves the target as it was. Columns that
go from a COPY source to a COPY target unchanged stay in COPY text all the way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import fcntl
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pseudonymise.core.copytext import CopyBlock, CopyText, build_rows, decode_column, encode_column, split_rows
from pseudonymise.core.copytext import _pg_text as _pg_text
from pseudonymise.core.copytext import copy_text_fields as copy_text_fields
from pseudonymise.core.db import advisory_lock
from pseudonymise.core.errors import (
    SOURCE_DATA_FIX,
    TARGET_DATA_FIX,
    DatabaseIOError,
    DataIOError,
    PolicyError,
    UnsupportedTypeError,
    database_error,
    database_errors,
    is_database_error,
    raise_alone,
)
from pseudonymise.core.locks import lock_interval, unlock_interval

WRITE_MODES = ("append", "replace_partition", "upsert", "replace")

# PostgreSQL type OIDs whose COPY text form equals the canonical text of the value psycopg2 returns.
_PG_TEXT_SAFE = {25: "text", 1043: "varchar", 1042: "bpchar", 19: "name", 20: "int8", 21: "int2", 23: "int4",
                 2950: "uuid", 1082: "date"}
_PG_REFUSED = {700: "real", 701: "double precision", 1700: "numeric", 790: "money"}


# --- sources ----------------------------------------------------------------------------------
def table_query(table: str, schema: str | None, dialect: sa.Dialect) -> str:
    prep = dialect.identifier_preparer
    return f"SELECT * FROM {prep.quote(schema) + '.' if schema else ''}{prep.quote(table)}"


class SqlSource:
    """Rows of a query (``:name`` bind parameters) from any SQLAlchemy database, in batches."""

    def __init__(self, engine: Engine, query: str, parameters: Mapping[str, Any] | None = None,
                 batch_size: int = 50_000, label: str | None = None) -> None:
        self.engine = engine
        self.query = query
        self.parameters = dict(parameters or {})
        self.batch_size = batch_size
        self.label = label or "query"
        self._released = False
        self._open()
        self.columns: list[str] = list(self._result.keys())
        self.type_codes = _type_codes(self._result) if engine.dialect.name == "postgresql" else {}

    def _open(self) -> None:
        with database_errors(f"the source {self.label} could not be read", data_fix=SOURCE_DATA_FIX):
            try:
                self._conn = self.engine.connect()
                self._result = self._conn.execution_options(stream_results=True, yield_per=self.batch_size).execute(
                    sa.text(self.query), self.parameters)
            except BaseException:
                self.close()
                raise

    def release(self) -> None:
        """Close the read until batches are asked for, then run the query again: an open read of a SQLite file
        holds its lock, which a writer of that file (the audit's ``started`` row, a target in it) would wait for."""
        self.close()
        self._released = True

    def check_types(self, columns: Sequence[str]) -> None:
        """Refuse floating-point and numeric columns before anything is written (PostgreSQL knows their type)."""
        for name in columns:
            refused = _PG_REFUSED.get(self.type_codes.get(name, 0))
            if refused:
                raise UnsupportedTypeError(
                    f"column {name!r} is of type {refused}, which cannot be pseudonymised reliably; "
                    "cast it to text or bigint in the source query"
                )

    @property
    def reads_the_cursor(self) -> bool:
        """Whether batches come straight from the DB-API cursor (``fetchmany``), with no SQLAlchemy row per row.

        That is where SQLAlchemy itself would hand the driver's values on as they are: no server-side cursor
        (which it reads ahead of the caller) and no result processor on any column (a dialect may add one by
        the driver's type code), as on SQLite. Elsewhere (PostgreSQL's named cursors, say), and whenever
        SQLAlchemy's result does not say, rows come through SQLAlchemy's result.
        """
        processors = getattr(getattr(self._result, "_metadata", None), "_processors", None)
        return (not self.engine.dialect.supports_server_side_cursors and processors is not None
                and all(p is None for p in processors))

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        for columns in self._columns():
            yield {name: list(values) for name, values in columns.items()}

    def _columns(self) -> Iterator[dict[str, tuple[Any, ...]]]:
        """Each batch's rows turned into columns (tuples); the connection is closed after the last one."""
        if self._released:
            self._released = False
            self._open()
        try:
            with database_errors(f"reading the source {self.label} failed", data_fix=SOURCE_DATA_FIX):
                fetch = self._result.cursor.fetchmany if self.reads_the_cursor else self._result.fetchmany
                while rows := fetch(self.batch_size):
                    yield dict(zip(self.columns, zip(*rows, strict=True), strict=True))
        finally:
            self.close()

    def record_batches(self) -> Iterator[pa.RecordBatch | dict[str, list[Any]]]:
        """The batches of :meth:`batches` as ``pyarrow.RecordBatch``es, for the C engine's Arrow path: built
        column-wise from the fetched rows, one Arrow array per column. A batch with a column Arrow would not
        give back exactly (see :func:`record_batch`) stays columns of Python values."""
        for columns in self._columns():
            batch = record_batch(columns)
            yield {name: list(values) for name, values in columns.items()} if batch is None else batch

    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            result = getattr(self, "_result", None)
            if result is not None:  # its DB-API cursor, mid-read, would keep a SQLite file's read lock in the pool
                result.close()
            conn.close()
            self._conn = None  # type: ignore[assignment]


#: The Python types whose values an Arrow array holds and gives back (``to_pylist``) exactly, and that array's type.
_ARROW_EXACT: dict[type, pa.DataType] = {str: pa.string(), int: pa.int64(), float: pa.float64(), bytes: pa.binary(),
                                         bool: pa.bool_(), dt.date: pa.date32()}
_ARROW_INFERRED_EXACT = {pa.string(), pa.int64(), pa.bool_(), pa.null()}


def record_batch(columns: Mapping[str, Sequence[Any]]) -> pa.RecordBatch | None:
    """Columns of Python values as a ``pyarrow.RecordBatch``, or ``None`` when one of them would not come back
    from Arrow exactly as it went in: values of several types in one column (SQLite's dynamic typing allows it),
    of a type outside :data:`_ARROW_EXACT` (timestamps with their offsets, decimals with their exponents, UUIDs),
    integers beyond 64 bits, text that is not valid Unicode. Then the batch stays columns of Python values,
    which the pure-Python engine takes with the same results."""
    arrays = []
    for values in columns.values():
        try:
            array = pa.array(values)
        except (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError):
            return None
        # Arrow infers these types only from values all of that one Python type (None aside); any other it may
        # infer from a mix (an integer among floats, text among bytes, a date among timestamps): check the values
        if array.type not in _ARROW_INFERRED_EXACT:
            kinds = set(map(type, values))
            kinds.discard(type(None))
            if len(kinds) != 1 or _ARROW_EXACT.get(kinds.pop()) != array.type:
                return None
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, names=list(columns))


def _read_failure(exc: BaseException, label: str) -> DataIOError:
    """The error of a failed ``COPY … TO STDOUT``: a database error without the driver's text (it quotes
    values), anything else by its class (and the operating system's reason)."""
    what = f"reading the source {label} failed"
    if is_database_error(exc):
        return database_error(exc, what, data_fix=SOURCE_DATA_FIX)
    reason = f"{type(exc).__name__}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return DataIOError(f"{what} ({reason}); check the connection and the query, then run the task again")


def _type_codes(result: sa.CursorResult[Any]) -> dict[str, int]:
    description = getattr(result.cursor, "description", None) or ()
    return {d[0]: int(d[1]) for d in description if d[1] is not None}


_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031  # Linux: grow the pipe so the reader thread runs ahead by up to this much


class PostgresCopySource:
    """A PostgreSQL query streamed with ``COPY (query) TO STDOUT`` in the text format.

    Values come out as text exactly as PostgreSQL prints them, which a COPY into a PostgreSQL
    target reads back losslessly. Pseudonymised columns must be of a type whose text is its
    canonical form (text, varchar, char, integers, uuid, date); :meth:`usable` says whether it is.
    """

    def __init__(self, engine: Engine, query: str, parameters: Mapping[str, Any] | None = None,
                 batch_size: int = 50_000, label: str | None = None) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.label = label or "query"
        self._as_text: set[str] = set()
        # (SQLAlchemy's compile errors quote the parameters, which can be key values of the data)
        with database_errors(f"the source {self.label} could not be read", data_fix=SOURCE_DATA_FIX):
            stmt = sa.text(query).bindparams(**dict(parameters or {})) if parameters else sa.text(query)
            self.sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
            with engine.connect() as conn:
                probe = conn.execute(sa.text(f"SELECT * FROM ({self.sql}) AS q LIMIT 0"))
                self.columns: list[str] = list(probe.keys())
                self.type_codes = _type_codes(probe)
                oids = sorted(set(self.type_codes.values()))
                names = dict(conn.execute(sa.text("SELECT oid::int, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(:o)"),
                                          {"o": oids}).all()) if oids else {}
                self.type_names = {c: names.get(o, "text") for c, o in self.type_codes.items()}

    def usable(self, pseudonymised: Sequence[str]) -> bool:
        return all(self.type_codes.get(c) in _PG_TEXT_SAFE for c in pseudonymised if c in self.type_codes)

    check_types = SqlSource.check_types

    def carry_as_text(self, columns: Sequence[str]) -> None:
        """Yield ``columns`` as :class:`CopyText` (still escaped), for a COPY target that writes them as they are."""
        self._as_text = {c for c in columns if c in self.columns}

    def _chunks(self) -> Iterator[bytes]:
        """The COPY text as it arrives, cut after the last complete row of each read (so every chunk
        is whole rows, each ending with a newline)."""
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):  # not Linux, or above the system's limit: the default size works too
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        raw = self.engine.raw_connection()
        failure: list[BaseException] = []

        def pump() -> None:
            try:
                with os.fdopen(write_fd, "wb", buffering=1 << 16) as out, raw.cursor() as cur:
                    cur.execute("SET DateStyle TO ISO; SET client_encoding TO 'UTF8'")
                    cur.copy_expert(f"COPY ({self.sql}) TO STDOUT", out)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=pump, name="pseudonymise-copy-out", daemon=True)
        thread.start()
        tail = b""
        finished = False
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as reader:
                while chunk := reader.read(_PIPE_BYTES):
                    data = tail + chunk if tail else chunk
                    cut = data.rfind(b"\n")
                    if cut < 0:
                        tail = data
                        continue
                    tail = data[cut + 1 :]
                    yield data[: cut + 1] if tail else data
                thread.join()
                if failure:
                    raise_alone(_read_failure(failure.pop(), self.label))
                if tail:
                    raise DataIOError(f"reading the source {self.label} failed: the COPY data ended mid-row")
                finished = True
        finally:
            if not finished and thread.is_alive():
                raw.dbapi_connection.cancel()  # type: ignore[union-attr]  # the server stops the COPY
                thread.join()
            if finished:
                raw.close()
            else:
                raw.invalidate()  # it may be mid-COPY: never hand it back to the pool

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        """Batches of exactly ``batch_size`` rows (the last one shorter)."""
        width, per_batch = len(self.columns), self.batch_size * len(self.columns)
        pending: list[str] = []
        with contextlib.closing(self._chunks()) as chunks:
            for data in chunks:
                fields = split_rows(data[:-1].decode("utf-8"), width)
                if fields is None:
                    raise DataIOError(f"reading the source {self.label} failed: a COPY row does not have "
                                      f"{width} fields")
                pending += fields
                while len(pending) >= per_batch:
                    yield self._batch(pending[:per_batch])
                    del pending[:per_batch]
        if pending:
            yield self._batch(pending)

    def copy_blocks(self) -> Iterator[CopyBlock]:
        """The COPY text itself in blocks of whole rows, for an engine that works on COPY text directly: about
        ``batch_size`` rows each (at least ``batch_size``, but for the last), after a ramp of smaller ones (an
        eighth of it, a quarter, a half), so that the writer, which waits for the first pseudonymised block,
        starts early; memory stays bounded by ``batch_size``."""
        pending: list[bytes] = []
        rows = 0
        want = max(1, self.batch_size // 8)
        with contextlib.closing(self._chunks()) as chunks:
            for data in chunks:
                pending.append(data)
                rows += data.count(b"\n")
                if rows >= want:
                    yield CopyBlock(b"".join(pending), rows)
                    pending.clear()
                    rows = 0
                    want = min(self.batch_size, want * 2)
        if pending:
            yield CopyBlock(b"".join(pending), rows)

    def _batch(self, fields: list[str]) -> dict[str, list[Any]]:
        width = len(self.columns)
        return {name: CopyText(fields[i::width]) if name in self._as_text else decode_column(fields[i::width])
                for i, name in enumerate(self.columns)}


# --- targets ----------------------------------------------------------------------------------
def reflect_table(conn: Connection, table: str, schema: str | None) -> sa.Table | None:
    try:
        return sa.Table(table, sa.MetaData(), autoload_with=conn, schema=schema)
    except sa.exc.NoSuchTableError:
        return None


def reflect_columns(conn: Connection, table: str, schema: str | None) -> sa.Table:
    """The table from its columns alone (name, type, nullable, as the catalogue gives them): for a table just
    created with no key, index or constraint, what :func:`reflect_table` gives, in one catalogue query instead
    of the full reflection's seven (keys, indexes, constraints, comments)."""
    columns = sa.inspect(conn).get_columns(table, schema=schema)
    return sa.Table(table, sa.MetaData(), *[sa.Column(c["name"], c["type"], nullable=c["nullable"]) for c in columns],
                    schema=schema)


def python_type(values: Sequence[Any]) -> sa.types.TypeEngine[Any]:
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            return sa.Boolean()
        if isinstance(v, int):
            return sa.BigInteger()
        if isinstance(v, dt.datetime):
            return sa.DateTime(timezone=v.tzinfo is not None)
        if isinstance(v, dt.date):
            return sa.Date()
        if isinstance(v, decimal.Decimal):
            return sa.Numeric()
        if isinstance(v, float):
            return sa.Float()
        if isinstance(v, (bytes, bytearray, memoryview)):
            return sa.LargeBinary()
        if isinstance(v, uuid.UUID):
            return sa.Uuid()
        return sa.Text()
    return sa.Text()


def coerce_bound(value: Any, coltype: sa.types.TypeEngine[Any], column: str) -> Any:
    """Bind a templated partition bound (text) as the column's own type."""
    if not isinstance(value, str):
        return value
    try:
        if isinstance(coltype, sa.DateTime):
            return dt.datetime.fromisoformat(value)
        if isinstance(coltype, sa.Date):
            return dt.date.fromisoformat(value[:10])
        if isinstance(coltype, sa.Integer):
            return int(value)
    except ValueError:  # its text quotes the bound, which can be a key value (mapped key ranges)
        pass
    else:
        return value
    raise_alone(PolicyError(f"a partition bound does not convert to the type of column {column!r} ({coltype}); give "
                            "partition_start and partition_end of that type (ISO dates for dates, integers for "
                            "integers)"))


class TableTarget:
    """A target table and how a run writes it.

    :param mode: ``append``; ``replace_partition`` (delete rows whose ``partition_column`` lies in
        ``[partition_start, partition_end)``, then insert, in one transaction); ``upsert`` on
        ``upsert_key``; or ``replace`` (delete every row, then insert, in one transaction).
    :param create: create the table when it does not exist (types from the source).
    """

    def __init__(self, table: str, schema: str | None = None, mode: str = "append",
                 partition_column: str | None = None, partition_start: Any = None, partition_end: Any = None,
                 upsert_key: Sequence[str] | None = None, create: bool = True) -> None:
        if mode not in WRITE_MODES:
            raise PolicyError(f"write mode {mode!r} is unknown; use one of {', '.join(WRITE_MODES)}")
        if mode == "replace_partition" and (not partition_column or partition_start is None):
            raise PolicyError("write mode 'replace_partition' needs partition_column and partition_start "
                              "(and partition_end, unless the partition is open-ended)")
        if mode == "upsert" and not upsert_key:
            raise PolicyError("write mode 'upsert' needs upsert_key (the columns of a unique key of the target)")
        self.table, self.schema, self.mode = table, schema, mode
        self.partition_column, self.partition_start, self.partition_end = partition_column, partition_start, partition_end
        self.upsert_key = list(upsert_key or [])
        self.create = create

    @property
    def label(self) -> str:
        return f"table:{self.schema + '.' if self.schema else ''}{self.table}"

    def sink(self, conn: Connection, columns: Sequence[str], *, use_copy: bool | None = None,
             pseudonymised: Sequence[str] = (), type_names: Mapping[str, str] | None = None) -> TableSink:
        copy = conn.dialect.name == "postgresql" if use_copy is None else use_copy
        return TableSink(self, conn, list(columns), copy=copy, pseudonymised=pseudonymised, type_names=type_names)

    def create_if_missing(self, conn: Connection, columns: Sequence[str], *, pseudonymised: Sequence[str] = (),
                          type_names: Mapping[str, str] | None = None,
                          sample: Mapping[str, Sequence[Any]] | None = None) -> bool:
        """Create the table, as a run's first write would, without writing or deleting anything; whether it was
        created (``False``: it exists, with ``columns``). Types as a run's: pseudonymised columns ``text``, the
        others the source's declared ``type_names`` (PostgreSQL), else those of the ``sample`` rows' values."""
        sink = TableSink(self, conn, list(columns), copy=False, pseudonymised=pseudonymised, type_names=type_names,
                         prepare=False)
        if sink.table is not None:
            return False
        sink._create(sample or {})
        return True


class TableSink:
    """Writes batches into a :class:`TableTarget` on ``conn``, inside the caller's transaction."""

    def __init__(self, target: TableTarget, conn: Connection, columns: list[str], *, copy: bool,
                 pseudonymised: Sequence[str] = (), type_names: Mapping[str, str] | None = None,
                 prepare: bool = True) -> None:
        self.target, self.conn, self.columns = target, conn, columns
        self.copy = copy and conn.dialect.name == "postgresql"
        self.pseudonymised = set(pseudonymised)
        self.type_names = dict(type_names or {})
        self.rows_written = 0
        self._prepared = False
        self._staging: str | None = None
        self._lock: str | None = None
        with self._errors(f"inspecting the target {target.label} failed"):
            self.table = reflect_table(conn, target.table, target.schema)
        if self.table is not None:
            self._check_columns(self.table)
            if prepare:
                self._prepare()

    def _errors(self, what: str) -> database_errors:
        """Database errors of the target as the plugin's, naming only this sink's columns (never a value)."""
        return database_errors(what, columns=self.columns, data_fix=TARGET_DATA_FIX)

    def _check_columns(self, table: sa.Table) -> None:
        missing = [c for c in self.columns if c not in table.c]
        if missing:
            raise PolicyError(
                f"column(s) {', '.join(map(repr, missing))} are not in the target {self.target.label}; "
                "add them to the table or drop them in the column policy"
            )
        for name in (self.target.partition_column, *self.target.upsert_key):
            if name and name not in table.c:
                raise PolicyError(f"column {name!r} is not in the target {self.target.label}")

    def _create(self, batch: Mapping[str, Sequence[Any]]) -> None:
        with self._errors(f"creating the target {self.target.label} failed"):
            self._create_table(batch)

    def _create_table(self, batch: Mapping[str, Sequence[Any]]) -> None:
        if not self.target.create:
            raise DataIOError(f"the target {self.target.label} does not exist; create it or set create=True")
        # Tasks starting together on a fresh target: the first creates it, the others wait for its
        # commit (the lock lasts until then: the whole run) and then find the table. Mapped tasks avoid
        # that wait by creating the target first, in a task of its own (Transfer.create_target).
        advisory_lock(self.conn, f"pseudonymise-target-create:{self.target.label}")
        self.table = reflect_table(self.conn, self.target.table, self.target.schema)
        if self.table is not None:
            self._check_columns(self.table)
            return
        if self.conn.dialect.name == "postgresql" and self.type_names:
            prep = self.conn.dialect.identifier_preparer
            cols = ", ".join(
                f"{prep.quote(c)} {'text' if c in self.pseudonymised else self.type_names.get(c, 'text')}"
                for c in self.columns
            )
            name = f"{prep.quote(self.target.schema) + '.' if self.target.schema else ''}{prep.quote(self.target.table)}"
            self.conn.execute(sa.text(f"CREATE TABLE {name} ({cols})"))
            created = reflect_columns(self.conn, self.target.table, self.target.schema)
        else:
            meta = sa.MetaData()
            sa.Table(self.target.table, meta,
                     *[sa.Column(c, sa.Text() if c in self.pseudonymised else python_type(batch.get(c, ())))
                       for c in self.columns], schema=self.target.schema)
            meta.create_all(self.conn)
            created = None
        if self.target.mode == "upsert":
            prep = self.conn.dialect.identifier_preparer
            name = f"{prep.quote(self.target.schema) + '.' if self.target.schema else ''}{prep.quote(self.target.table)}"
            keys = ", ".join(prep.quote(k) for k in self.target.upsert_key)
            index = prep.quote(f"{self.target.table}_upsert_key")
            self.conn.execute(sa.text(f"CREATE UNIQUE INDEX {index} ON {name} ({keys})"))
        self.table = created if created is not None else reflect_table(self.conn, self.target.table, self.target.schema)
        assert self.table is not None
        self._check_columns(self.table)

    def _prepare(self) -> None:
        """Apply the write mode's deletion, in the same transaction as the rows to come."""
        with self._errors(f"preparing the target {self.target.label} (write mode {self.target.mode!r}) failed"):
            self._delete_for_mode()

    def _delete_for_mode(self) -> None:
        t, target = self.table, self.target
        assert t is not None
        # Two runs replacing overlapping rows at once (overlapping backfills, a manual run over a
        # backfill's days) must not both insert: the second waits for the first to commit, then
        # deletes what it wrote. Runs over disjoint intervals go on side by side.
        if target.mode == "replace":
            self._lock = lock_interval(self.conn, target.schema, target.label, whole=True)
            self.conn.execute(sa.delete(t))
        elif target.mode == "replace_partition":
            col = t.c[target.partition_column]  # type: ignore[index]
            start = coerce_bound(target.partition_start, col.type, col.name)
            end = None if target.partition_end is None else coerce_bound(target.partition_end, col.type, col.name)
            self._lock = lock_interval(self.conn, target.schema, target.label, start, end)
            cond = col >= start
            if end is not None:
                cond = sa.and_(cond, col < end)
            self.conn.execute(sa.delete(t).where(cond))
        self._prepared = True

    @property
    def creates_without_rows(self) -> bool:
        """Whether the table is still to be created and its column types are known without a row (the COPY
        source's declared types on PostgreSQL): :meth:`open_table` may then run before the first batch is read."""
        return self.table is None and self.conn.dialect.name == "postgresql" and bool(self.type_names)

    def open_table(self, sample: Mapping[str, Sequence[Any]]) -> None:
        """Create the table (typed by ``sample``'s values, as a first :meth:`write` would) when it does not exist, and
        apply the write mode's deletion: what a first write does, for a writer that then inserts by itself."""
        if self.table is None:
            self._create(sample)
            self._prepare()

    def write(self, batch: dict[str, list[Any]] | CopyBlock | pa.RecordBatch) -> None:
        if isinstance(batch, pa.RecordBatch):  # the C engine's Arrow output: Python values for the driver
            batch = {name: array.to_pylist() for name, array in zip(batch.schema.names, batch.columns, strict=True)}
        self.open_table(batch if isinstance(batch, dict) else {})
        if isinstance(batch, CopyBlock):
            if not self.copy:
                raise PolicyError("COPY text rows can only be written to a PostgreSQL target with COPY")
            if batch.rows:
                self._copy(batch.data)
                self.rows_written += batch.rows
            return
        cols = [batch[c] for c in self.columns]
        n = len(cols[0]) if cols else 0
        if n == 0:
            return
        if self.copy:
            self._copy(build_rows([encode_column(c) for c in cols]))
        else:
            with self._errors(f"writing the target {self.target.label} failed; nothing was committed"):
                self._insert([decode_column(c) if isinstance(c, CopyText) else c for c in cols])
        self.rows_written += n

    def _insert(self, cols: list[list[Any]]) -> None:
        assert self.table is not None
        if self.conn.dialect.name == "sqlite":
            self._executemany(cols)
            return
        # other drivers: SQLAlchemy knows each one's bulk path (multi-row VALUES, fast_executemany …)
        rows = [dict(zip(self.columns, r, strict=True)) for r in zip(*cols, strict=True)]
        if self.target.mode == "upsert":
            self.conn.execute(self._upsert_statement(), rows)
        else:
            self.conn.execute(self.table.insert(), rows)

    def _executemany(self, cols: list[list[Any]]) -> None:
        """The rows through the DB-API cursor's ``executemany`` on the run's own connection (so in its
        transaction), bound as SQLAlchemy binds them: each column through its type's bind processor
        (dates and timestamps to SQLite's text, booleans to integers …), a whole column at a time.
        sqlite3 prepares the statement once and steps it per row: its bulk path."""
        statement, order, processors = self._bulk_insert
        bound = []
        for i in order:
            process = processors[i]
            bound.append(cols[i] if process is None else self._bind_column(cols[i], process, self.columns[i]))
        cursor = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(statement, zip(*bound, strict=True))
        finally:
            cursor.close()

    @cached_property
    def _bulk_insert(self) -> tuple[str, list[int], list[Callable[[Any], Any] | None]]:
        """The INSERT (or upsert) as the driver's SQL with positional parameters, which column each
        parameter takes, and each column's bind processor; compiled once per sink."""
        assert self.table is not None
        dialect = self.conn.dialect
        stmt = self._upsert_statement() if self.target.mode == "upsert" else self.table.insert()
        compiled = stmt.compile(dialect=dialect, column_keys=self.columns)
        if not compiled.positional or compiled.positiontup is None:
            raise PolicyError(f"the {dialect.name} driver takes named parameters; this write path needs positional ones")
        index = {name: i for i, name in enumerate(self.columns)}
        # the statement's parameters by bind name (escaped for the driver, as SQLAlchemy would send them)
        names = compiled.construct_params({c: c for c in self.columns}, escape_names=False)
        order = [index[names[name]] for name in compiled.positiontup]
        processors = [self.table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in self.columns]
        return compiled.string, order, processors

    def _bind_column(self, values: list[Any], process: Callable[[Any], Any], column: str) -> list[Any]:
        try:
            return list(map(process, values))
        except (TypeError, ValueError) as exc:  # its text may quote a value: named by class only
            raise_alone(DatabaseIOError(
                f"writing the target {self.target.label} failed: a value of column {column!r} does not convert to "
                f"the column's type ({self.table.c[column].type}; {type(exc).__name__}); nothing was committed: "  # type: ignore[union-attr]
                f"{TARGET_DATA_FIX}. The driver's message is left out because it can quote data values"))

    def _upsert_statement(self) -> Any:
        assert self.table is not None
        name = self.conn.dialect.name
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            raise PolicyError(f"write mode 'upsert' is supported on PostgreSQL and SQLite, not {name}")
        stmt = insert(self.table)
        updates = {c: stmt.excluded[c] for c in self.columns if c not in self.target.upsert_key}
        return stmt.on_conflict_do_update(index_elements=self.target.upsert_key, set_=updates) if updates \
            else stmt.on_conflict_do_nothing(index_elements=self.target.upsert_key)

    def _copy(self, rows: bytes) -> None:
        """COPY rows of COPY text into the target (or the upsert's staging table)."""
        with self._errors(f"COPY into the target {self.target.label} failed; nothing was committed"):
            self._copy_rows(rows)

    def _copy_rows(self, rows: bytes) -> None:
        assert self.table is not None
        prep = self.conn.dialect.identifier_preparer
        if self.target.mode == "upsert" and self._staging is None:
            self._staging = prep.quote(f"_pseudonymise_stage_{uuid.uuid4().hex[:12]}")
            self.conn.execute(sa.text(
                f"CREATE TEMP TABLE {self._staging} AS SELECT {', '.join(prep.quote(c) for c in self.columns)} "
                f"FROM {prep.format_table(self.table)} WITH NO DATA"))
        into = self._staging or prep.format_table(self.table)
        cursor = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.copy_expert(f"COPY {into} ({', '.join(prep.quote(c) for c in self.columns)}) FROM STDIN",
                               io.BytesIO(rows), size=1 << 20)
        finally:
            cursor.close()

    def commit(self) -> None:
        """Finish the write inside the transaction (the caller commits it with the audit row)."""
        self.open_table({})  # no row at all: still create the table so downstream sees it
        with self._errors(f"finishing the write into the target {self.target.label} failed; nothing was committed"):
            self._finish()

    def _finish(self) -> None:
        if self._staging is not None:
            prep = self.conn.dialect.identifier_preparer
            cols = ", ".join(prep.quote(c) for c in self.columns)
            keys = ", ".join(prep.quote(k) for k in self.target.upsert_key)
            updates = ", ".join(f"{prep.quote(c)} = EXCLUDED.{prep.quote(c)}" for c in self.columns
                                if c not in self.target.upsert_key)
            action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
            self.conn.execute(sa.text(
                f"INSERT INTO {prep.format_table(self.table)} ({cols}) SELECT {cols} FROM {self._staging} "  # type: ignore[arg-type]
                f"ON CONFLICT ({keys}) {action}"))
            self.conn.execute(sa.text(f"DROP TABLE {self._staging}"))
        unlock_interval(self.conn, self.target.schema, self._lock)
        self._lock = None

    def abort(self) -> None:
        """Nothing to undo here: the caller's transaction rolls back."""
