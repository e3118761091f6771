"""The transfer planner: where a run reads and writes, and by which path, decided once before the token is used.

:func:`plan_transfer` takes what the caller names (a SQL query or an open :class:`Source`; a table
in a database or any other :class:`Destination`) and the column policy, and returns a
:class:`Transfer`: the opened source, how its batches travel and how to open the sink. PostgreSQL to
PostgreSQL goes by COPY both ways, unless the pseudonymised columns have types whose COPY text is not
their canonical form; then, with the C engine and the key at hand, the engine works on whole blocks
of COPY text (no Python object per row). Everything else takes the generic path: columns of Python
values, written with ``INSERT`` (or COPY into a PostgreSQL table); from a SQL source into a table, with
the C engine and the key at hand, its batches reach the engine as ``pyarrow.RecordBatch``es.

Where a table's transaction commits is explicit too: in the audit store's own transaction
(:class:`SharedTransaction`, the default, so rows and the audit's ``finished`` row commit together)
or in its own (:class:`SeparateTransaction`, another database).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.engine import Connection, Engine

from pseudonymise.core import native
from pseudonymise.core.copytext import CopyBlock
from pseudonymise.core.errors import PolicyError
from pseudonymise.core.files import open_sink
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableSink, TableTarget
from pseudonymise.core.sqlite_direct import SqliteDirect, plan_direct

if TYPE_CHECKING:
    from pseudonymise.core.policy import ColumnPolicy

_log = logging.getLogger(__name__)


class Source(Protocol):
    """Rows to read, in batches of columns (a mapping of column name to values).

    A source that can also give its rows as ``pyarrow.RecordBatch`` es has a ``record_batches()`` method
    (the CSV and Parquet sources do); a run whose destination takes them (``takes_arrow``) reads those, and
    the engine pseudonymises them with :meth:`~pseudonymise.core.pseudonymiser.PseudonymEngine.pseudonymise_record_batch`.
    """

    columns: list[str]

    def batches(self) -> Iterator[dict[str, list[Any]]]: ...


class Sink(Protocol):
    """Where output goes. ``commit`` is called inside the store's transaction, just before the
    audit ``finished`` row: a sink on the store's own connection commits with it; a file is
    renamed into place (and removed again by ``abort`` if the audit then fails to commit)."""

    def write(self, batch: Any) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Destination(Protocol):
    """Where a run writes, opened once the output columns are known, with the store's open transaction.

    A destination whose sinks' ``write`` also takes a ``pyarrow.RecordBatch`` says so with a ``takes_arrow``
    attribute that is true (files do); a source with ``record_batches()`` then goes to it as Arrow batches.
    """

    def open(self, columns: list[str], conn: Connection) -> Sink: ...


# --- what the caller names ----------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySource:
    """A SQL query to read (``:name`` bind ``parameters``), by COPY or a server-side cursor as planned.

    :param label: how errors name the source (``table:visits``, ``query``).
    :param table: the table ``query`` reads whole (``SELECT * FROM`` it), when it is one, and its ``schema``:
        a SQLite table into a SQLite target may then be pseudonymised by SQLite itself (``sqlite_direct.py``).
    """

    engine: Engine
    query: str
    parameters: Mapping[str, Any] | None = None
    batch_size: int = 50_000
    label: str = "query"
    table: str | None = None
    schema: str | None = None


@dataclass(frozen=True)
class SharedTransaction:
    """The target is in the audit store's database and is written in the store's transaction: the rows,
    the escrow and the audit's ``finished`` row commit together, or none of them (docs/design.md §6).

    :param engine: the store's engine (the target's database).
    """

    engine: Engine


@dataclass(frozen=True)
class SeparateTransaction:
    """The target is in another database than the audit's: its own transaction commits just before the
    audit's ``finished`` row, so a crash in between leaves rows whose use shows ``started`` without
    ``finished``, never an audited success without its rows.

    :param engine: the target's engine.
    """

    engine: Engine


@dataclass(frozen=True)
class TableDestination:
    """A table and the transaction it is written in."""

    target: TableTarget
    transaction: SharedTransaction | SeparateTransaction

    @property
    def engine(self) -> Engine:
        return self.transaction.engine


@dataclass(frozen=True)
class SinkFactory:
    """A destination opened by a function of the output columns and the store's open transaction
    (a custom sink, or one in tests): ``SinkFactory(lambda columns, conn: MemorySink(columns))``.

    :param copy_text: the sink's ``write`` takes :class:`~pseudonymise.core.copytext.CopyBlock` rows of
        COPY text too (a PostgreSQL COPY sink), so a COPY source's blocks may go to it as they are.
    :param takes_arrow: the sink's ``write`` takes ``pyarrow.RecordBatch`` es too.
    """

    open: Callable[[list[str], Connection], Sink]
    copy_text: bool = False
    takes_arrow: bool = False


@dataclass(frozen=True)
class FileDestination:
    """A CSV or Parquet file, written atomically (renamed into place when the run commits).

    :param fmt: ``csv`` or ``parquet`` (default: from the extension).
    """

    path: str
    fmt: str | None = None
    #: the file sinks write ``pyarrow.RecordBatch`` es as they are
    takes_arrow = True

    def open(self, columns: list[str], conn: Connection) -> Sink:
        return open_sink(self.path, columns, self.fmt)


# --- the plan -----------------------------------------------------------------------------------
class _SeparateTransactionSink:
    """A table sink in a database other than the audit's: it commits its own transaction first, so a
    crash can leave data whose audit use shows ``started`` without ``finished``, never the reverse."""

    def __init__(self, engine: Engine, target: TableTarget, columns: list[str], **options: Any) -> None:
        self._conn = engine.connect()
        try:
            self._txn = self._conn.begin()
            self._sink = target.sink(self._conn, columns, **options)
        except BaseException:
            self._conn.close()
            raise

    def write(self, batch: Any) -> None:
        self._sink.write(batch)

    def commit(self) -> None:
        self._sink.commit()
        self._txn.commit()
        self._conn.close()

    def abort(self) -> None:
        if self._txn.is_active:
            self._txn.rollback()
        self._conn.close()


@dataclass
class Transfer:
    """A planned transfer: the open source, the path its batches take, and how the sink opens.

    :ivar copy_text: the source yields COPY text and the target takes it (PostgreSQL COPY both ways).
    :ivar native_blocks: on that path, the C engine pseudonymises whole blocks of COPY text, when the
        token's key is at hand (not in Vault Transit) and the policy has no de-identifying action.
    :ivar arrow: the source's rows travel as ``pyarrow.RecordBatch`` es (its ``record_batches()``), which the
        destination's sink writes as they are.
    :ivar arrow_batches: on the generic SQL path into a table, the source's batches go to the C engine as
        ``pyarrow.RecordBatch``es (when the key is at hand), which it reads from their buffers.
    :ivar pseudonymised: the output columns that are text whatever their source type (pseudonyms, generalised and
        masked values): a target table the run creates gives them the type ``text``.
    :ivar sqlite_direct: a SQLite table into a SQLite table of the audit store's database: the run may be one
        ``INSERT … SELECT`` in SQLite with the C engine per value (``sqlite_direct.py``; the pipeline decides at
        run time, once it knows the token and the target).
    :ivar source_label: what the audit names as the source (``hospital_db:query``, ``file:in.csv`` …);
        ``target_label`` likewise.
    """

    source: Source
    destination: Destination | TableDestination
    copy_text: bool = False
    native_blocks: bool = False
    arrow: bool = False
    arrow_batches: bool = False
    type_names: Mapping[str, str] | None = None
    pseudonymised: Sequence[str] = ()
    use_copy: bool | None = None
    source_label: str | None = None
    target_label: str | None = None
    sqlite_direct: SqliteDirect | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.source.columns)

    def batches(self, *, key_at_hand: bool) -> Iterator[Any]:
        """The source's batches: blocks of COPY text for the C engine on the planned block path (and
        ``key_at_hand``: Vault Transit computes MACs one batch of values at a time), Arrow record batches on
        the planned Arrow path, else columns."""
        if self.native_blocks and key_at_hand:
            assert isinstance(self.source, PostgresCopySource)
            blocks: Iterator[CopyBlock] = self.source.copy_blocks()
            return blocks
        if self.arrow:
            return self.source.record_batches()  # type: ignore[attr-defined, no-any-return]
        if self.arrow_batches and key_at_hand:
            assert isinstance(self.source, SqlSource)
            return self.source.record_batches()
        return self.source.batches()

    def open_sink(self, columns: list[str], conn: Connection) -> Sink:
        """The sink for the output ``columns``; ``conn`` is the store's open transaction."""
        destination = self.destination
        if not isinstance(destination, TableDestination):
            return destination.open(columns, conn)
        options: dict[str, Any] = {"use_copy": True if self.copy_text else False if self.use_copy is False else None,
                                   "pseudonymised": self.pseudonymised, "type_names": self.type_names}
        if isinstance(destination.transaction, SharedTransaction):
            sink: TableSink = destination.target.sink(conn, columns, **options)
            return sink
        return _SeparateTransactionSink(destination.engine, destination.target, columns, **options)

    def create_target(self, policy: ColumnPolicy) -> bool:
        """Create the target table with the schema a run of ``policy`` would give it, in a transaction of its
        own, writing no row; whether it was created (``False``: it already exists with the output columns).

        Tasks that write one new table side by side (mapped key ranges) would otherwise wait for the first of
        them, which creates it inside its own run's transaction. No token is used and nothing is audited:
        it is DDL only. On the COPY path (PostgreSQL to PostgreSQL) the source's declared column types are
        used and no row is read; on any other path the kept columns take the types of the first batch's
        values, as a run's first write does.
        """
        destination = self.destination
        if not isinstance(destination, TableDestination):
            raise PolicyError("creating the target needs a target table (target_conn_id and target_table), "
                              "not a file")
        out_columns = [rule.column for rule in policy.plan(self.columns) if rule.action != "drop"]
        sample: dict[str, list[Any]] = {}
        if self.type_names is None:  # else the COPY source's probe gave the declared types, reading no row
            batches = self.source.batches()
            try:
                sample = next(iter(batches), {})
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        with destination.engine.begin() as conn:
            return destination.target.create_if_missing(conn, out_columns, pseudonymised=self.pseudonymised,
                                                        type_names=self.type_names, sample=sample)


def plan_transfer(source: QuerySource | Source, destination: Destination | TableDestination,
                  policy: ColumnPolicy | None = None, *, use_copy: bool | None = None,
                  source_label: str | None = None, target_label: str | None = None) -> Transfer:
    """Open ``source`` and decide how a run moves it into ``destination``, once.

    :param policy: the column policy of a pseudonymisation (``None`` for a reversal): its pseudonymised
        columns are checked for types that cannot be pseudonymised reliably before anything is read, and
        decide whether COPY text can carry them.
    :param use_copy: ``False`` keeps PostgreSQL off COPY (cursor reads, ``INSERT`` writes); default: COPY
        wherever both ends are PostgreSQL.
    """
    pseudonymised = list(policy.pseudonymised_columns) if policy is not None else []
    # de-identifying actions run on columns of values (Python or Arrow), never on raw COPY blocks; the target gives
    # their text outputs (generalised, masked) a text type, as it does pseudonyms
    deidentifies = policy is not None and bool(policy.deidentified_columns)
    text_columns = list(policy.text_columns) if policy is not None else []
    if isinstance(destination, TableDestination):
        takes_copy = use_copy is not False and destination.engine.dialect.name == "postgresql"
    else:
        takes_copy = isinstance(destination, SinkFactory) and destination.copy_text
    opened = (_open_query(source, pseudonymised, takes_copy and source.engine.dialect.name == "postgresql")
              if isinstance(source, QuerySource) else source)
    copy_text = takes_copy and isinstance(opened, PostgresCopySource)
    direct = (plan_direct(source.engine, source.table, source.schema, destination.engine, policy)
              if isinstance(source, QuerySource) and isinstance(opened, SqlSource)
              and isinstance(destination, TableDestination) and isinstance(destination.transaction, SharedTransaction)
              else None)
    if direct is not None:  # not read at all when SQLite does the run; read again from the start when it does not
        opened.release()  # type: ignore[union-attr]
    arrow = (policy is not None and not copy_text and callable(getattr(opened, "record_batches", None))
             and bool(getattr(destination, "takes_arrow", False)))
    return Transfer(
        opened, destination, copy_text=copy_text, arrow=arrow,
        native_blocks=(copy_text and policy is not None and native.available() and not deidentifies
                       and _writes_a_column(policy, opened.columns)),
        arrow_batches=(isinstance(opened, SqlSource) and isinstance(destination, TableDestination) and policy is not None
                       and native.available() and bool(pseudonymised)),
        type_names=opened.type_names if isinstance(opened, PostgresCopySource) else None,
        pseudonymised=text_columns, use_copy=use_copy, source_label=source_label, target_label=target_label,
        sqlite_direct=direct)


def _open_query(query: QuerySource, pseudonymised: Sequence[str], copy_wanted: bool) -> Source:
    if copy_wanted:
        copy_source = PostgresCopySource(query.engine, query.query, query.parameters, query.batch_size, query.label)
        copy_source.check_types(pseudonymised)
        if copy_source.usable(pseudonymised):
            # the target is written with COPY too: what is not pseudonymised stays COPY text
            copy_source.carry_as_text([c for c in copy_source.columns if c not in pseudonymised])
            return copy_source
        _log.info("pseudonymised columns have types COPY text cannot carry canonically; using the cursor path")
    sql_source = SqlSource(query.engine, query.query, query.parameters, query.batch_size, query.label)
    sql_source.check_types(pseudonymised)
    return sql_source


def _writes_a_column(policy: ColumnPolicy, columns: Sequence[str]) -> bool:
    """Whether the policy keeps or pseudonymises any of ``columns`` (a block of nothing is no block)."""
    try:
        return any(rule.action != "drop" for rule in policy.plan(columns))
    except PolicyError:  # the engine names the problem inside the audited use
        return False
