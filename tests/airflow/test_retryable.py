"""Which token failures Airflow may retry: Vault that cannot be reached (a retry may succeed) fails the
task with a plain ``AirflowException``, so the task's ``retries`` apply; a refusal that a retry cannot
change (a secret missing, a bad token) with ``AirflowFailException``. Either way the use is audited.

The operator runs in this process (``execute`` with a minimal context, connections from
``AIRFLOW_CONN_*`` as a worker would read them), against real OpenBao and a closed port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer

from scripts.services import free_port
from tests.airflow.conftest import vault_conn

pytestmark = [pytest.mark.airflow, pytest.mark.vault, pytest.mark.slow]

RUN = r"""
import json, sys
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from pseudonymise.operators import PseudonymiseOperator
op = PseudonymiseOperator(task_id="t", pseudonymise_conn_id="tok", source_path=sys.argv[1], target_path=sys.argv[2],
                          audit_conn_id="audit", columns=["id"], unlisted_columns="keep")
try:
    op.execute(context={})
    print(json.dumps({"raised": None}))
except AirflowFailException as exc:
    print(json.dumps({"raised": "AirflowFailException", "message": str(exc)}))
except AirflowException as exc:
    print(json.dumps({"raised": "AirflowException", "message": str(exc)}))
"""


def _run(tmp_path: Any, connections: dict[str, Any]) -> dict[str, Any]:
    source = tmp_path / "in.csv"
    source.write_text("id,n\nA1,1\nA2,2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update({f"AIRFLOW_CONN_{k.upper()}": json.dumps(v) for k, v in connections.items()})
    env["AIRFLOW_CONN_AUDIT"] = json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "audit.db")})
    done = subprocess.run([sys.executable, "-c", RUN, str(source), str(tmp_path / "out.csv")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _outcomes(tmp_path: Any) -> list[str]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT outcome FROM pseudonymise_audit ORDER BY seq"))]


def _token_conn(issuer: Issuer, vault: str, path: str) -> dict[str, Any]:
    return {"conn_type": "pseudonymise", "extra": {"issuer_keys": json.dumps(issuer.public_keys().to_jwks()),
                                                   "vault_conn_id": vault, "vault_path": path}}


def test_unreachable_vault_is_retryable(tmp_path: Any, issuer: Issuer) -> None:
    closed = {"conn_type": "vault", "host": "127.0.0.1", "port": free_port(), "password": "x", "schema": "secret",
              "extra": {"auth_type": "token", "kv_engine_version": 2, "url": f"http://127.0.0.1:{free_port()}"}}
    result = _run(tmp_path, {"vault_down": closed, "tok": _token_conn(issuer, "vault_down", "pseudonymise/a")})
    assert result["raised"] == "AirflowException", result
    assert "could not be read from Vault" in result["message"] and "retryable" in result["message"]
    assert _outcomes(tmp_path) == ["started", "denied"]
    assert not (tmp_path / "out.csv").exists()


def test_missing_secret_is_not_retried(tmp_path: Any, issuer: Issuer, openbao: Any) -> None:
    result = _run(tmp_path, {"vault_default": vault_conn(openbao),
                             "tok": _token_conn(issuer, "vault_default", "pseudonymise/no-such-secret")})
    assert result["raised"] == "AirflowFailException", result
    assert _outcomes(tmp_path) == ["started", "denied"]
    assert not (tmp_path / "out.csv").exists()
