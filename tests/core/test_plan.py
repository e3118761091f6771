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
from pseudonymise.core.errors import UnsupportedTypeError
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
    assert not transfer.copy_text and [b["pid"] for b in transfer.batches(key_at_hand=True)] == [["P1"]]
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
