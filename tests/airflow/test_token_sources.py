"""Tokens from a plain connection, from Vault KV through the connection's Vault reference, and from
Airflow's VaultBackend secrets backend (real OpenBao dev server); no secret in any log."""

from __future__ import annotations

import json
import uuid
from typing import Any

import hvac
import pytest

from tests.airflow.conftest import ROOT, AirflowWorld
from tests.airflow.retry import fault_then_retry
from tests.airflow.test_operators import audit_rows, rows, world  # noqa: F401 - the shared fixture

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault]
EXAMPLE_DAGS = ROOT / "dags"


def _kv(openbao: Any) -> hvac.Client:
    return hvac.Client(url=openbao.addr, token=openbao.token)


def _vault_conn(openbao: Any) -> dict[str, Any]:
    host, port = openbao.addr.removeprefix("http://").split(":")
    return {"conn_type": "vault", "host": host, "port": int(port), "password": openbao.token, "schema": "secret",
            "extra": {"auth_type": "token", "kv_engine_version": 2}}


def _secret_strings(env: dict[str, Any]) -> list[str]:
    """The token and every key it carries: none may appear in any log."""
    from pseudonymise.core.tokens import b64url_decode

    claims = json.loads(b64url_decode(env["token"].split(".")[1]))
    return [env["token"], claims["key"], claims["escrow_public_key"]]


def test_token_from_vault_kv_reference(world: dict[str, Any], openbao: Any) -> None:  # noqa: F811
    _kv(openbao).secrets.kv.v2.create_or_update_secret(
        path="pseudonymise/research-a", secret={"token": world["token"]}, mount_point="secret")
    keys = world["connections"]["pseudonymise_research"]["extra"]["issuer_keys"]
    connections = {
        **world["connections"],
        "vault_default": _vault_conn(openbao),
        "pseudonymise_research": {"conn_type": "pseudonymise", "extra": {
            "issuer_keys": keys, "project": "research-a", "vault_conn_id": "vault_default",
            "vault_path": "pseudonymise/research-a"}},
    }
    airflow: AirflowWorld = world["airflow"]
    run = airflow.dags_test("pseudonymise_patient_extract", "2026-11-04", connections, dags_folder=EXAMPLE_DAGS)
    assert run.returncode == 0, run.output[-3000:]
    assert len(rows(world["urls"]["research"])) == 24
    for secret in _secret_strings(world):
        assert secret not in run.output
        assert secret not in airflow.all_logs()


def test_vault_secret_missing_is_a_clear_denied_use_and_the_retry_gives_identical_rows(
        world: dict[str, Any], openbao: Any) -> None:  # noqa: F811
    path = f"pseudonymise/missing-{uuid.uuid4().hex[:8]}"
    kv = _kv(openbao).secrets.kv.v2

    def write_secret() -> None:
        kv.create_or_update_secret(path=path, secret={"token": world["token"]}, mount_point="secret")

    write_secret()
    keys = world["connections"]["pseudonymise_research"]["extra"]["issuer_keys"]
    connections = {
        **world["connections"],
        "vault_default": _vault_conn(openbao),
        "pseudonymise_research": {"conn_type": "pseudonymise", "extra": {
            "issuer_keys": keys, "vault_conn_id": "vault_default", "vault_path": path}},
    }
    # the secret deleted, then written back
    fault_then_retry(
        world, connections, lambda: kv.delete_metadata_and_all_versions(path=path, mount_point="secret"),
        write_secret, message=f"the Vault secret at {path!r} (connection 'vault_default') has no text key 'token'",
        outcome="denied", secrets=_secret_strings(world), dag_id="pseudonymise_patient_extract",
        dags_folder=EXAMPLE_DAGS, table="patient_visits_pseudonymised", order="patient_id, visit_date, birth_year")


def test_token_connection_served_by_vault_backend(world: dict[str, Any], openbao: Any) -> None:  # noqa: F811
    conn = world["connections"]["pseudonymise_research"]
    _kv(openbao).secrets.kv.v2.create_or_update_secret(
        path="connections/pseudonymise_research", secret=conn, mount_point="secret")
    connections = {k: v for k, v in world["connections"].items() if k != "pseudonymise_research"}
    backend = {
        "AIRFLOW__SECRETS__BACKEND": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({
            "connections_path": "connections", "variables_path": None, "config_path": None,
            "mount_point": "secret", "url": openbao.addr, "token": openbao.token, "kv_engine_version": 2}),
    }
    airflow: AirflowWorld = world["airflow"]
    run = airflow.dags_test("pseudonymise_patient_extract", "2026-11-04", connections, dags_folder=EXAMPLE_DAGS,
                            extra_env=backend)
    assert run.returncode == 0, run.output[-3000:]
    assert len(rows(world["urls"]["research"])) == 24
    for secret in _secret_strings(world):
        assert secret not in run.output
