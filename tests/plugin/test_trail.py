"""Reading the audit for the pages: uses, daily counts, rows per project, and audit tables of an earlier release."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store
from pseudonymise.plugin.access import DagScope
from pseudonymise.plugin.trail import Trail, TrailFilter, window

from tests.plugin.conftest import crashed_use, task_use


def test_an_audit_table_of_an_earlier_release_is_read_and_extended(tmp_path: Path, issuer: Issuer) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = AuditLog(sa.create_engine(url))
    old.create()
    use = AuditUse(operation="pseudonymise", project="research-a", token_jti="00000000-0000-4000-8000-000000000001")
    old.start(use)
    old.finish(use, "success", counts={"rows_in": 1, "rows_out": 1})
    with old.engine.begin() as conn:  # the table as the release before token_expires_at made it
        conn.execute(sa.text("ALTER TABLE pseudonymise_audit DROP COLUMN token_expires_at"))
        conn.execute(sa.text("ALTER TABLE pseudonymise_audit DROP COLUMN retention_until"))

    store = Store(sa.create_engine(url))
    store.create()
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("pseudonymise_audit")}
    assert {"token_expires_at", "retention_until"} <= columns
    task_use(store, issuer.issue("research-a", "pseudonymisation"), issuer, dag_id="d", task_id="t", run_id="r")
    result = store.audit.verify()
    assert result.ok and result.rows_checked == 4
    tokens = Trail(store, DagScope()).tokens(datetime.now(UTC), timedelta(days=14))
    assert sorted(t.expires_at is not None for t in tokens) == [False, True]


def test_uses_pair_started_and_finished_rows(tmp_path: Path, issuer: Issuer) -> None:
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}"))
    token = issuer.issue("research-a", "pseudonymisation")
    done = task_use(store, token, issuer, dag_id="d", task_id="t", run_id="r", patients=("A", None, "B"))
    crashed = crashed_use(store, dag_id="d", task_id="t", run_id="r2")
    total, uses = Trail(store, DagScope()).uses(TrailFilter())
    assert total == 2
    assert [(u.started["use_id"], u.outcome) for u in uses] == [(crashed, "incomplete"), (done, "success")]
    assert uses[1].finished is not None and uses[1].last["rows_null"] == 1 and uses[1].started["rows_in"] is None
    assert uses[0].last is uses[0].started
    total, page = Trail(store, DagScope()).uses(TrailFilter(), offset=1, limit=1)
    assert total == 2 and [u.started["use_id"] for u in page] == [done]


def test_daily_uses_and_rows_per_project(tmp_path: Path, issuer: Issuer) -> None:
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}"))
    token = issuer.issue("research-a", "pseudonymisation")
    for run in range(3):
        task_use(store, token, issuer, dag_id="d", task_id="t", run_id=f"r{run}", patients=("A", "B", "C"))
    crashed_use(store, dag_id="d", task_id="t", run_id="r9")
    old = AuditUse(operation="pseudonymise", project="research-a")
    store.audit.start(old)
    store.audit.finish(old, "failed")
    t = store.audit.table
    with store.engine.begin() as conn:  # move the failed use ten days back (the chain no longer matters here)
        conn.execute(sa.update(t).where(t.c.use_id == old.use_id)
                     .values(recorded_at=datetime.now(UTC) - timedelta(days=10)))
    trail = Trail(store, DagScope())
    since, until = window(7, datetime.now(UTC))
    days = trail.daily_uses(since, until)
    assert len(days) == 7 and days[-1].day == datetime.now(UTC).date()
    assert days[-1].counts == {"success": 3, "incomplete": 1} and sum(d.total for d in days[:-1]) == 0
    since30, until30 = window(30, datetime.now(UTC))
    assert sum(d.counts.get("failed", 0) for d in trail.daily_uses(since30, until30)) == 1
    assert trail.rows_by_project(since, until) == [("research-a", 9, 9)]
