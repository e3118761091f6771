"""Retiring source rows after a verified load (core/retire.py), on SQLite and PostgreSQL.

A real load (run_pseudonymisation of the interval's rows, audited with its DAG, task and data
interval) is what the audit must hold; the source keeps every row whenever the proof is missing or
the interval's rows changed since, and an export is written only together with the deletion.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import DataIOError, RetireRefusedError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import QuerySource, SharedTransaction, TableDestination, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.retire import LoadSelector, SourceInterval, run_retire
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken, RunContext

START, END = datetime(2026, 11, 4, tzinfo=UTC), datetime(2026, 11, 5, tzinfo=UTC)
QUERY = "SELECT id, patient_id, day FROM visits WHERE day >= :s AND day < :e"


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Store:
    """The audit (and the load's target): in the source's database on PostgreSQL, in a file of its own on
    SQLite (one SQLite file cannot be read by the load's cursor and written by its audit at once)."""
    url = f"sqlite:///{tmp_path / 'audit.db'}" if db_url.startswith("sqlite") else db_url
    store = Store(make_engine(url))
    yield store
    store.engine.dispose()


@pytest.fixture
def source(db_url: str) -> sa.Engine:
    """visits: 6 rows on 2026-11-03, 5 on the 4th, 4 on the 5th."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visits (id integer PRIMARY KEY, patient_id text, day date)"))
        rows = [{"id": i, "p": f"P-{i}", "d": day} for i, day in
                enumerate(["2026-11-03"] * 6 + ["2026-11-04"] * 5 + ["2026-11-05"] * 4)]
        conn.execute(sa.text("INSERT INTO visits VALUES (:id, :p, :d)"),
                     [{**r, "d": datetime.fromisoformat(r["d"]).date()} for r in rows])
    yield engine
    engine.dispose()


def _context(task: str, map_index: int = -1) -> RunContext:
    return RunContext(dag_id="daily", task_id=task, run_id="scheduled__2026-11-04", map_index=map_index,
                      try_number=1, data_interval_start=START, data_interval_end=END)


def _load(store: Store, source: sa.Engine, issuer: Issuer, *, where: str = "", map_index: int = -1) -> int:
    """The load of the interval, as PseudonymiseOperator runs it: rows of [START, END) into visits_p."""
    policy = ColumnPolicy.pseudonymise("patient_id", default="keep")
    query = QuerySource(source, QUERY + where, {"s": START.date(), "e": END.date()})
    destination = TableDestination(TableTarget("visits_p", mode="append"), SharedTransaction(store.engine))
    summary = run_pseudonymisation(store, GivenToken(issuer.issue("research-b", "pseudonymisation"),
                                                     issuer.public_keys()),
                                   policy, plan_transfer(query, destination, policy), _context("load", map_index))
    return summary.counts["rows_in"]


def _days(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(d)[:10]: n for d, n in conn.execute(sa.text("SELECT day, count(*) FROM visits GROUP BY day"))}


def _retire(store: Store, source: sa.Engine, **kwargs: Any) -> Any:
    return run_retire(store, source, SourceInterval("visits", "day", START.isoformat(), END.isoformat()),
                      LoadSelector("daily", "load", START.isoformat(), END.isoformat()), _context("retire"), **kwargs)


def _retire_rows(store: Store) -> list[tuple[str, str | None, int | None]]:
    return [(r["outcome"], r["error_class"], r["rows_out"]) for r in store.audit.iter_rows()
            if r["operation"] == "retire" and r["event"] == "finished"]


def test_the_loaded_interval_is_deleted_and_audited(store: Store, source: sa.Engine, issuer: Issuer) -> None:
    assert _load(store, source, issuer) == 5
    summary = _retire(store, source)
    assert summary.counts == {"rows_loaded": 5, "rows_deleted": 5, "rows_exported": 0}
    assert _days(source) == {"2026-11-03": 6, "2026-11-05": 4}
    assert _retire_rows(store) == [("success", None, 5)]
    assert store.audit.verify().ok


def test_without_a_successful_load_nothing_is_deleted(store: Store, source: sa.Engine, issuer: Issuer) -> None:
    with pytest.raises(RetireRefusedError, match=r"no successful 'pseudonymise' load by task daily\.load"):
        _retire(store, source)
    assert _days(source) == {"2026-11-03": 6, "2026-11-04": 5, "2026-11-05": 4}
    assert _retire_rows(store) == [("failed", "RetireRefusedError", None)]


def test_a_row_added_after_the_load_stops_the_retirement(store: Store, source: sa.Engine, issuer: Issuer, tmp_path: Path) -> None:
    _load(store, source, issuer)
    with source.begin() as conn:
        conn.execute(sa.text("INSERT INTO visits VALUES (99, 'P-late', :d)"), {"d": START.date()})
    (tmp_path / "archive").mkdir()
    export = tmp_path / "archive" / "retired.csv"
    with pytest.raises(RetireRefusedError, match=r"holds 6 rows of .* now but the load read 5; nothing deleted"):
        _retire(store, source, export_path=export)
    assert _days(source)["2026-11-04"] == 6
    assert not list(export.parent.iterdir())  # no export, not even a half-written one


def test_a_load_that_read_fewer_rows_is_no_proof(store: Store, source: sa.Engine, issuer: Issuer) -> None:
    _load(store, source, issuer, where=" AND id < 9")  # 3 of the interval's 5 rows
    with pytest.raises(RetireRefusedError, match=r"holds 5 rows .* the load read 3"):
        _retire(store, source)
    assert _days(source)["2026-11-04"] == 5


def test_mapped_loads_are_summed_and_the_latest_success_counts(store: Store, source: sa.Engine, issuer: Issuer) -> None:
    _load(store, source, issuer, where=" AND id < 8", map_index=0)  # ids 6, 7
    _load(store, source, issuer, where=" AND id >= 8", map_index=1)  # ids 8, 9, 10
    _load(store, source, issuer, where=" AND id >= 8", map_index=1)  # a retry of range 1: counted once
    assert _retire(store, source).counts["rows_deleted"] == 5


def test_export_then_delete(store: Store, source: sa.Engine, issuer: Issuer, tmp_path: Path) -> None:
    _load(store, source, issuer)
    export = tmp_path / "archive" / "visits-2026-11-04.csv"
    export.parent.mkdir()
    summary = _retire(store, source, export_path=export)
    assert summary.counts["rows_exported"] == 5
    with export.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == [f"P-{i}" for i in range(6, 11)]
    assert {r["day"][:10] for r in rows} == {"2026-11-04"}
    assert "2026-11-04" not in _days(source)
    [finished] = [r for r in store.audit.iter_rows() if r["operation"] == "retire" and r["event"] == "finished"]
    assert finished["target"] == f"file:{export}" and "P-6" not in str(finished)


def test_an_export_that_cannot_be_published_deletes_nothing(store: Store, source: sa.Engine, issuer: Issuer,
                                                           tmp_path: Path) -> None:
    _load(store, source, issuer)

    def publish(path: str) -> None:
        raise DataIOError("cannot write 's3://bucket/x.csv' (ConnectionError); check the path and storage connection")

    with pytest.raises(DataIOError, match="cannot write"):
        _retire(store, source, export_path=tmp_path / "x.csv", publish=publish)
    assert _days(source)["2026-11-04"] == 5
    assert _retire_rows(store) == [("failed", "DataIOError", None)]


def test_a_missing_table_or_column_is_named(store: Store, source: sa.Engine, issuer: Issuer) -> None:
    _load(store, source, issuer)
    load = LoadSelector("daily", "load", START.isoformat(), END.isoformat())
    with pytest.raises(RetireRefusedError, match="'nope' does not exist"):
        run_retire(store, source, SourceInterval("nope", "day", START.isoformat(), END.isoformat()), load)
    with pytest.raises(RetireRefusedError, match="has no column 'when'"):
        run_retire(store, source, SourceInterval("visits", "when", START.isoformat(), END.isoformat()), load)
