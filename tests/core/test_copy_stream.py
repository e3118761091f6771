"""The PostgreSQL streaming path end to end: COPY out, pseudonymise, COPY in, with writes on a background thread.

Kept columns travel as COPY text (never parsed), pseudonymised ones as values; the target must equal
the source but for the pseudonyms, whatever the text holds (tabs, newlines, backslashes, NULLs).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.copytext import CopyText
from pseudonymise.core.errors import DataIOError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, TableTarget
from pseudonymise.core.use import GivenToken

from tests import reference

pytestmark = pytest.mark.postgres
ROWS = 2_345


def _fill(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id bigint PRIMARY KEY, pid text, note text, d date, u uuid, b boolean)"))
        conn.execute(sa.text("INSERT INTO src VALUES (:id, :pid, :note, :d, :u, :b)"), [
            {"id": i, "pid": None if i % 7 == 0 else f"P{i % 300}" + ("\t\\x" if i % 11 == 0 else ""),
             "note": None if i % 5 == 0 else f"n\t{i}\n\\N é", "d": dt.date(2026, 1, 1 + i % 28),
             "u": uuid.UUID(int=i), "b": i % 2 == 0} for i in range(1, ROWS + 1)])


def _source(engine: sa.Engine, batch_size: int = 100) -> PostgresCopySource:
    source = PostgresCopySource(engine, "SELECT * FROM src ORDER BY id", batch_size=batch_size)
    source.carry_as_text(["id", "note", "d", "u", "b"])
    return source


def _run(url: str, issuer: Issuer, project: str, source: Any, policy: ColumnPolicy | None = None) -> Any:
    engine = sa.create_engine(url)
    target = TableTarget("dst", mode="replace")
    policy = policy or ColumnPolicy.pseudonymise("pid", default="keep")
    sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, use_copy=True, pseudonymised=["pid"],
                                                      type_names=getattr(source, "type_names", None)), copy_text=True)
    return run_pseudonymisation(Store(engine), GivenToken(issuer.issue(project, "pseudonymisation"), issuer.public_keys()),
                                policy, plan_transfer(source, sink, policy))


def test_kept_columns_come_as_copy_text_in_exact_batches(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    batches = list(_source(engine, batch_size=1000).batches())
    assert [len(b["id"]) for b in batches] == [1000, 1000, 345]
    first = batches[0]
    assert isinstance(first["note"], CopyText) and not isinstance(first["pid"], CopyText)
    assert first["note"][0] == "n\\t1\\n\\\\N é"  # still escaped
    assert first["pid"][10] == "P11\t\\x"  # decoded
    assert first["note"][4] == "\\N" and first["pid"][6] is None


@pytest.mark.parametrize("project", ["research-b", "research-a"], ids=["irreversible", "reversible"])
def test_target_equals_source_but_for_the_pseudonyms(pg_url: str, issuer: Issuer, project: str) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    summary = _run(pg_url, issuer, project, _source(engine))
    assert summary.counts["rows_out"] == ROWS
    with engine.connect() as conn:
        src = conn.execute(sa.text("SELECT * FROM src ORDER BY id")).all()
        dst = conn.execute(sa.text("SELECT * FROM dst ORDER BY id")).all()
    expected = reference.token_pseudonyms(issuer.issue(project, "pseudonymisation"), [r.pid for r in src])
    assert [r.pid for r in dst] == expected
    assert [(r.id, r.note, r.d, r.u, r.b) for r in dst] == [(r.id, r.note, r.d, r.u, r.b) for r in src]
    if project == "research-a":
        distinct = len({r.pid for r in src if r.pid is not None})
        assert summary.counts["escrow_rows"] == distinct  # one per pseudonym, across the batches


def test_stopping_early_leaves_the_pool_usable(pg_url: str) -> None:
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    _fill(engine)
    batches = _source(engine, batch_size=10).batches()
    next(batches)
    batches.close()  # the consumer stops: the COPY is cancelled and its connection discarded
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM src")).scalar_one() == ROWS


def test_a_failing_query_is_a_clear_error(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    source = PostgresCopySource(engine, "SELECT id, 1 / (id - 2000) AS x FROM src ORDER BY id", batch_size=100)
    with pytest.raises(DataIOError, match="DivisionByZero"):
        for _ in source.batches():
            pass


class _FailingSink:
    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def write(self, batch: dict[str, list[Any]]) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise DataIOError("the target broke")
        self.inner.write(batch)

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


def test_a_failed_background_write_fails_the_run_and_writes_nothing(pg_url: str, issuer: Issuer) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE dst AS SELECT * FROM src WHERE id < 10"))
    source = _source(engine)
    target = TableTarget("dst", mode="replace")
    with pytest.raises(DataIOError, match="the target broke"):
        policy = ColumnPolicy.pseudonymise("pid", default="keep")
        run_pseudonymisation(
            Store(engine), GivenToken(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()), policy,
            plan_transfer(source, SinkFactory(
                lambda cols, conn: _FailingSink(target.sink(conn, cols, use_copy=True, pseudonymised=["pid"]), 3)),
                policy))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dst")).scalar_one() == 9  # as it was
        assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_escrow")).scalar_one() == 0
        outcomes = [r[0] for r in conn.execute(sa.text("SELECT outcome FROM pseudonymise_audit ORDER BY seq"))]
    assert outcomes == ["started", "failed"]


def test_a_new_target_created_ahead_of_the_rows_is_gone_when_the_run_fails(pg_url: str, issuer: Issuer) -> None:
    """The writer creates a new target before the first batch is read (its types are the source's declared ones);
    a source that fails later takes it back with the run's transaction: nothing half written, the failure audited."""
    engine = sa.create_engine(pg_url)
    _fill(engine)
    source = PostgresCopySource(engine, "SELECT id, pid, 1 / (id - 2000) AS x FROM src ORDER BY id", batch_size=100)
    with pytest.raises(DataIOError, match="DivisionByZero"):
        _run(pg_url, issuer, "research-b", source)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('dst')")).scalar() is None
        assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_write_lock")).scalar_one() == 0
        outcomes = [r[0] for r in conn.execute(sa.text("SELECT outcome FROM pseudonymise_audit ORDER BY seq"))]
    assert outcomes == ["started", "failed"]


def test_a_new_target_gets_the_sources_declared_types(pg_url: str, issuer: Issuer) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    _run(pg_url, issuer, "research-b", _source(engine))
    with engine.connect() as conn:
        types = dict(conn.execute(sa.text(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'dst'::regclass "
            "AND attnum > 0 AND NOT attisdropped")).all())
    assert types == {"id": "bigint", "pid": "text", "note": "text", "d": "date", "u": "uuid", "b": "boolean"}


class _FirstBlockWaitsForTheTarget(PostgresCopySource):
    """Holds its first block back until another session sees the run's transaction holding a table it created
    (an exclusive lock on a relation not yet visible to others): created before any row reached the engine."""

    created_first: bool | None = None

    def _wait(self, items: Iterator[Any]) -> Iterator[Any]:
        first = next(items)
        deadline = time.monotonic() + 10
        with self.engine.connect() as conn:
            while not (found := conn.execute(sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND mode = 'AccessExclusiveLock' "
                    "AND pid <> pg_backend_pid() AND relation NOT IN (SELECT oid FROM pg_class)")).scalar()) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
        self.created_first = bool(found)
        yield first
        yield from items

    def copy_blocks(self) -> Iterator[Any]:
        return self._wait(super().copy_blocks())

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        return self._wait(super().batches())


def test_the_writer_creates_a_new_target_before_the_first_batch_is_pseudonymised(pg_url: str, issuer: Issuer) -> None:
    engine = sa.create_engine(pg_url)
    _fill(engine)
    source = _FirstBlockWaitsForTheTarget(engine, "SELECT * FROM src ORDER BY id", batch_size=100)
    source.carry_as_text(["id", "note", "d", "u", "b"])
    assert _run(pg_url, issuer, "research-b", source).counts["rows_out"] == ROWS
    assert source.created_first is True
