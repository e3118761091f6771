"""The operator with a project whose key never leaves Vault Transit (real OpenBao): HMACs through the
connection's transit_vault_conn_id, the same pseudonyms as the core computes with Transit; with
Transit unreachable the task fails writing nothing, and once it is back the retry gives the same rows."""

from __future__ import annotations

import json
import secrets
from typing import Any

import hvac
import pytest
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pseudonymiser import ColumnPolicy, Pseudonymiser
from pseudonymise.core.tokens import verify_token
from pseudonymise.core.transit import TransitMac

from tests.airflow.conftest import token_conn
from tests.airflow.retry import fault_then_retry
from tests.airflow.test_operators import _spec, audit_rows, rows, world  # noqa: F401
from tests.airflow.test_token_sources import _vault_conn
from tests.restartable_openbao import RestartableOpenBao, restartable_openbao  # noqa: F401

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault]


def test_operator_pseudonymises_through_transit(world: dict[str, Any], openbao: Any) -> None:  # noqa: F811
    issuer: Issuer = world["issuer"]
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + secrets.token_hex(4)
    client.sys.enable_secrets_engine("transit", path=mount)
    issuer.transit_client = client
    issuer.create_project("custody", custody="transit", transit_mount=mount)
    raw = issuer.issue("custody", "pseudonymisation")
    conn = token_conn(raw, issuer, "custody")
    conn["extra"]["transit_vault_conn_id"] = "vault_default"
    connections = {**world["connections"], "pseudonymise_research": conn, "vault_default": _vault_conn(openbao)}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections,
                                     spec=_spec(world, write_mode="replace"))
    assert run.returncode == 0, run.output[-3000:]
    out = rows(world["urls"]["research"], "visits", "visit_id")
    token = verify_token(raw, issuer.public_keys())
    policy = ColumnPolicy.from_mapping({"columns": {"patient_id": {"normalise": ["strip", "upper"]}}, "default": "keep"})
    expected = Pseudonymiser(token, policy, TransitMac(client, mount, "pseudonymise-custody", 1)).pseudonymise_batch(
        {"patient_id": [r[1] for r in rows(world["urls"]["hospital"], "patient_visits", "visit_id")
                        if r[4].isoformat() == "2026-11-03"]}).columns["patient_id"]
    assert [r[1] for r in out] == expected
    audit = audit_rows(world["urls"]["research"])
    assert [a["outcome"] for a in audit] == ["started", "success"]
    assert json.loads(audit[1]["details"])["key_version"] == 1
    assert raw not in run.output


def test_unreachable_transit_fails_cleanly_and_the_retry_gives_identical_rows(
        world: dict[str, Any], restartable_openbao: RestartableOpenBao) -> None:  # noqa: F811
    """Its own OpenBao, with storage on disk: the Transit key must survive the server going away, and
    stopping the session's server would disturb the other tests."""
    bao = restartable_openbao
    client = bao.client()
    client.sys.enable_secrets_engine("transit", path="transit")
    issuer: Issuer = world["issuer"]
    issuer.transit_client = client
    issuer.create_project("custody", custody="transit", transit_mount="transit")
    raw = issuer.issue("custody", "pseudonymisation")
    conn = token_conn(raw, issuer, "custody")
    conn["extra"]["transit_vault_conn_id"] = "vault_default"
    connections = {**world["connections"], "pseudonymise_research": conn, "vault_default": _vault_conn(bao)}
    # OpenBao stopped, then started again: Transit comes back with its key. The token itself is valid,
    # so its use starts, and fails (not denied) for want of its key
    fault_then_retry(world, connections, bao.stop, bao.start,
                     message="Vault connection 'vault_default' could not be opened (ConnectionError)",
                     error_class="VaultUnreachableError", retryable=True,
                     outcome="failed", secrets=[raw],
                     spec=_spec(world, write_mode="replace_partition", partition_column="visit_date"))
