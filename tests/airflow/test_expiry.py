"""The daily token expiry check: fine tokens pass, tokens near expiry or invalid fail the task by name."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pseudonymise.core.issuer import Issuer

from tests.airflow.conftest import ROOT, AirflowWorld, forged_token, token_conn

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


def _run(airflow_world: AirflowWorld, connections: dict, ids: list[str]):
    return airflow_world.dags_test("pseudonymise_token_expiry_check", "2026-11-04", connections,
                                   dags_folder=ROOT / "dags",
                                   extra_env={"AIRFLOW_VAR_PSEUDONYMISE_CONNECTIONS": json.dumps(ids)})


def test_expiry_check_passes_valid_and_fails_expiring_tokens(airflow_world: AirflowWorld, issuer: Issuer) -> None:
    fine = issuer.issue("research-a", "pseudonymisation", expires_in=timedelta(days=90))
    soon = issuer.issue("research-b", "pseudonymisation", expires_in=timedelta(days=2))
    expired = forged_token(issuer, "research-b", exp_offset=-3600)
    connections = {"tok_fine": token_conn(fine, issuer), "tok_soon": token_conn(soon, issuer),
                   "tok_expired": token_conn(expired, issuer)}
    ok = _run(airflow_world, connections, ["tok_fine"])
    assert ok.returncode == 0, ok.output[-3000:]
    assert "valid for 89." in ok.output or "valid for 90." in ok.output
    bad = _run(airflow_world, connections, ["tok_fine", "tok_soon", "tok_expired"])
    assert bad.returncode != 0
    assert "renew these tokens" in bad.output and "tok_soon" in bad.output and "tok_expired" in bad.output
    assert "TokenExpiredError" in bad.output or "expired at" in bad.output
    for token in (fine, soon, expired):
        assert token not in ok.output and token not in bad.output
