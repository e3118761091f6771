"""Signed audit checkpoints in real Airflow (``airflow dags test``) on real PostgreSQL and OpenBao: after each use
of a data operator given ``audit_signing_conn_id``, and from ``AuditCheckpointOperator``; a failed checkpoint
never fails the use, and a truncated audit fails the scheduled checkpoint naming the witnessed one."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import hvac
import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.checkpoint import (
    CheckpointTable,
    FileWitness,
    LocalSigner,
    SignedCheckpoint,
    TransitSigner,
    VaultKVWitness,
    verify_against_witness,
)

from tests.airflow.conftest import audit_rows, dag_spec, vault_conn
from tests.tampering import truncate

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]
SIGNING = "pseudonymise_audit_signing"


def _checkpoint_spec() -> dict[str, Any]:
    return {"tasks": [{"operator": "AuditCheckpointOperator", "task_id": "checkpoint", "audit_conn_id": "research_db",
                       "audit_signing_conn_id": SIGNING}]}


def test_checkpoint_after_each_use_and_on_schedule_with_a_local_key(world: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    signer = LocalSigner.generate()
    jwk = signer.private_jwk()
    witness_path = tmp_path / "witness.jsonl"
    connections = {**world["connections"],
                   SIGNING: {"conn_type": "generic", "password": json.dumps(jwk),
                             "extra": {"witness_path": str(witness_path)}}}
    airflow = world["airflow"]
    spec = dag_spec(world, write_mode="replace", audit_signing_conn_id=SIGNING)
    for day in ("2026-11-04", "2026-11-05"):
        run = airflow.dags_test("pseudonymise_test", day, connections, spec=spec)
        assert run.returncode == 0, run.output[-3000:]
        assert "audit checkpoint: checkpoint of " in run.output
    witnessed = [SignedCheckpoint.from_json(line) for line in witness_path.read_text().splitlines()]
    assert [cp.seq for cp in witnessed] == [2, 4]  # one after each use, of its finished row
    audit = AuditLog(sa.create_engine(world["urls"]["research"]))
    assert [r["outcome"] for r in audit_rows(world["urls"]["research"])] == ["started", "success"] * 2
    assert verify_against_witness(audit, FileWitness(witness_path), signer.public_keys()).ok

    scheduled = airflow.dags_test("pseudonymise_test", "2026-11-06", connections, spec=_checkpoint_spec())
    assert scheduled.returncode == 0, scheduled.output[-3000:]
    latest = CheckpointTable(audit).latest()
    assert latest is not None and latest["seq"] == 4 and latest["witnessed_by"] == f"file:{witness_path}"
    assert len(witness_path.read_text().splitlines()) == 3
    for run_output in (run.output, scheduled.output, airflow.all_logs()):
        assert jwk["d"] not in run_output and json.dumps(jwk) not in run_output

    truncate(audit, 2)  # the owner of the research database cuts off the second use
    assert audit.verify().ok
    refused = airflow.dags_test("pseudonymise_test", "2026-11-07", connections, spec=_checkpoint_spec())
    assert refused.returncode != 0
    assert "the chain ends at row 2 but the checkpoint of " in refused.output and "witnessed row 4" in refused.output
    assert "CheckpointContradictionError" in refused.output or "AirflowFailException" in refused.output
    assert len(witness_path.read_text().splitlines()) == 3  # nothing signed


@pytest.mark.vault
def test_transit_key_and_vault_kv_witness_and_a_failed_witness_never_fails_the_use(
        world: dict[str, Any], openbao: Any, tmp_path: Path) -> None:
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + secrets.token_hex(4)
    client.sys.enable_secrets_engine("transit", path=mount)
    signer = TransitSigner.create(client, mount, "audit-signing")
    kv_path = "checkpoints-" + secrets.token_hex(4)
    extra = {"transit_key": f"{mount}/audit-signing", "transit_vault_conn_id": "vault_default",
             "witness_vault_path": f"secret/{kv_path}"}
    broken = {**extra, "witness_path": str(tmp_path / "no-such-folder" / "witness.jsonl")}
    connections = {**world["connections"], "vault_default": vault_conn(openbao),
                   SIGNING: {"conn_type": "generic", "extra": broken}}
    airflow = world["airflow"]
    run = airflow.dags_test("pseudonymise_test", "2026-11-04", connections,
                            spec=dag_spec(world, write_mode="replace", audit_signing_conn_id=SIGNING))
    assert run.returncode == 0, run.output[-3000:]  # the use stands
    assert "the audit checkpoint after this use failed (WitnessError: the checkpoint of row 2 was signed and " \
           "recorded in the table, but 1 witness(es) failed: cannot append" in run.output
    assert [r["outcome"] for r in audit_rows(world["urls"]["research"])] == ["started", "success"]
    audit = AuditLog(sa.create_engine(world["urls"]["research"]))
    kv = VaultKVWitness(client, "secret", kv_path)
    assert verify_against_witness(audit, kv, signer.public_keys()).ok  # the KV witness got it

    connections[SIGNING] = {"conn_type": "generic", "extra": extra}
    scheduled = airflow.dags_test("pseudonymise_test", "2026-11-05", connections, spec=_checkpoint_spec())
    assert scheduled.returncode == 0, scheduled.output[-3000:]
    latest = CheckpointTable(audit).latest(witnessed=True)
    assert latest is not None and latest["seq"] == 2 and latest["witnessed_by"] == f"vault:secret/{kv_path}"
    assert openbao.token not in airflow.all_logs()
