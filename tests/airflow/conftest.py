"""Real Airflow for the operator tests: a metadata database, DAG runs in their own processes, and the
``world`` they run in (source, target and vendor databases with the connections to reach them).

Each DAG run is ``airflow dags test`` (``dag.test()``) in a subprocess, so connections, the
secrets backend and the secret masker are configured exactly as a worker would see them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.tokens import new_jti, sign_claims

from scripts.services import OpenBaoServer, PostgresServer, RestartableOpenBao
from tests import reference

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")
EXAMPLE_DAGS = ROOT / "dags"
#: The example DAG's target table.
TARGET = "patient_visits_pseudonymised"


@dataclass
class DagRun:
    returncode: int
    output: str
    seconds: float


class AirflowWorld:
    """A metadata DB plus helpers to run DAGs with given connections."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PSEUDONYMISE"))}
        self.base_env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "dags"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            # this checkout's package first, whatever is installed (a second worktree shares the venv)
            "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
        })

    def env(self, connections: Mapping[str, Mapping[str, Any]], dags_folder: Path | None = None,
            extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(self.base_env)
        if dags_folder is not None:
            env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
        for conn_id, conn in connections.items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
        env.update(extra or {})
        return env

    def dags_test(self, dag_id: str, logical_date: str, connections: Mapping[str, Mapping[str, Any]], *,
                  spec: Mapping[str, Any] | None = None, dags_folder: Path | None = None,
                  extra_env: Mapping[str, str] | None = None, conf: Mapping[str, Any] | None = None,
                  timeout: float = 300) -> DagRun:
        env = self.env(connections, dags_folder, extra_env)
        if spec is not None:
            env["PSEUDONYMISE_TEST_DAG"] = json.dumps(spec)
        cmd = [AIRFLOW, "dags", "test", dag_id, logical_date]
        if conf:
            cmd += ["--conf", json.dumps(conf)]
        started = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        output = proc.stdout + proc.stderr
        (self.home / "runs").mkdir(exist_ok=True)
        (self.home / "runs" / f"{dag_id}-{logical_date}-{time.time_ns()}.log").write_text(output)
        return DagRun(proc.returncode, output, time.monotonic() - started)

    def all_logs(self) -> str:
        """Every log the runs wrote: task log files and captured process output."""
        texts = []
        for path in self.home.rglob("*.log"):
            texts.append(path.read_text(errors="replace"))
        for path in (self.home / "logs").rglob("*") if (self.home / "logs").exists() else []:
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


@pytest.fixture(scope="session")
def airflow_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowWorld]:
    home = tmp_path_factory.mktemp("airflow-home")
    world = AirflowWorld(home)
    proc = subprocess.run([AIRFLOW, "db", "migrate"], env=world.base_env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield world


def pg_conn(url: str) -> dict[str, Any]:
    u = sa.make_url(url)
    return {"conn_type": "postgres", "host": u.host, "port": u.port, "login": u.username, "schema": u.database}


def token_conn(token: str, issuer: Issuer, project: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"issuer_keys": json.dumps(issuer.public_keys().to_jwks())}
    if project:
        extra["project"] = project
    return {"conn_type": "pseudonymise", "password": token, "extra": extra}


def forged_token(issuer: Issuer, project: str, kind: str = "pseudonymisation", *, exp_offset: int = -3600,
                 nbf_offset: int = -7200) -> str:
    """A token signed by the real issuer key but with chosen validity (for expired/not-yet-valid cases)."""
    p = issuer.project(project)
    from pseudonymise.core.tokens import b64url_encode

    now = int(time.time())
    claims = {"iss": issuer.id, "jti": new_jti(), "sub": project, "kind": kind, "iat": now + nbf_offset,
              "nbf": now + nbf_offset, "exp": now + exp_offset, "method": p.method, "treatment": p.treatment,
              "retention_until": p.retention_until.strftime("%Y-%m-%dT%H:%M:%SZ"), "format": p.format.to_claim(),
              "key": b64url_encode(p.key)}
    if p.reversible:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        escrow = X25519PrivateKey.from_private_bytes(p.escrow_private_key)  # type: ignore[arg-type]
        claims["escrow_public_key"] = b64url_encode(escrow.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    return sign_claims(claims, issuer._private, issuer.kid)


def vault_conn(openbao: OpenBaoServer | RestartableOpenBao) -> dict[str, Any]:
    """An Airflow ``vault`` connection to ``openbao`` (token auth, KV v2 at ``secret/``)."""
    host, port = openbao.addr.removeprefix("http://").split(":")
    return {"conn_type": "vault", "host": host, "port": int(port), "password": openbao.token, "schema": "secret",
            "extra": {"auth_type": "token", "kv_engine_version": 2}}


@pytest.fixture
def restartable_openbao() -> Iterator[RestartableOpenBao]:
    """A started :class:`RestartableOpenBao` of the test's own (stopping the session's dev server would
    disturb the other tests), removed with its data afterwards."""
    bao = RestartableOpenBao()
    try:
        yield bao.start()
    finally:
        bao.remove()


# --- the world a DAG run works in ---------------------------------------------------------------------
def load_hospital(url: str, extra_rows: int = 0) -> int:
    """The sample patient visits in PostgreSQL, typed (date, integer), with a visit_id key."""
    engine = sa.create_engine(url)
    with open(ROOT / "include/sample/patients.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE patient_visits (visit_id bigint PRIMARY KEY, patient_id text, name text, birth_year integer,"
            " visit_date date, diagnosis_code text, ward text)"))
        payload = [{"visit_id": i, **{k: (v or None) for k, v in r.items()}} for i, r in enumerate(rows, 1)]
        for r in payload:
            r["birth_year"] = int(r["birth_year"])
        conn.execute(sa.text(
            "INSERT INTO patient_visits VALUES (:visit_id, :patient_id, :name, :birth_year, :visit_date,"
            " :diagnosis_code, :ward)"), payload)
        if extra_rows:
            conn.execute(sa.text(
                "INSERT INTO patient_visits SELECT 1000 + g, 'X' || g, 'Name ' || g, 1950 + g % 50,"
                " DATE '2026-11-05', NULL, 'general' FROM generate_series(1, :n) g"), {"n": extra_rows})
    engine.dispose()
    return len(rows) + extra_rows


@pytest.fixture
def world(airflow_world: AirflowWorld, issuer: Issuer, postgres: PostgresServer) -> dict[str, Any]:
    """Hospital (source) and research (target + audit) databases and the connections to reach them."""
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    names = {k: f"{k}_{uuid.uuid4().hex[:8]}" for k in ("hospital", "research", "vendor")}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    urls = {k: postgres.url(v) for k, v in names.items()}
    load_hospital(urls["hospital"])
    token = issuer.issue("research-a", "pseudonymisation")
    connections = {
        "hospital_db": pg_conn(urls["hospital"]),
        "research_db": pg_conn(urls["research"]),
        "vendor_db": pg_conn(urls["vendor"]),
        "pseudonymise_research": token_conn(token, issuer, "research-a"),
    }
    return {"urls": urls, "connections": connections, "token": token, "issuer": issuer, "airflow": airflow_world}


def dag_spec(world: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The test DAG (``dags/configurable_dag.py``) with one ``PseudonymiseOperator`` task from hospital to
    research, a day's visits with ``patient_id`` pseudonymised; ``overrides`` replace the task's arguments."""
    task = {
        "operator": "PseudonymiseOperator",
        "task_id": "pseudonymise",
        "pseudonymise_conn_id": "pseudonymise_research",
        "source_conn_id": "hospital_db",
        "sql": "SELECT visit_id, patient_id, birth_year, visit_date, ward FROM patient_visits"
               " WHERE visit_date >= :start AND visit_date < :end",
        "parameters": {"start": "{{ data_interval_start | ds }}", "end": "{{ data_interval_end | ds }}"},
        "columns": {"patient_id": {"action": "pseudonymise", "normalise": ["strip", "upper"]}},
        "unlisted_columns": "keep",
        "target_conn_id": "research_db",
        "target_table": "visits",
    }
    task.update(overrides)
    return {"tasks": [task]}


def rows(url: str, table: str = TARGET, order: str = "patient_id, visit_date, birth_year") -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        result = [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {order}"))]
    engine.dispose()
    return result


def audit_rows(url: str) -> list[dict[str, Any]]:
    """The audit rows in ``url``'s database, whose chain must verify."""
    engine = sa.create_engine(url)
    log = AuditLog(engine)
    result = list(log.iter_rows())
    assert log.verify().ok, log.verify()
    engine.dispose()
    return result


def expected_pseudonyms(token: str, url: str, start: str, end: str) -> list[str]:
    """An independent computation (docs/design.md §4 with the standard library, :mod:`tests.reference`): the
    pseudonyms of the visits of [start, end) in ``url``'s ``patient_visits``, their patient ids stripped
    and upper-cased as the example DAG's policy says, sorted."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.text(
            "SELECT patient_id FROM patient_visits WHERE visit_date >= :s AND visit_date < :e"), {"s": start, "e": end})]
    engine.dispose()
    return sorted(p for p in reference.token_pseudonyms(token, [i.strip().upper() for i in ids]) if p is not None)
