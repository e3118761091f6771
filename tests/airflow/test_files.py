"""Files in and out through the operator: a local CSV and an object-storage URI (``file://`` through
Airflow's ObjectStoragePath), audited in SQLite; the pseudonyms equal the CLI's for the same token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.issuer import Issuer

from tests.airflow.conftest import ROOT, AirflowWorld, token_conn

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
POLICY = json.loads((ROOT / "include/policies/patients.json").read_text())


def test_csv_to_object_storage_parquet_matches_the_cli(airflow_world: AirflowWorld, issuer: Issuer,
                                                       tmp_path: Path) -> None:
    token = issuer.issue("research-a", "pseudonymisation")
    audit_db = tmp_path / "audit.db"
    out_uri = f"file://{tmp_path}/out/visits.parquet"
    (tmp_path / "out").mkdir()
    spec = {"tasks": [{
        "operator": "PseudonymiseOperator", "task_id": "files",
        "pseudonymise_conn_id": "tok", "columns": POLICY,
        "source_path": str(ROOT / "include/sample/patients.csv"), "target_path": out_uri,
        "audit_conn_id": "audit_db", "batch_size": 50,
    }]}
    connections = {"tok": token_conn(token, issuer), "audit_db": {"conn_type": "sqlite", "host": str(audit_db)}}
    run = airflow_world.dags_test("pseudonymise_test", "2026-11-04", connections, spec=spec)
    assert run.returncode == 0, run.output[-3000:]
    table = pq.read_table(tmp_path / "out/visits.parquet")
    assert table.column_names == ["patient_id", "birth_year", "visit_date", "diagnosis_code", "ward"]
    assert table.num_rows == 240

    (tmp_path / "tok").write_text(token)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(issuer.public_keys().to_jwks()))
    cli = subprocess.run([sys.executable, "-m", "pseudonymise.cli", "file", "pseudonymise",
                          str(ROOT / "include/sample/patients.csv"), str(tmp_path / "cli.parquet"),
                          "--policy", str(ROOT / "include/policies/patients.json"), "--token-file", str(tmp_path / "tok"),
                          "--issuer-keys", str(keys), "--db", f"sqlite:///{tmp_path / 'cli.db'}"],
                         capture_output=True, text=True, check=False)
    assert cli.returncode == 0, cli.stderr
    assert pq.read_table(tmp_path / "cli.parquet").column("patient_id").to_pylist() == \
        table.column("patient_id").to_pylist()

    audit = AuditLog(sa.create_engine(f"sqlite:///{audit_db}"))
    rows = list(audit.iter_rows())
    assert [r["outcome"] for r in rows] == ["started", "success"]
    assert rows[1]["target"] == f"file:{out_uri}" and rows[1]["rows_out"] == 240
    assert audit.verify().ok
