"""SqlDataHook (hooks.py): engines built by the connection's own provider hook, one per hook.

A ``postgres`` connection's engine comes from the postgres provider's ``get_sqlalchemy_engine()`` with
psycopg2 (COPY needs it) and every extra but the provider's ignore list passed to the driver; ``sqlite``
connections and an extra ``sqlalchemy_url`` keep working without a provider. Connections come from
``AIRFLOW_CONN_*`` in this process, as a worker reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import DataIOError
from pseudonymise.hooks import SqlDataHook

pytestmark = pytest.mark.airflow


def _connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, conn: dict[str, Any]) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


@pytest.mark.postgres
def test_postgres_engine_comes_from_the_provider_with_every_extra(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = sa.make_url(pg_url)
    conn_id = _connection(monkeypatch, "research_db", {
        "conn_type": "postgres", "host": url.host, "port": url.port, "login": url.username, "schema": url.database,
        "extra": {"application_name": "pseudonymise-hook-test", "sslmode": "disable",
                  "sqlalchemy_scheme": "postgresql+psycopg"}})
    hook = SqlDataHook(conn_id)
    engine = hook.get_engine()
    assert engine.dialect.driver == "psycopg2"  # COPY is psycopg2's, whatever the extra says
    assert hook.get_engine() is engine and SqlDataHook(conn_id).get_engine() is not engine  # one per hook
    with engine.connect() as conn:
        assert conn.execute(sa.text("SHOW application_name")).scalar() == "pseudonymise-hook-test"
        assert conn.execute(sa.text("SELECT current_database()")).scalar() == url.database
    engine.dispose()


def test_sqlite_and_sqlalchemy_url_connections_need_no_provider(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sqlite = _connection(monkeypatch, "local_db", {"conn_type": "sqlite", "host": str(tmp_path / "a.db")})
    by_url = _connection(monkeypatch, "url_db", {"conn_type": "generic",
                                                 "extra": {"sqlalchemy_url": f"sqlite:///{tmp_path / 'b.db'}"}})
    for conn_id, name in ((sqlite, "a.db"), (by_url, "b.db")):
        engine = SqlDataHook(conn_id).get_engine()
        assert engine.dialect.name == "sqlite" and Path(engine.url.database or "").name == name
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1


def test_a_connection_that_is_no_database_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    conn_id = _connection(monkeypatch, "not_sql", {"conn_type": "no-such-type", "host": "x"})
    with pytest.raises(DataIOError, match="no provider hook"):
        SqlDataHook(conn_id).get_engine()
    with pytest.raises(DataIOError, match="could not be read"):
        SqlDataHook("no_such_connection_anywhere").get_engine()
