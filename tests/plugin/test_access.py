"""Which audit rows a user sees: rows of DAGs they may read, of no DAG, and of DAGs Airflow does not know."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditUse
from pseudonymise.core.pipeline import Store
from pseudonymise.plugin.access import DagScope, dag_scope
from pseudonymise.plugin.trail import Trail, TrailFilter, window

from tests.plugin.conftest import Api


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(sa.create_engine(f"sqlite:///{tmp_path}/audit.db"))
    store.create()
    for dag_id in ("readable", "hidden", "deleted_long_ago", None):
        use = AuditUse(operation="pseudonymise", project="p", context={"dag_id": dag_id, "task_id": "t", "run_id": "r"})
        store.audit.start(use)
        store.audit.finish(use, "success")
    return store


def visible(store: Store, scope: DagScope) -> list[str | None]:
    _, uses = Trail(store, scope).uses(TrailFilter())
    return sorted(u.started["dag_id"] or "-" for u in uses)


def test_a_user_who_may_read_every_dag_sees_everything(store: Store) -> None:
    assert visible(store, DagScope()) == ["-", "deleted_long_ago", "hidden", "readable"]


def test_rows_of_unreadable_dags_are_hidden(store: Store) -> None:
    scope = DagScope(readable=frozenset({"readable"}), known=frozenset({"readable", "hidden"}))
    assert visible(store, scope) == ["-", "deleted_long_ago", "readable"]
    trail = Trail(store, scope)
    assert [r["dag_id"] for r in trail.rows(TrailFilter(dag_id="hidden"))] == []
    since, until = window(1, datetime.now(UTC))
    assert sum(day.total for day in trail.daily_uses(since, until)) == 3


def test_no_readable_dag_leaves_the_rows_of_no_dag(store: Store) -> None:
    scope = DagScope(readable=frozenset(), known=frozenset({"readable", "hidden", "deleted_long_ago"}))
    assert visible(store, scope) == ["-"]


def test_the_api_servers_user_scope(api: Api) -> None:
    """With the SimpleAuthManager every role may read every DAG: no filter at all."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    assert type(get_auth_manager()).__name__ == "SimpleAuthManager"
    assert dag_scope(SimpleAuthManagerUser(username="viewer", role="viewer")) == DagScope()
