"""The real Airflow API server app, in process, with the plugin mounted by Airflow's plugin manager.

The app is Airflow's own ``create_app("core")`` (its middlewares, its SimpleAuthManager, the
plugin loaded through the ``airflow.plugins`` entry point) on a metadata database migrated by
``airflow db migrate``; clients log in through ``POST /auth/token`` like any API client. Each test
gets its own audit database (SQLite) and token connections (environment variables, as the
secrets backend serves them).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.pipeline import Store

AIRFLOW = str(Path(sys.executable).parent / "airflow")
#: user name -> role; two of role op, so that one can approve what the other asks (four eyes)
USERS = {"admin": "admin", "op": "op", "op2": "op", "user": "user", "viewer": "viewer"}


@dataclass
class Api:
    """The app under test, and a JWT per user (role = user name)."""

    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


def _airflow_env(home: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW__API__ENABLE_SWAGGER_UI": "False",
    }


@pytest.fixture(scope="session")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from airflow import settings
    from airflow.api_fastapi.app import create_app, purge_cached_app

    home = tmp_path_factory.mktemp("api-server-home")
    (home / "dags").mkdir()
    env = _airflow_env(home)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    proc = subprocess.run([AIRFLOW, "db", "migrate"], env={**base, **env}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    patch = pytest.MonkeyPatch()
    for name, value in env.items():
        patch.setenv(name, value)
    settings.configure_vars()
    settings.reconfigure_orm()
    purge_cached_app()
    try:
        with TestClient(create_app("core")) as client:
            world = Api(client)
            passwords = json.loads((home / "passwords.json").read_text())
            for user in USERS:
                response = client.post("/auth/token", json={"username": user, "password": passwords[user]})
                assert response.status_code in (200, 201), response.text
                world.tokens[user] = response.json()["access_token"]
            yield world
    finally:
        purge_cached_app()
        patch.undo()
        settings.configure_vars()
        settings.reconfigure_orm()


@dataclass
class AuditDb:
    """One test's audit database, configured as the plugin's [pseudonymise] audit_conn_id."""

    conn_id: str
    url: str
    store: Store

    def rows(self) -> list[dict[str, Any]]:
        return list(self.store.audit.iter_rows())

    def outcomes(self) -> list[tuple[str, str | None]]:
        return [(r["outcome"], r["error_class"]) for r in self.rows()]


@pytest.fixture
def audit_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AuditDb:
    conn_id = f"audit_{uuid.uuid4().hex[:10]}"
    path = tmp_path / "audit.db"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID", conn_id)
    store = Store(sa.create_engine(f"sqlite:///{path}"))
    store.create()
    return AuditDb(conn_id, f"sqlite:///{path}", store)


@dataclass
class TokenConnections:
    """Connection ids holding tokens of the test issuer, by purpose."""

    ids: dict[str, str]
    tokens: dict[str, str]
    issuer: Issuer

    def __getitem__(self, name: str) -> str:
        return self.ids[name]


def _token_conn(token: str | None, issuer: Issuer, project: str | None = None, conn_type: str = "pseudonymise",
                keys: str | None = None) -> str:
    extra: dict[str, Any] = {"issuer_keys": keys or json.dumps(issuer.public_keys().to_jwks())}
    if project:
        extra["project"] = project
    return json.dumps({"conn_type": conn_type, "password": token, "extra": extra})


@pytest.fixture
def token_connections(issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TokenConnections:
    from tests.airflow.conftest import forged_token

    other = Issuer.init(DirectoryStore(tmp_path / "other-issuer"), "other-issuer")
    other.create_project("research-a", method="reversible", treatment="deterministic", retention=timedelta(days=30))
    tokens = {
        "pseudonymise": issuer.issue("research-a", "pseudonymisation"),
        "irreversible": issuer.issue("research-b", "pseudonymisation"),
        "reverse": issuer.issue("research-a", "reverse"),
        "secondary": issuer.issue("vendor-x", "secondary", source_project="research-a"),
        "expired": forged_token(issuer, "research-a"),
        "untrusted": other.issue("research-a", "pseudonymisation"),
        "expiring": issuer.issue("research-a", "pseudonymisation", expires_in=timedelta(days=3)),
        "reverse_once": issuer.issue("research-a", "reverse", max_uses=1),
    }
    suffix = uuid.uuid4().hex[:8]
    ids = {name: f"tok_{name}_{suffix}" for name in tokens}
    for name, token in tokens.items():
        project = "vendor-x" if name == "secondary" else "research-b" if name == "irreversible" else "research-a"
        monkeypatch.setenv(f"AIRFLOW_CONN_{ids[name].upper()}", _token_conn(token, issuer, project))
    ids["database"] = f"db_{suffix}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{ids['database'].upper()}",
                       json.dumps({"conn_type": "postgres", "host": "db.example", "password": "db-password-123"}))
    ids["empty"] = f"tok_empty_{suffix}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{ids['empty'].upper()}", _token_conn(None, issuer, "research-a"))
    return TokenConnections(ids, tokens, issuer)


@pytest.fixture
def allow_reversal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__API_ALLOW_REVERSAL", "True")


def task_use(store: Store, token: str, issuer: Issuer, *, dag_id: str, task_id: str, run_id: str, map_index: int = -1,
             patients: tuple[Any, ...] = ("P-1", "P-2"), project: str = "research-a") -> str:
    """One pseudonymisation as a task instance's operator runs it (the same flow, the same context keys)."""
    from pseudonymise.core.pipeline import run_pseudonymisation
    from pseudonymise.core.plan import SinkFactory, plan_transfer
    from pseudonymise.core.policy import ColumnPolicy
    from pseudonymise.core.use import GivenToken, RunContext
    from pseudonymise.plugin.batch import MemorySink, RecordBatch

    policy = ColumnPolicy.pseudonymise("patient_id")
    transfer = plan_transfer(RecordBatch(["patient_id"], [[p] for p in patients]),
                             SinkFactory(lambda columns, _conn: MemorySink(columns)), policy,
                             source_label="hospital_db:query", target_label="research_db:visits")
    summary = run_pseudonymisation(
        store, GivenToken(token, issuer.public_keys(), project), policy, transfer,
        RunContext(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index, try_number=1,
                   triggered_by="scheduler"))
    return summary.use_id


def crashed_use(store: Store, *, dag_id: str, task_id: str, run_id: str) -> str:
    """A use whose task died after its ``started`` row committed: no ``finished`` row, ever."""
    from pseudonymise.core.audit import AuditUse

    use = AuditUse(operation="pseudonymise", project="research-a",
                   context={"dag_id": dag_id, "task_id": task_id, "run_id": run_id, "map_index": -1})
    store.audit.start(use)
    return use.use_id


def secrets_of(token: str) -> list[str]:
    """The token and every secret claim in it: none may appear in a page, a response or the audit."""
    from pseudonymise.core.tokens import b64url_decode

    claims = json.loads(b64url_decode(token.split(".")[1]))
    return [token, *(claims[k] for k in ("key", "escrow_private_key") if k in claims)]


# --- pages ---------------------------------------------------------------------------------------
def page(api: Api, path: str, user: str = "viewer", **params: Any) -> str:
    """The HTML of ``/pseudonymise/<path>`` as ``user`` sees it (the request must succeed)."""
    response = api.client.get(f"/pseudonymise/{path}", params=params, headers=api.auth(user))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    return response.text


@pytest.fixture
def uses(audit_db: AuditDb, token_connections: TokenConnections) -> dict[str, str]:
    """Four task uses of two DAGs (two of them mapped) and one crashed use, by name: their use ids."""
    token, issuer = token_connections.tokens["pseudonymise"], token_connections.issuer
    return {
        "a1": task_use(audit_db.store, token, issuer, dag_id="dag_a", task_id="extract", run_id="scheduled__1"),
        "a_map0": task_use(audit_db.store, token, issuer, dag_id="dag_a", task_id="ranges", run_id="scheduled__1",
                           map_index=0),
        "a_map1": task_use(audit_db.store, token, issuer, dag_id="dag_a", task_id="ranges", run_id="scheduled__1",
                           map_index=1),
        "b1": task_use(audit_db.store, token, issuer, dag_id="dag_b", task_id="extract", run_id="manual__2"),
        "crash": crashed_use(audit_db.store, dag_id="dag_b", task_id="load", run_id="manual__2"),
    }
