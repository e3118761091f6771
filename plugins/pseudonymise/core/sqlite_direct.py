"""SQLite to SQLite inside SQLite: one ``INSERT … SELECT`` whose pseudonymised columns call the C engine per value.

A SQLite table pseudonymised into a SQLite target held in the audit store's database would otherwise move
every row through Python objects twice (``fetchmany``, then ``executemany``), which costs more than the
pseudonyms themselves. Here the source file is attached to the run's own connection (read-only, under a
random schema name that no user's can equal; not at all when source and target are one file), each
pseudonymised column's function (:func:`pseudonymise.core.native.value_function`: the column's key, normalisers,
domain and format bound in C) is registered on that connection as SQLite's own function (SQLite calls it with no
Python object per value; through sqlite3's ``create_function`` where that cannot be done), and one statement
``INSERT INTO target (…) SELECT f1(a), b, f2(c) … FROM source`` writes every row in the run's transaction,
after the write mode's deletion, before the audit's ``finished`` row, exactly as the generic path does.

The same values come out as on the generic path: SQLite hands each function what ``fetchmany`` hands Python
(``int``, ``str``, ``bytes``, ``float``, ``None`` per value, whatever the column's declared type), the function
makes them canonical as ``canonical.py`` does and refuses floats the same way (naming the column and the row
read, never a value), and kept columns are copied by SQLite with the target's column affinity, as the
driver's binds would be. Every MAC still reaches the run's collision check, in blocks. What the path does
not do (Vault Transit keys, escrow of reversible projects, secondary tokens, de-identifying actions, the risk
gate, query sources, a target outside the store's database, a target column whose type converts values on
the way in) stays on the generic path: :func:`plan_direct` and :meth:`SqliteDirect.prepare` say when.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pseudonymise.core import native
from pseudonymise.core.canonical import canonical
from pseudonymise.core.errors import InvalidTextError, UnsupportedTypeError, raise_alone
from pseudonymise.core.sql import python_type

if TYPE_CHECKING:
    from pseudonymise.core.policy import ColumnPolicy
    from pseudonymise.core.pseudonymiser import PseudonymEngine
    from pseudonymise.core.sql import SqlSource, TableSink

#: MACs a column's function gathers before it hands them to the collision check.
FLUSH_EVERY = 1 << 16


def database_file(engine: Engine) -> str | None:
    """The file of a SQLite engine, resolved; ``None`` for anything else (another database, ``:memory:``,
    a URI name, a temporary database)."""
    if engine.dialect.name != "sqlite":
        return None
    name = engine.url.database
    if not name or name == ":memory:" or name.startswith("file:") or engine.url.query.get("uri"):
        return None
    path = os.path.realpath(name)
    return path if os.path.isfile(path) else None


@dataclass(frozen=True)
class SqliteDirect:
    """The plan of a run done by SQLite itself: the source table and where its file is.

    :ivar source_file: the source database file (resolved).
    :ivar table: the source table (in the source file's ``main`` schema).
    :ivar same_file: the source is the target's own database file: nothing is attached.
    """

    source_file: str
    table: str
    same_file: bool

    def prepare(self, sink: TableSink, source: SqlSource) -> bool:
        """Make the target ready for the statement as a first write of the generic path would (created, typed by
        the first batch's values, when it does not exist; the write mode's deletion), and say whether SQLite's
        copy stores what the generic path's binds would: no output column of a type that converts values on the
        way in (``FLOAT`` to ``float``, ``DATE`` only from dates, ``BOOLEAN`` …). ``False`` leaves the target as
        it was and the source to be read again from its start (the generic path then writes it)."""
        dialect = sink.conn.dialect
        sample: dict[str, Any] = {}
        if sink.table is None:
            batches = source.batches()
            try:
                sample = next(iter(batches), {})
            finally:
                batches.close()  # type: ignore[attr-defined]
            kinds = [sa.Text() if c in sink.pseudonymised else python_type(sample.get(c, ())) for c in sink.columns]
        else:
            kinds = [sink.table.c[c].type for c in sink.columns]
        source.release()  # its read must not hold the file while the target (perhaps the same file) commits
        if any(kind.dialect_impl(dialect).bind_processor(dialect) is not None and not isinstance(kind, sa.LargeBinary)
               for kind in kinds):
            return False
        sink.open_table(sample)
        return True

    @contextlib.contextmanager
    def attached(self, conn: Connection) -> Iterator[str | None]:
        """The source file attached read-only to ``conn`` (outside any transaction: SQLite refuses ``ATTACH`` in
        one) for the block, then detached; yields the schema name to read it by (``main`` for the same file), or
        ``None`` when it could not be attached as planned (then the caller takes the generic path)."""
        if self.same_file:
            yield "main"
            return
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        if dbapi.in_transaction:  # never commit a caller's open work to make room for ATTACH
            yield None
            return
        names = {row[1] for row in dbapi.execute("PRAGMA database_list")}
        schema = f"pseudonymise_source_{uuid.uuid4().hex}"
        while schema in names:  # pragma: no cover - a random 128-bit name
            schema = f"pseudonymise_source_{uuid.uuid4().hex}"
        uri = f"file:{urllib.parse.quote(self.source_file)}?mode=ro"
        try:
            dbapi.execute(f'ATTACH DATABASE ? AS "{schema}"', (uri,))
        except sqlite3.Error:  # this SQLite reads no URI file names, say: the generic path reads the source itself
            yield None
            return
        try:
            files = {row[1]: row[2] for row in dbapi.execute("PRAGMA database_list")}
            # a SQLite that took the URI as a plain file name would have attached (and made) another file
            yield schema if files.get(schema) == self.source_file else None
        finally:
            if dbapi.in_transaction:  # the caller's transaction ended in an error it is still raising
                dbapi.rollback()
            dbapi.execute(f'DETACH DATABASE "{schema}"')

    def run(self, engine: PseudonymEngine, schema: str, sink: TableSink, columns: Sequence[str]) -> int:
        """Write every row of the source table (its ``columns``) into ``sink``'s table, made ready by :meth:`prepare`,
        with one ``INSERT … SELECT`` on the sink's connection (in its transaction), the pseudonymised columns through
        the C engine; the rows written.

        The counts go to ``engine.stats`` and every MAC to its collision check (call ``engine.finish()`` after).
        A value the engine refuses, or the collision check failing, raises the plugin's own error naming the
        column (and the row read), never a value; the caller's transaction then rolls back.
        """
        plan = engine.policy.plan(columns)
        assert sink.table is not None
        dbapi = sink.conn.connection.dbapi_connection
        assert dbapi is not None
        functions: dict[str, Any] = {}
        names: list[str] = []
        native_names: set[str] = set()
        tag = uuid.uuid4().hex
        deterministic = not getattr(engine, "randomised", False)
        try:
            for i, rule in enumerate(plan):
                if rule.action == "pseudonymise":
                    name = f"pseudonymise_{tag}_{i}"
                    function = functions[rule.column] = engine.value_function(rule, FLUSH_EVERY)
                    names.append(name)
                    # SQLite's own function where it can be (no Python call per value), else sqlite3's callback
                    if native.sqlite_register(dbapi, name, function, deterministic=deterministic):
                        native_names.add(name)
                    else:
                        dbapi.create_function(name, 1, function, deterministic=deterministic)
            cursor = dbapi.cursor()
            try:
                cursor.execute(self._statement(sink, schema, plan, names))
            except sqlite3.Error as exc:
                if "user-defined function raised exception" in str(exc):
                    _raise_function_error(functions)
                raise
            finally:
                cursor.close()
            for function in functions.values():
                function.flush()  # the last MACs to the collision check
            rows = next(iter(functions.values())).calls if functions else 0
            engine.add_counts(rows, sum(f.nulls for f in functions.values()), sum(f.values for f in functions.values()))
            sink.rows_written += rows
            return rows
        finally:
            # the connection goes back to the pool: nothing of the key stays on it (sqlite3 cannot unregister a
            # function before Python 3.13: None in its place fails every call; SQLite's own is removed)
            for name in names:
                if name in native_names:
                    native.sqlite_unregister(dbapi, name)
                else:
                    dbapi.create_function(name, 1, None)
            for function in functions.values():
                function.close()
            functions.clear()

    def _statement(self, sink: TableSink, schema: str, plan: Sequence[Any], names: Sequence[str]) -> str:
        prep = sink.conn.dialect.identifier_preparer
        quote = prep.quote_identifier  # always quoted: a column named `a"; DROP TABLE x; --` is only a name
        calls = iter(names)
        out = [rule for rule in plan if rule.action != "drop"]
        columns = ", ".join(quote(rule.column) for rule in out)
        values = ", ".join(f"{next(calls)}({quote(rule.column)})" if rule.action == "pseudonymise"
                           else quote(rule.column) for rule in out)
        target = sink.table
        assert target is not None
        into = (f"{quote(target.schema)}." if target.schema else "") + quote(target.name)
        sql = f"INSERT INTO {into} ({columns}) SELECT {values} FROM {quote(schema)}.{quote(self.table)}"
        mode = sink.target
        if mode.mode == "upsert":  # SQLite's parser needs a WHERE between a SELECT and its ON CONFLICT
            keys = ", ".join(quote(k) for k in mode.upsert_key)
            updates = ", ".join(f"{quote(r.column)} = excluded.{quote(r.column)}" for r in out
                                if r.column not in mode.upsert_key)
            sql += f" WHERE true ON CONFLICT ({keys}) " + (f"DO UPDATE SET {updates}" if updates else "DO NOTHING")
        return sql


def _raise_function_error(functions: dict[str, Any]) -> None:
    """The error a column's function kept (sqlite3 reports only "user-defined function raised exception"), as
    the plugin's own, naming the column and the row read; nothing when no function failed."""
    if all(f.error is None for f in functions.values()):
        # sqlite3 could not hand a value over at all: text that is not UTF-8 is the one value it cannot convert
        columns = ", ".join(map(repr, functions))
        raise_alone(InvalidTextError(f"a pseudonymised column ({columns}) holds text that is not valid UTF-8 "
                                     f"(by row {max(f.calls for f in functions.values()) + 1:,} read from the source "
                                     "table); fix the source encoding"))
    for column, function in functions.items():
        error = function.error
        if error is None:
            continue
        if isinstance(error, UnicodeError):  # its text and its .object hold the value: named by the column only
            del error
            raise_alone(InvalidTextError(f"column {column!r} holds text that is not valid UTF-8 (first at row "
                                         f"{function.error_row:,} read from the source table); fix the source encoding"))
        if isinstance(error, TypeError):  # a value canonical.py refuses: its message, the row, never the value
            message = f"column {column!r} holds {error} values, which cannot be pseudonymised reliably"
            if str(error) == "floating-point":
                try:
                    canonical(float("nan"), column)
                except UnsupportedTypeError as refused:
                    message = str(refused)
            raise_alone(UnsupportedTypeError(f"{message} (first at row {function.error_row:,} read from the source "
                                             "table)"))
        raise_alone(error)


def plan_direct(source_engine: Engine, table: str | None, schema: str | None, target_engine: Engine,
                policy: ColumnPolicy | None) -> SqliteDirect | None:
    """The plan of a run SQLite can do itself (see the module), or ``None``: a source table (``table``, in the
    source file's main schema) of a SQLite file, a SQLite target (the caller checks that it is written in the audit
    store's transaction), the C engine, and a policy that pseudonymises at least one column and otherwise only
    keeps or drops. A query source (``table`` ``None``) stays on the generic path: names in it would be looked up
    on the target's connection (its temporary and main schemas before an attached file), so it could read
    another table than the source's."""
    if (policy is None or table is None or schema not in (None, "main") or not native.available()
            or not policy.pseudonymised_columns or policy.deidentified_columns
            or target_engine.dialect.name != "sqlite"):
        return None
    source_file = database_file(source_engine)
    name = target_engine.url.database
    if source_file is None or not name or name == ":memory:" or name.startswith("file:") \
            or target_engine.url.query.get("uri"):
        return None
    target = os.path.realpath(name)
    # one file under two names (a hard link) is one file too: attached, its read lock would stall the target's commit
    same = source_file == target or (os.path.exists(target) and os.path.samefile(source_file, target))
    return SqliteDirect(source_file, table, same)


__all__ = ["FLUSH_EVERY", "SqliteDirect", "database_file", "plan_direct"]
