"""The operator with a project whose key never leaves Vault Transit (real OpenBao): HMACs through the
connection's transit_vault_conn_id, the same pseudonyms as plain Transit HMACs of docs/design.md §4's message; with
Transit unreachable the task fails writing nothing, and once it is back the retry gives the same rows."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import hvac
import pytest
from pseudonymise.core.issuer import Issuer

from scripts.services import RestartableOpenBao
from tests import reference
from tests.airflow.conftest import audit_rows, dag_spec, rows, token_conn, vault_conn
from tests.airflow.retry import fault_then_retry

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault, pytest.mark.slow]


def _transit_pseudonym(client: hvac.Client, mount: str, key: str, raw_token: str, value: str) -> str:
    """The independent computation: one plain Transit call per value (key version 1) on docs/design.md §4's
    message, encoded with the token's format by :mod:`tests.reference`."""
    message = reference.LABEL + b"\x00" + reference.canonical(value)
    resp = client.secrets.transit.generate_hmac(name=key, hash_input=base64.b64encode(message).decode(),
                                                algorithm="sha2-256", mount_point=mount, key_version=1)
    fmt = reference.claims(raw_token)["format"]
    return reference.encode(base64.b64decode(resp["data"]["hmac"].split(":", 2)[2]), fmt["alphabet"], fmt["length"],
                            fmt["prefix"])


def test_operator_pseudonymises_through_transit(world: dict[str, Any], openbao: Any) -> None:
    issuer: Issuer = world["issuer"]
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + secrets.token_hex(4)
    client.sys.enable_secrets_engine("transit", path=mount)
    issuer.transit_client = client
    issuer.create_project("custody", custody="transit", transit_mount=mount)
    raw = issuer.issue("custody", "pseudonymisation")
    conn = token_conn(raw, issuer, "custody")
    conn["extra"]["transit_vault_conn_id"] = "vault_default"
    connections = {**world["connections"], "pseudonymise_research": conn, "vault_default": vault_conn(openbao)}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections,
                                     spec=dag_spec(world, write_mode="replace"))
    assert run.returncode == 0, run.output[-3000:]
    out = rows(world["urls"]["research"], "visits", "visit_id")
    expected = [_transit_pseudonym(client, mount, "pseudonymise-custody", raw, r[1].strip().upper())
                for r in rows(world["urls"]["hospital"], "patient_visits", "visit_id") if r[4].isoformat() == "2026-11-03"]
    assert [r[1] for r in out] == expected
    audit = audit_rows(world["urls"]["research"])
    assert [a["outcome"] for a in audit] == ["started", "success"]
    assert json.loads(audit[1]["details"])["key_version"] == 1
    assert raw not in run.output


def test_unreachable_transit_fails_cleanly_and_the_retry_gives_identical_rows(
        world: dict[str, Any], restartable_openbao: RestartableOpenBao) -> None:
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
    connections = {**world["connections"], "pseudonymise_research": conn, "vault_default": vault_conn(bao)}
    # OpenBao stopped, then started again: Transit comes back with its key. The token itself is valid,
    # so its use starts, and fails (not denied) for want of its key
    fault_then_retry(world, connections, bao.stop, bao.start,
                     message="Vault connection 'vault_default' could not be opened (ConnectionError)",
                     error_class="VaultUnreachableError", retryable=True,
                     outcome="failed", secrets=[raw],
                     spec=dag_spec(world, write_mode="replace_partition", partition_column="visit_date"))
