"""Tokens from a plain connection, from Vault KV through the connection's Vault reference, and from
Airflow's VaultBackend secrets backend (real OpenBao dev server); no secret in any log, even one a
task logs on purpose in any encoding (the secret masker gets every form, docs/design.md §3)."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.tokens import b64url_decode, b64url_encode, sign_claims

from scripts.services import free_port
from tests.airflow.conftest import (
    AIRFLOW,
    EXAMPLE_DAGS,
    HERE,
    AirflowWorld,
    rows,
    token_conn,
    vault_conn,
)
from tests.airflow.retry import fault_then_retry

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault]


def _kv(openbao: Any) -> hvac.Client:
    return hvac.Client(url=openbao.addr, token=openbao.token)


def _secret_strings(env: dict[str, Any]) -> list[str]:
    """The token and every key it carries: none may appear in any log."""
    from pseudonymise.core.tokens import b64url_decode

    claims = json.loads(b64url_decode(env["token"].split(".")[1]))
    return [env["token"], claims["key"], claims["escrow_public_key"]]


@pytest.mark.slow
def test_token_from_vault_kv_reference(world: dict[str, Any], openbao: Any) -> None:
    _kv(openbao).secrets.kv.v2.create_or_update_secret(
        path="pseudonymise/research-a", secret={"token": world["token"]}, mount_point="secret")
    keys = world["connections"]["pseudonymise_research"]["extra"]["issuer_keys"]
    connections = {
        **world["connections"],
        "vault_default": vault_conn(openbao),
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


@pytest.mark.slow
def test_vault_secret_missing_is_a_clear_denied_use_and_the_retry_gives_identical_rows(
        world: dict[str, Any], openbao: Any) -> None:
    path = f"pseudonymise/missing-{uuid.uuid4().hex[:8]}"
    kv = _kv(openbao).secrets.kv.v2

    def write_secret() -> None:
        kv.create_or_update_secret(path=path, secret={"token": world["token"]}, mount_point="secret")

    write_secret()
    keys = world["connections"]["pseudonymise_research"]["extra"]["issuer_keys"]
    connections = {
        **world["connections"],
        "vault_default": vault_conn(openbao),
        "pseudonymise_research": {"conn_type": "pseudonymise", "extra": {
            "issuer_keys": keys, "vault_conn_id": "vault_default", "vault_path": path}},
    }
    # the secret deleted, then written back
    fault_then_retry(
        world, connections, lambda: kv.delete_metadata_and_all_versions(path=path, mount_point="secret"),
        write_secret, message=f"the Vault secret at {path!r} (connection 'vault_default') has no text key 'token'",
        outcome="denied", secrets=_secret_strings(world), dag_id="pseudonymise_patient_extract",
        dags_folder=EXAMPLE_DAGS, table="patient_visits_pseudonymised", order="patient_id, visit_date, birth_year")


@pytest.mark.slow
def test_token_connection_served_by_vault_backend(world: dict[str, Any], openbao: Any) -> None:
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


# --- the secret masker: every form of every secret --------------------------------------------------
def _every_form(raw: str) -> list[str]:
    """The token, its payload segment, and each key claim as base64url, base64 and hex (both cases),
    computed here independently of the code under test."""
    claims = json.loads(b64url_decode(raw.split(".")[1]))
    keys = [b64url_decode(claims[k]) for k in ("key", "escrow_public_key", "escrow_private_key") if k in claims]
    keys += [b64url_decode(v) for v in claims.get("verify_keys", {}).values()]
    forms = [raw, raw.split(".")[1]]
    for key in keys:
        forms += [b64url_encode(key), base64.b64encode(key).decode(), key.hex(), key.hex().upper()]
    return forms


def _masking_tokens(issuer: Issuer) -> dict[str, str]:
    issuer.rotate_key("research-a")  # two key versions: two verify_keys
    return {"pseudonymise_research": issuer.issue("research-a", "pseudonymisation"),
            "pseudonymise_reverse": issuer.issue("research-a", "reverse"),
            "pseudonymise_vendor": issuer.issue("vendor-x", "secondary", source_project="research-a")}


def test_masker_hides_every_form_of_every_key(issuer: Issuer) -> None:
    """The hook registers the token, its payload segment and every key claim in every encoding with
    Airflow's secret masker; before v1.1 the payload segment and the hex/base64 forms went through."""
    from airflow.sdk.log import _secrets_masker
    from pseudonymise.hooks import _mask_token

    tokens = _masking_tokens(issuer)
    forms = [form for raw in tokens.values() for form in _every_form(raw)]
    assert len(forms) == 3 * 2 + 4 * (2 + 3 + 1)  # tokens and payloads; keys: key + escrow, escrow + 2 verify, key
    for raw in tokens.values():
        _mask_token(raw)
    text = "\n".join(f"form {i}: {form}." for i, form in enumerate(forms))
    redacted = _secrets_masker().redact(text)
    assert redacted.count("***") >= len(forms)
    for form in forms:
        assert form not in redacted


def test_masker_hides_the_keys_of_a_token_that_is_then_refused(issuer: Issuer) -> None:
    """Masking comes before verification: a re-signed token with a duplicate key member (refused as
    malformed) still has both keys masked."""
    from airflow.sdk.log import _secrets_masker
    from pseudonymise.hooks import _mask_token

    claims = json.loads(b64url_decode(issuer.issue("research-b", "pseudonymisation").split(".")[1]))
    second = bytes(range(100, 132))
    payload = json.dumps(claims)[:-1] + f', "key": "{b64url_encode(second)}"}}'
    raw = sign_claims({}, issuer._private, issuer.kid)
    raw = f"{raw.split('.')[0]}.{b64url_encode(payload.encode())}.{raw.split('.')[2]}"
    _mask_token(raw)
    text = " ".join([*_every_form(raw), second.hex(), base64.b64encode(second).decode()])
    redacted = _secrets_masker().redact(text)
    for form in (*_every_form(raw), second.hex(), second.hex().upper(), base64.b64encode(second).decode()):
        assert form not in redacted


@pytest.fixture
def execution_api(airflow_world: AirflowWorld, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Airflow's execution API server (``airflow api-server --apps execution``), so that a task runs the
    way a worker runs it: in its own process under the task supervisor, which masks what it logs."""
    port = free_port()
    env = {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "1"}
    log = (tmp_path / "execution-api.out").open("w")
    server = subprocess.Popen([AIRFLOW, "api-server", "--apps", "execution", "-H", "127.0.0.1", "-p", str(port),
                               "-w", "1"], env=airflow_world.env({}, extra=env), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/execution/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "execution-api.out").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_task_log_holds_no_form_of_any_token_secret(airflow_world: AirflowWorld, issuer: Issuer,
                                                     execution_api: dict[str, str]) -> None:
    """A task run as a worker runs it (LocalExecutor, task supervisor, execution API) reads three tokens
    through the hook and logs every form of their secrets, by ``logging`` and by ``print``: its task log
    holds none of them. (Only the task log: ``airflow dags test`` also echoes the task's raw output to
    its own console, which Airflow does not mask, and the in-process ``dags test`` without an executor
    renders logs through another masker than a worker's; neither is a worker's log.)"""
    tokens = _masking_tokens(issuer)
    connections = {conn_id: token_conn(raw, issuer) for conn_id, raw in tokens.items()}
    env = airflow_world.env(connections, HERE / "dags_masking",
                            {**execution_api, "PSEUDONYMISE_TEST_MASKING": json.dumps({"conn_ids": list(tokens)})})
    run = subprocess.run([AIRFLOW, "dags", "test", "--use-executor", "pseudonymise_token_log", "2026-11-04"],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    logs = "\n".join(path.read_text(errors="replace")
                     for path in (airflow_world.home / "logs" / "dag_id=pseudonymise_token_log").rglob("*.log"))
    forms = [form for raw in tokens.values() for form in _every_form(raw)]
    assert f"logged {len(forms)} secret forms" in logs  # the task did log them all, to this log
    assert logs.count("token form: ") == 2 * len(forms)
    leaked = [i for i, form in enumerate(forms) if form in logs]
    assert leaked == []
