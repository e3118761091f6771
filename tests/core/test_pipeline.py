"""The audited flows (core/pipeline.py) end to end on SQLite and PostgreSQL, through their public functions.

Pseudonymise, secondary, reverse, purge and re-key: what each writes (target rows, escrow rows), the
summary it returns, and its audit rows; and that a run is one transaction of the store's database: a
source or sink failing at any point leaves no target row, no escrow row and no ``success``, only the use
audited ``failed``. Pseudonyms are checked against docs/design.md §4 written out again (:mod:`tests.reference`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.errors import DatabaseIOError, EscrowNotFoundError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import RunSummary, Store, run_pseudonymisation, run_purge, run_rekey, run_reversal
from pseudonymise.core.plan import QuerySource, SharedTransaction, SinkFactory, TableDestination, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken, RunContext
from sqlalchemy.engine import Connection

from tests import reference
from tests.core.conftest import Collect, Rows

IDS = list(range(1, 9))
PIDS = ["P1", "P2", "P1", None, "p3 ", "P2", "Ärzte", "P4"]
WARDS = ["cardiology", "oncology", None, "general", "general", "icu", "icu", "oncology"]
Opener = Callable[[list[str], Connection], Any]


class Batches:
    """A source of several batches (``size`` rows each); with ``fail_at``, raises on reading that batch."""

    def __init__(self, columns: dict[str, list[Any]], size: int, fail_at: int | None = None) -> None:
        self.columns, self._data, self._size, self._fail_at = list(columns), columns, size, fail_at

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        rows = len(next(iter(self._data.values())))
        for n, start in enumerate(range(0, rows, self._size)):
            if n == self._fail_at:
                raise RuntimeError("the source went away")
            yield {k: v[start:start + self._size] for k, v in self._data.items()}


class FailingSink:
    """Wraps a sink; raises on its ``fail_at``-th write (1-based) or, with ``fail_at=0``, on commit."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner, self.fail_at, self.writes, self.aborted = inner, fail_at, 0, False

    def write(self, batch: dict[str, list[Any]]) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise RuntimeError("the target refused the batch")
        self.inner.write(batch)

    def commit(self) -> None:
        if self.fail_at == 0:
            raise RuntimeError("the target refused the commit")
        self.inner.commit()

    def abort(self) -> None:
        self.aborted = True
        self.inner.abort()


def _visits() -> dict[str, list[Any]]:
    return {"id": list(IDS), "pid": list(PIDS), "ward": list(WARDS)}


def _table(name: str) -> Opener:
    target = TableTarget(name, mode="replace")
    return lambda columns, conn: target.sink(conn, columns)


def _pseudonymise(store: Store, raw: str, issuer: Issuer, source: Any, sink: Opener, *,
                  policy: ColumnPolicy | None = None, run: RunContext | None = None, **labels: Any) -> RunSummary:
    policy = policy or ColumnPolicy.pseudonymise("pid", default="keep")
    return run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy,
                                plan_transfer(source, SinkFactory(sink), policy, **labels), run)


def _reverse(store: Store, raw: str, issuer: Issuer, source: Any, sink: Opener, *, run: RunContext | None = None,
             **kwargs: Any) -> RunSummary:
    return run_reversal(store, GivenToken(raw, issuer.public_keys()), ["pid"], plan_transfer(source, SinkFactory(sink)),
                        run, **kwargs)


def _select(engine: sa.Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


def _count(engine: sa.Engine, table: str) -> int:
    """Rows of ``table``; 0 when it does not exist."""
    if not sa.inspect(engine).has_table(table):
        return 0
    return int(_select(engine, f"SELECT count(*) FROM {table}")[0][0])


def _audit(store: Store) -> list[dict[str, Any]]:
    rows = list(store.audit.iter_rows())
    assert store.audit.verify().ok
    return rows


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["operation"], r["event"], r["outcome"]) for r in rows]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(sa.create_engine(db_url))
    yield store
    store.engine.dispose()


# --- pseudonymise -------------------------------------------------------------------------------------
def test_pseudonymise_writes_target_escrow_and_audit(store: Store, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    claims = reference.claims(raw)
    summary = _pseudonymise(store, raw, issuer, Rows(_visits()), _table("visits"), source_label="hospital:visits",
                            target_label="table:visits", run=RunContext(dag_id="daily", map_index=-1))
    distinct = len({p for p in PIDS if p is not None})
    counts = {"rows_in": 8, "rows_out": 8, "nulls": 1, "values_pseudonymised": 7, "escrow_rows": distinct}
    assert (summary.operation, summary.project, summary.token_jti, summary.columns) == (
        "pseudonymise", "research-a", claims["jti"], ["id", "pid", "ward"])
    assert summary.token_fingerprint == hashlib.sha256(raw.encode()).hexdigest()[:16]
    assert summary.counts == counts
    assert _select(store.engine, "SELECT id, pid, ward FROM visits ORDER BY id") == list(
        zip(IDS, reference.token_pseudonyms(raw, PIDS), WARDS, strict=True))
    assert _count(store.engine, "pseudonymise_escrow") == distinct  # one row per pseudonym
    audit = _audit(store)
    assert _pairs(audit) == [("pseudonymise", "started", "started"), ("pseudonymise", "finished", "success")]
    finished = audit[1]
    assert {r["use_id"] for r in audit} == {summary.use_id}
    assert (finished["rows_in"], finished["rows_out"], finished["rows_null"], finished["values_pseudonymised"],
            finished["escrow_rows"]) == (8, 8, 1, 7, distinct)
    assert (finished["source"], finished["target"], finished["dag_id"]) == ("hospital:visits", "table:visits", "daily")
    assert json.loads(finished["columns"]) == ["pid"]
    details = json.loads(finished["details"])
    assert details["key_version"] == 1 and len(details["escrow_batches"]) >= 1


def test_irreversible_project_writes_no_escrow(store: Store, issuer: Issuer) -> None:
    raw = issuer.issue("research-b", "pseudonymisation")
    summary = _pseudonymise(store, raw, issuer, Rows(_visits()), _table("visits"))
    assert summary.counts["escrow_rows"] == 0 and _count(store.engine, "pseudonymise_escrow") == 0
    assert [r[0] for r in _select(store.engine, "SELECT pid FROM visits ORDER BY id")] == \
        reference.token_pseudonyms(raw, PIDS)
    assert "escrow_batches" not in json.loads(_audit(store)[1]["details"])


def test_secondary_re_pseudonymises_first_level_pseudonyms(store: Store, issuer: Issuer) -> None:
    first = Collect()
    _pseudonymise(store, issuer.issue("research-a", "pseudonymisation"), issuer, Rows(_visits()),
                  lambda columns, conn: first)
    escrow_before = _count(store.engine, "pseudonymise_escrow")
    raw = issuer.issue("vendor-x", "secondary", source_project="research-a")
    policy = ColumnPolicy.pseudonymise("pid", default="keep")
    summary = run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy,
                                   plan_transfer(Rows(first.rows), SinkFactory(_table("vendor_visits")), policy),
                                   secondary=True)
    assert (summary.operation, summary.project) == ("secondary", "vendor-x")
    assert summary.counts == {"rows_in": 8, "rows_out": 8, "nulls": 1, "values_pseudonymised": 7, "escrow_rows": 0}
    assert [r[0] for r in _select(store.engine, "SELECT pid FROM vendor_visits ORDER BY id")] == \
        reference.token_pseudonyms(raw, first.rows["pid"])
    assert _count(store.engine, "pseudonymise_escrow") == escrow_before
    assert _pairs(_audit(store))[2:] == [("secondary", "started", "started"), ("secondary", "finished", "success")]


# --- reverse ------------------------------------------------------------------------------------------
def test_reverse_reveals_the_originals_and_counts_the_unknown(store: Store, issuer: Issuer) -> None:
    out = Collect()
    _pseudonymise(store, issuer.issue("research-a", "pseudonymisation"), issuer, Rows(_visits()),
                  lambda columns, conn: out)
    asked = [*out.rows["pid"], "not-a-pseudonym"]
    revealed = Collect()
    summary = _reverse(store, issuer.issue("research-a", "reverse"), issuer,
                       Rows({"id": [*IDS, 9], "pid": asked}), lambda columns, conn: revealed,
                       run=RunContext(triggered_by="alice"))
    assert revealed.rows["pid"] == [*PIDS, None] and revealed.rows["id"] == [*IDS, 9]
    assert revealed.committed and not revealed.aborted
    assert summary.operation == "reverse" and summary.columns == ["pid"]
    assert summary.counts == {"rows_in": 9, "rows_out": 9, "nulls": 1, "values_pseudonymised": 5,
                              "escrow_rows": 0, "not_found": 1}
    audit = _audit(store)
    assert _pairs(audit)[2:] == [("reverse", "started", "started"), ("reverse", "finished", "success")]
    assert audit[2]["triggered_by"] == audit[3]["triggered_by"] == "alice"
    assert json.loads(audit[3]["details"]) == {"values_revealed": 5, "not_found": 1}
    for value in ("P1", "P2", "Ärzte"):
        assert value not in json.dumps(audit, default=str)


def test_reverse_requiring_all_refuses_an_unknown_pseudonym_and_writes_nothing(store: Store, issuer: Issuer) -> None:
    out = Collect()
    _pseudonymise(store, issuer.issue("research-a", "pseudonymisation"), issuer, Rows(_visits()),
                  lambda columns, conn: out)
    sink = Collect()
    with pytest.raises(EscrowNotFoundError, match=r"1 of the \d+ distinct pseudonym"):
        _reverse(store, issuer.issue("research-a", "reverse"), issuer,
                 Rows({"pid": [*out.rows["pid"], "not-a-pseudonym"]}), lambda columns, conn: sink, require_all=True)
    assert sink.rows == {} and sink.aborted and not sink.committed
    audit = _audit(store)
    assert _pairs(audit)[2:] == [("reverse", "started", "started"), ("reverse", "finished", "failed")]
    assert audit[3]["error_class"] == "EscrowNotFoundError"


# --- purge --------------------------------------------------------------------------------------------
def test_purge_deletes_escrow_past_retention_and_audits_it(store: Store, issuer: Issuer) -> None:
    _pseudonymise(store, issuer.issue("research-a", "pseudonymisation"), issuer, Rows(_visits()), _table("visits"))
    end = issuer.project("research-a").retention_until
    early = run_purge(store, project="research-a", now=end - timedelta(seconds=1))
    late = run_purge(store, RunContext(triggered_by="ops"), project="research-a", now=end + timedelta(seconds=1))
    assert (early.counts, late.counts) == ({"escrow_rows": 0}, {"escrow_rows": 5})
    assert (late.operation, late.project, late.token_jti, late.columns) == ("purge", "research-a", None, [])
    assert _count(store.engine, "pseudonymise_escrow") == 0
    audit = _audit(store)
    purges = [r for r in audit if r["operation"] == "purge"]
    assert [(r["event"], r["outcome"], r["escrow_rows"]) for r in purges] == [
        ("started", "started", None), ("finished", "success", 0), ("started", "started", None),
        ("finished", "success", 5)]
    assert purges[3]["use_id"] == late.use_id and purges[3]["triggered_by"] == "ops"


# --- re-key -------------------------------------------------------------------------------------------
def test_rekey_gives_every_row_the_new_keys_pseudonym_under_two_audited_uses(store: Store, issuer: Issuer) -> None:
    _pseudonymise(store, issuer.issue("research-a", "pseudonymisation"), issuer, Rows(_visits()), _table("visits"))
    issuer.rotate_key("research-a")
    new = issuer.issue("research-a", "pseudonymisation")
    keys = issuer.public_keys()
    summary = run_rekey(store, GivenToken(issuer.issue("research-a", "reverse"), keys), GivenToken(new, keys),
                        "visits", {"pid": ""})
    assert summary.operation == "rekey" and summary.token_jti == reference.claims(new)["jti"]
    assert summary.counts["values_pseudonymised"] == 5 and summary.counts["escrow_rows"] == 5
    assert [r[0] for r in _select(store.engine, "SELECT pid FROM visits ORDER BY id")] == \
        reference.token_pseudonyms(new, PIDS)
    audit = _audit(store)[2:]
    assert _pairs(audit) == [("rekey", "started", "started"), ("rekey", "started", "started"),
                             ("rekey", "finished", "success"), ("rekey", "finished", "success")]
    assert [r["token_kind"] for r in audit] == ["reverse", "pseudonymisation", "reverse", "pseudonymisation"]
    assert json.loads(audit[2]["details"]) == {"rekey_to_key_version": 2}
    assert json.loads(audit[3]["details"])["key_version"] == 2


# --- one transaction ------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["source-second-batch", "sink-first-write", "sink-third-write", "sink-commit"])
def test_a_failure_anywhere_leaves_nothing_but_an_audited_failed(store: Store, issuer: Issuer, failure: str) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    source = Batches(_visits(), size=3, fail_at=1 if failure == "source-second-batch" else None)
    fail_at = {"source-second-batch": -1, "sink-first-write": 1, "sink-third-write": 3, "sink-commit": 0}[failure]
    sinks: list[FailingSink] = []
    target = TableTarget("visits", mode="append")

    def sink(columns: list[str], conn: Connection) -> FailingSink:
        sinks.append(FailingSink(target.sink(conn, columns), fail_at))
        return sinks[-1]

    with pytest.raises(RuntimeError, match=r"the source went away|the target refused"):
        _pseudonymise(store, raw, issuer, source, sink)
    assert len(sinks) == 1 and sinks[0].aborted
    assert _count(store.engine, "visits") == 0
    assert _count(store.engine, "pseudonymise_escrow") == 0
    audit = _audit(store)
    assert _pairs(audit) == [("pseudonymise", "started", "started"), ("pseudonymise", "finished", "failed")]
    assert audit[1]["error_class"] == "RuntimeError"
    assert "P1" not in json.dumps(audit, default=str)


def test_reversal_whose_sink_fails_reveals_nothing_and_is_audited_failed(store: Store, issuer: Issuer) -> None:
    out = Collect()
    _pseudonymise(store, issuer.issue("research-a", "pseudonymisation"), issuer, Rows(_visits()),
                  lambda columns, conn: out)
    failing = FailingSink(Collect(), fail_at=1)
    with pytest.raises(RuntimeError, match="the target refused"):
        _reverse(store, issuer.issue("research-a", "reverse"), issuer, Rows({"pid": out.rows["pid"]}),
                 lambda columns, conn: failing)
    assert failing.aborted and failing.inner.rows == {}
    assert _pairs(_audit(store))[2:] == [("reverse", "started", "started"), ("reverse", "finished", "failed")]


# --- the generic SQL path: a SQLite source read from its cursor, a table written in the run's transaction ------
DAYS = ["2026-11-03", "2026-11-03", "2026-11-03", "2026-11-04", "2026-11-04", "2026-11-04", "2026-11-05", "2026-11-05"]
COUNTS = [10, None, -3, 2**40, 0, 7, None, 12]


@pytest.fixture
def hospital(tmp_path: Any) -> sa.Engine:
    """A SQLite source of visits: text with NULLs, NFD-free non-ASCII and a trailing space, integers, ISO dates."""
    import sqlite3

    path = tmp_path / "hospital.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE visits (id INTEGER PRIMARY KEY, pid TEXT, n INTEGER, day DATE, ward TEXT)")
        conn.executemany("INSERT INTO visits VALUES (?, ?, ?, ?, ?)", zip(IDS, PIDS, COUNTS, DAYS, WARDS, strict=True))
    return sa.create_engine(f"sqlite:///{path}")


def _sql_run(store: Store, raw: str, issuer: Issuer, hospital: sa.Engine, target: TableTarget, *,
             start: str = "2026-11-01", end: str = "2026-12-01", table: str = "visits") -> RunSummary:
    policy = ColumnPolicy.pseudonymise("pid", default="keep")
    query = QuerySource(hospital, f"SELECT * FROM {table} WHERE day >= :start AND day < :end ORDER BY id",
                        {"start": start, "end": end}, batch_size=3)
    transfer = plan_transfer(query, TableDestination(target, SharedTransaction(store.engine)), policy, use_copy=False)
    assert transfer.arrow_batches == native.available()  # Arrow record batches to the C engine
    return run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy, transfer)


def _expected(raw: str, start: str = "2026-11-01", end: str = "2026-12-01") -> list[tuple[Any, ...]]:
    """The source rows of ``[start, end)`` with the pseudonyms docs/design.md §4 gives (tests.reference)."""
    rows = [r for r in zip(IDS, PIDS, COUNTS, DAYS, WARDS, strict=True) if start <= r[3] < end]
    return [(i, p, n, d, w) for (i, _, n, d, w), p in
            zip(rows, reference.token_pseudonyms(raw, [r[1] for r in rows]), strict=True)]


@pytest.mark.parametrize("mode", ["append", "replace_partition", "upsert", "replace"])
def test_generic_sql_path_writes_every_mode_and_reruns_identically(store: Store, issuer: Issuer,
                                                                   hospital: sa.Engine, mode: str) -> None:
    """SQLite to SQLite, and SQLite to PostgreSQL with ``use_copy=False`` (its INSERT path): every write mode,
    run twice over the same interval as a backfill does, in batches smaller than the run."""
    raw = issuer.issue("research-b", "pseudonymisation")
    options: dict[str, Any] = {"replace_partition": {"partition_column": "day", "partition_start": "2026-11-04",
                                                     "partition_end": "2026-11-05"},
                               "upsert": {"upsert_key": ["id"]}}.get(mode, {})
    interval = {"start": "2026-11-04", "end": "2026-11-05"} if mode == "replace_partition" else {}
    if mode == "replace_partition":  # the other days are there already, and stay
        _sql_run(store, raw, issuer, hospital, TableTarget("out", mode="append"))
    summaries = [_sql_run(store, raw, issuer, hospital, TableTarget("out", mode=mode, **options), **interval)
                 for _ in range(2)]
    got = _select(store.engine, "SELECT id, pid, n, day, ward FROM out ORDER BY id")
    once = _expected(raw)
    assert got == (sorted(once * 2) if mode == "append" else once)
    rows = 3 if mode == "replace_partition" else 8
    assert [s.counts["rows_out"] for s in summaries] == [rows, rows]
    assert summaries[0].counts["nulls"] == 1  # PIDS[3], of 2026-11-04


def test_generic_sql_path_failing_mid_run_leaves_the_target_as_it_was(sqlite_url: str, issuer: Issuer,
                                                                      hospital: sa.Engine) -> None:
    """The second batch breaks a constraint of the target: the first batch's rows, the replace's deletion
    and the escrow all roll back; the use is audited ``failed`` without the driver's text."""
    store = Store(sa.create_engine(sqlite_url))
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE out (id INTEGER, pid TEXT NOT NULL, n INTEGER, day TEXT, ward TEXT)"))
        conn.execute(sa.text("INSERT INTO out VALUES (0, 'old', 1, '2026-01-01', 'x')"))
    store.create()
    raw = issuer.issue("research-a", "pseudonymisation")
    with pytest.raises(DatabaseIOError, match="IntegrityError"):
        _sql_run(store, raw, issuer, hospital, TableTarget("out", mode="replace"))  # PIDS[3] is NULL: batch 2
    assert _select(store.engine, "SELECT * FROM out") == [(0, "old", 1, "2026-01-01", "x")]
    assert _count(store.engine, "pseudonymise_escrow") == 0
    audit = _audit(store)
    assert _pairs(audit)[-1] == ("pseudonymise", "finished", "failed")
    assert "P1" not in json.dumps(audit, default=str)


def test_generic_sql_path_escrow_on_sqlite_is_read_back_by_reversal(sqlite_url: str, issuer: Issuer,
                                                                   hospital: sa.Engine, tmp_path: Any) -> None:
    """A reversible run SQLite to SQLite, then its target read back (the cursor path again) and reversed."""
    store = Store(sa.create_engine(sqlite_url))
    raw = issuer.issue("research-a", "pseudonymisation")
    summary = _sql_run(store, raw, issuer, hospital, TableTarget("out", mode="replace"))
    assert summary.counts["escrow_rows"] == len({p for p in PIDS if p is not None})
    assert _select(store.engine, "SELECT id, pid, n, day, ward FROM out ORDER BY id") == _expected(raw)
    # the pseudonymised table, handed over in a file of its own (a source query open on the audit's own SQLite
    # file keeps its read lock while the audit's started row must commit: that waits, then fails)
    import sqlite3

    shared = tmp_path / "shared.db"
    with sqlite3.connect(shared) as conn:
        conn.execute("CREATE TABLE out (id INTEGER, pid TEXT)")
        conn.executemany("INSERT INTO out VALUES (?, ?)", _select(store.engine, "SELECT id, pid FROM out"))
    query = QuerySource(sa.create_engine(f"sqlite:///{shared}"), "SELECT id, pid FROM out ORDER BY id", batch_size=3)
    revealed = run_reversal(store, GivenToken(issuer.issue("research-a", "reverse"), issuer.public_keys()), ["pid"],
                            plan_transfer(query, TableDestination(TableTarget("revealed", mode="replace"),
                                                                  SharedTransaction(store.engine))))
    assert revealed.counts["not_found"] == 0
    assert _select(store.engine, "SELECT id, pid FROM revealed ORDER BY id") == list(zip(IDS, PIDS, strict=True))


def test_generic_sql_path_takes_a_column_of_mixed_types_as_the_python_engine_does(sqlite_url: str, issuer: Issuer,
                                                                                  tmp_path: Any) -> None:
    """SQLite lets a column hold integers and text: such a batch stays Python values (no Arrow), the others go
    to the C engine as Arrow; every pseudonym is still docs/design.md §4's, an integer's from its decimal digits."""
    import sqlite3

    path = tmp_path / "mixed.db"
    pids: list[Any] = ["P1", None, "P2", 42, "P1", 42, "Ärzte", "P3"]
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE visits (id INTEGER PRIMARY KEY, pid, n INTEGER, day DATE, ward TEXT)")
        conn.executemany("INSERT INTO visits VALUES (?, ?, ?, ?, ?)", zip(IDS, pids, COUNTS, DAYS, WARDS, strict=True))
    store = Store(sa.create_engine(sqlite_url))
    raw = issuer.issue("research-b", "pseudonymisation")
    summary = _sql_run(store, raw, issuer, sa.create_engine(f"sqlite:///{path}"), TableTarget("out", mode="replace"))
    assert summary.counts["values_pseudonymised"] == 7
    assert _select(store.engine, "SELECT id, pid, n, day, ward FROM out ORDER BY id") == list(
        zip(IDS, reference.token_pseudonyms(raw, pids), COUNTS, DAYS, WARDS, strict=True))


def test_an_in_memory_sqlite_store_is_written_from_the_runs_own_thread(issuer: Issuer) -> None:
    """Writes go to a background thread on PostgreSQL and SQLite files; an in-memory SQLite database's
    connection belongs to the thread that opened it, so its run writes in place."""
    store = Store(sa.create_engine("sqlite://"))
    raw = issuer.issue("research-b", "pseudonymisation")
    _pseudonymise(store, raw, issuer, Batches(_visits(), size=3), _table("visits"))
    assert [r[0] for r in _select(store.engine, "SELECT pid FROM visits ORDER BY id")] == \
        reference.token_pseudonyms(raw, PIDS)


def _traced(store: Store) -> list[str]:
    """Every SQL statement SQLite runs for ``store``'s engine, as SQLite reports it (BEGIN and COMMIT included)."""
    statements: list[str] = []
    sa.event.listen(store.engine, "connect", lambda dbapi, _record: dbapi.set_trace_callback(statements.append))
    return statements


def test_a_new_sqlite_store_is_created_in_one_transaction(sqlite_url: str) -> None:
    """pysqlite runs a schema statement outside any transaction (each synced to disk on its own): the store's
    tables and indexes are created between one BEGIN IMMEDIATE and one COMMIT, and a second create only looks."""
    store = Store(sqlite_url)
    statements = _traced(store)
    store.create()
    statements = [s.strip() for s in statements]
    begins = [i for i, s in enumerate(statements) if s.upper().startswith("BEGIN")]
    commits = [i for i, s in enumerate(statements) if s.upper().startswith("COMMIT")]
    creates = [i for i, s in enumerate(statements) if s.upper().startswith("CREATE")]
    assert [statements[i] for i in begins] == ["BEGIN IMMEDIATE"] and len(commits) == 1
    assert len(creates) >= 8 and begins[0] < min(creates) and max(creates) < commits[0]
    names = {r[0] for r in _select(store.engine, "SELECT name FROM sqlite_master")}
    assert {"pseudonymise_audit", "pseudonymise_audit_head", "pseudonymise_audit_checkpoint"} <= names
    assert _select(store.engine, "SELECT id, seq FROM pseudonymise_audit_head") == [(1, 0)]

    again = Store(sqlite_url)
    statements = _traced(again)
    again.create()
    assert statements and not any(s.strip().upper().startswith(("BEGIN", "CREATE", "INSERT", "COMMIT")) for s in statements)


def test_an_existing_sqlite_store_opens_while_another_process_writes(sqlite_url: str) -> None:
    """Opening a store whose tables exist takes no write lock: a run starting while another holds it goes on."""
    Store(sqlite_url).create()
    path = sqlite_url.removeprefix("sqlite:///")
    import sqlite3

    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another run's transaction, holding the write lock
    try:
        store = Store(sa.create_engine(sqlite_url, connect_args={"timeout": 0.2}))
        store.create()  # would raise "database is locked" after 0.2 s if it tried to write
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_failed_sqlite_store_creation_leaves_no_table(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pseudonymise.core.checkpoint import CheckpointTable
    from pseudonymise.core.errors import AuditError

    # A stand-in, because a real disk I/O error cannot be made to happen at exactly this statement: a file size
    # limit (as in tests/airflow/test_faults.py) fails SQLite's first write, before the checkpoint table. The
    # error is the class SQLAlchemy raises for a real one; what is tested is that nothing created before it stays.
    def broken(self: CheckpointTable, within: Connection | None = None) -> None:
        assert within is not None
        within.exec_driver_sql("CREATE TABLE half_made (x)")
        raise sa.exc.OperationalError("CREATE TABLE", {}, Exception("disk I/O error"))

    monkeypatch.setattr(CheckpointTable, "create", broken)
    with pytest.raises(AuditError, match="cannot create the audit and escrow tables"):
        Store(sqlite_url).create()
    assert _select(sa.create_engine(sqlite_url), "SELECT name FROM sqlite_master") == []
