"""The transfer planner (core/plan.py): the path of a run decided once, before any token is read.

PostgreSQL to PostgreSQL goes by COPY both ways (blocks of COPY text for the C engine when the key is at
hand), unless COPY text cannot carry the pseudonymised columns or ``use_copy=False``; everything else takes
the generic path. A table target is written in the store's transaction (``SharedTransaction``) or commits
its own first (``SeparateTransaction``), as the caller says, never as engine identity suggests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.copytext import CopyBlock
from pseudonymise.core.errors import PolicyError, PseudonymiseError, UnsupportedTypeError
from pseudonymise.core.files import CsvSource
from pseudonymise.core.plan import (
    FileDestination,
    QuerySource,
    SeparateTransaction,
    SharedTransaction,
    SinkFactory,
    TableDestination,
    plan_transfer,
)
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableSink, TableTarget

from tests.core.conftest import Collect, Rows

POLICY = ColumnPolicy.pseudonymise("pid", default="keep")


def _fill(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id integer, pid text, ward text)"))
        conn.execute(sa.text("INSERT INTO src VALUES (1, '11', 'a'), (2, '22', NULL), (3, NULL, 'c')"))


def _table(engine: sa.Engine) -> TableDestination:
    return TableDestination(TableTarget("dst", mode="replace"), SharedTransaction(engine))


@pytest.mark.postgres
def test_postgres_to_postgres_goes_by_copy_both_ways(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    transfer = plan_transfer(QuerySource(engine, "SELECT * FROM src ORDER BY id"), _table(engine), POLICY,
                             source_label="hospital:query", target_label="research:dst")
    assert isinstance(transfer.source, PostgresCopySource)
    assert transfer.copy_text and transfer.native_blocks == native.available()
    assert (transfer.source_label, transfer.target_label) == ("hospital:query", "research:dst")
    assert transfer.type_names == {"id": "integer", "pid": "text", "ward": "text"}
    blocks = list(transfer.batches(key_at_hand=True))
    if native.available():
        assert all(isinstance(b, CopyBlock) for b in blocks) and sum(b.rows for b in blocks) == 3
    # a key held in Vault Transit: columns, with what is not pseudonymised still COPY text
    columns = list(transfer.batches(key_at_hand=False))
    assert [len(b["id"]) for b in columns] == [3]
    with engine.begin() as conn:
        sink = transfer.open_sink(["id", "pid", "ward"], conn)
        assert isinstance(sink, TableSink) and sink.copy and sink.conn is conn


@pytest.mark.postgres
@pytest.mark.parametrize("why", ["use_copy=False", "timestamp column"])
def test_the_cursor_path_when_copy_is_off_or_cannot_carry_the_column(pg_url: str, why: str) -> None:
    """A timestamp's COPY text is not the canonical text of the value the cursor gives: the cursor path."""
    engine = sa.create_engine(pg_url)
    _fill(engine)
    use_copy = False if why == "use_copy=False" else None
    query = ("SELECT id, TIMESTAMP '2026-11-04 10:00' AS pid, ward FROM src" if why == "timestamp column"
             else "SELECT * FROM src")
    transfer = plan_transfer(QuerySource(engine, query), _table(engine), POLICY, use_copy=use_copy)
    assert isinstance(transfer.source, SqlSource) and not transfer.copy_text and not transfer.native_blocks
    with engine.begin() as conn:
        sink = transfer.open_sink(["id", "pid", "ward"], conn)
        assert isinstance(sink, TableSink) and sink.copy is (use_copy is None)


@pytest.mark.postgres
def test_a_type_that_cannot_be_pseudonymised_fails_before_anything_is_read(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    with pytest.raises(UnsupportedTypeError, match="double precision"):
        plan_transfer(QuerySource(engine, "SELECT id::float8 AS pid FROM src"), _table(engine), POLICY)


def test_sqlite_and_files_take_the_generic_path(sqlite_url: str, tmp_path: Path) -> None:
    engine = sa.create_engine(sqlite_url)
    _fill(engine)
    transfer = plan_transfer(QuerySource(engine, "SELECT * FROM src"), _table(engine), POLICY)
    assert isinstance(transfer.source, SqlSource) and not transfer.copy_text
    assert transfer.arrow_batches == native.available()  # record batches for the C engine
    batches = list(transfer.batches(key_at_hand=True))
    assert [type(b).__name__ for b in batches] == ["RecordBatch" if native.available() else "dict"]
    assert [type(b) for b in plan_transfer(QuerySource(engine, "SELECT * FROM src"), _table(engine), POLICY)
            .batches(key_at_hand=False)] == [dict]  # a key in Vault Transit: Python values
    assert not plan_transfer(QuerySource(engine, "SELECT * FROM src"), _table(engine), None).arrow_batches  # reversal
    (tmp_path / "in.csv").write_text("pid,ward\nP1,a\n")
    out = tmp_path / "out.csv"
    transfer = plan_transfer(CsvSource(tmp_path / "in.csv"), FileDestination(str(out)), POLICY)
    # files travel as Arrow record batches, which their sinks write as they are
    assert transfer.arrow and not transfer.copy_text
    assert [b.column("pid").to_pylist() for b in transfer.batches(key_at_hand=True)] == [["P1"]]
    rows = Rows({"pid": ["P1"]})
    assert not plan_transfer(rows, FileDestination(str(out)), POLICY).arrow  # a source without record batches
    assert not plan_transfer(CsvSource(tmp_path / "in.csv"), SinkFactory(lambda c, conn: Collect()), POLICY).arrow
    sink = transfer.open_sink(["pid", "ward"], None)  # type: ignore[arg-type]
    sink.write({"pid": ["x"], "ward": ["a"]})
    sink.commit()
    assert out.read_text().splitlines() == ["pid,ward", "x,a"]


def test_an_open_source_and_a_sink_factory_are_used_as_they_are() -> None:
    rows, collected = Rows({"pid": ["P1"]}), Collect()
    opened: list[Any] = []
    transfer = plan_transfer(rows, SinkFactory(lambda columns, conn: opened.append(columns) or collected), POLICY)
    assert transfer.source is rows and not transfer.copy_text
    assert transfer.open_sink(["pid"], None) is collected and opened == [["pid"]]  # type: ignore[arg-type]


def test_a_separate_transaction_commits_on_its_own_and_a_shared_one_with_the_caller(tmp_path: Path) -> None:
    store = sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}")
    other = sa.create_engine(f"sqlite:///{tmp_path / 'target.db'}")
    for engine in (store, other):  # (pysqlite runs DDL outside the transaction: the tables exist already)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE dst (pid text)"))
    separate = plan_transfer(Rows({"pid": ["P1"]}), TableDestination(TableTarget("dst"), SeparateTransaction(other)),
                             POLICY)
    shared = plan_transfer(Rows({"pid": ["P1"]}), TableDestination(TableTarget("dst"), SharedTransaction(store)),
                           POLICY)
    with store.connect() as conn, conn.begin() as txn:
        for transfer in (separate, shared):
            sink = transfer.open_sink(["pid"], conn)
            sink.write({"pid": ["A"]})
            sink.commit()
        txn.rollback()  # the store's transaction (say, the audit's finished row) fails
    with other.connect() as conn:  # the separate target had committed already
        assert conn.execute(sa.text("SELECT pid FROM dst")).scalars().all() == ["A"]
    with store.connect() as conn:  # the shared one rolled back with the store
        assert conn.execute(sa.text("SELECT count(*) FROM dst")).scalar() == 0


# --- creating the target before the writers start (mapped key ranges) ---------------------------
def _range(engine: sa.Engine, lo: int, hi: int, table: str = "dst") -> TableDestination:
    return TableDestination(TableTarget(table, mode="replace_partition", partition_column="id", partition_start=lo,
                                        partition_end=hi), SharedTransaction(engine))


def _column_types(engine: sa.Engine, table: str) -> list[tuple[str, str]]:
    return [(c["name"], str(c["type"])) for c in sa.inspect(engine).get_columns(table)]


def _write_range(engine: sa.Engine, conn: sa.Connection, lo: int, hi: int) -> Any:
    """Open the range's sink in ``conn``'s transaction and write the source's rows of ``[lo, hi)`` into it."""
    transfer = plan_transfer(QuerySource(engine, f"SELECT * FROM src WHERE id >= {lo} AND id < {hi}"),
                             _range(engine, lo, hi), POLICY)
    sink = transfer.open_sink(transfer.columns, conn)
    for batch in transfer.batches(key_at_hand=False):
        sink.write(batch)
    return sink


@pytest.mark.postgres
def test_range_writers_of_a_new_target_wait_for_the_one_that_creates_it(pg_url: str) -> None:
    """What the creation beforehand is for: the first writer of a new table creates it in its own run's
    transaction, and the next writer waits for that transaction (here: past its lock timeout)."""
    engine = sa.create_engine(pg_url)
    _fill(engine)
    with engine.connect() as first, engine.connect() as second, first.begin():
        _write_range(engine, first, 1, 2)
        with second.begin():
            second.execute(sa.text("SET LOCAL lock_timeout = '500ms'"))
            with pytest.raises(PseudonymiseError, match="55P03"):  # lock_not_available: it waited on the creator
                _write_range(engine, second, 2, 4)
    engine.dispose()


@pytest.mark.postgres
def test_a_target_created_beforehand_lets_range_writers_run_side_by_side(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    whole = plan_transfer(QuerySource(engine, "SELECT * FROM src"), _range(engine, 1, 4), POLICY)
    assert whole.create_target(POLICY) is True
    assert whole.create_target(POLICY) is False  # there already: left as it is
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dst")).scalar() == 0  # no row written
    with engine.connect() as first, engine.connect() as second, first.begin():
        _write_range(engine, first, 1, 2).commit()
        with second.begin():  # the first writer's transaction is still open: no wait, no timeout
            second.execute(sa.text("SET LOCAL lock_timeout = '500ms'"))
            _write_range(engine, second, 2, 4).commit()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, pid IS NOT NULL, ward FROM dst ORDER BY id")).all() == \
            [(1, True, "a"), (2, True, None), (3, False, "c")]
    # the schema a one-task run gives a new target: pseudonymised columns text, the others the source's types
    with engine.begin() as conn:
        one = plan_transfer(QuerySource(engine, "SELECT * FROM src"),
                            TableDestination(TableTarget("dst_one", mode="replace"), SharedTransaction(engine)), POLICY)
        sink = one.open_sink(one.columns, conn)
        for batch in one.batches(key_at_hand=False):
            sink.write(batch)
        sink.commit()
    assert _column_types(engine, "dst") == _column_types(engine, "dst_one") == \
        [("id", "INTEGER"), ("pid", "TEXT"), ("ward", "TEXT")]
    engine.dispose()


def test_create_target_on_the_generic_path_takes_the_types_a_run_would(sqlite_url: str, tmp_path: Path) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id integer, pid text, born date, ward text)"))
        conn.execute(sa.text("INSERT INTO src VALUES (1, '11', '2001-02-03', 'a'), (2, NULL, NULL, NULL)"))
    query = "SELECT id, pid, date(born) AS born, ward FROM src"
    prepared = plan_transfer(QuerySource(engine, query), _range(engine, 1, 3), POLICY)
    assert prepared.create_target(POLICY) is True
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dst")).scalar() == 0
    with engine.begin() as conn:
        one = plan_transfer(QuerySource(engine, query),
                            TableDestination(TableTarget("dst_one", mode="replace"), SharedTransaction(engine)), POLICY)
        sink = one.open_sink(one.columns, conn)
        for batch in one.batches(key_at_hand=False):
            sink.write(batch)
        sink.commit()
    assert _column_types(engine, "dst") == _column_types(engine, "dst_one")
    with pytest.raises(PolicyError, match="needs a target table"):
        plan_transfer(QuerySource(engine, query), FileDestination(str(tmp_path / "out.csv")), POLICY) \
            .create_target(POLICY)
    engine.dispose()
