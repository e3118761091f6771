"""The audit page shows the latest signed checkpoint (row, time, witnessed or not), through Airflow's real API
server app."""

from __future__ import annotations

from pathlib import Path

import pytest
from pseudonymise.core.checkpoint import Checkpointer, FileWitness, LocalSigner, WitnessError

from tests.plugin.conftest import Api, AuditDb, TokenConnections, page, task_use


def test_latest_checkpoint_witnessed_or_not(api: Api, audit_db: AuditDb, uses: dict[str, str],
                                            token_connections: TokenConnections, tmp_path: Path) -> None:
    html = page(api, "audit")
    assert 'id="checkpoint" data-seq=""' in html and "No signed checkpoint of this audit yet" in html
    signer = LocalSigner.generate()
    witness = FileWitness(tmp_path / "witness.jsonl")
    result = Checkpointer(audit_db.store.audit, signer, [witness]).checkpoint()
    assert result is not None and result.checkpoint.seq == 9
    html = page(api, "audit")
    assert 'id="checkpoint" data-seq="9"\n     data-witnessed="true"' in html
    assert f"witnessed by <span class=\"mono\">file:{witness.path}</span>" in html
    assert f"key {signer.kid[:12]}…" in html and signer.private_jwk()["d"] not in html

    task_use(audit_db.store, token_connections.tokens["pseudonymise"], token_connections.issuer, dag_id="dag_c",
             task_id="extract", run_id="manual__3")
    with pytest.raises(WitnessError):
        Checkpointer(audit_db.store.audit, signer, [FileWitness(tmp_path / "gone" / "witness.jsonl")]).checkpoint()
    html = page(api, "audit", user="viewer")
    assert 'id="checkpoint" data-seq="11"\n     data-witnessed="false"' in html
    assert "<strong>not witnessed</strong> (latest witnessed: row 9, " in html


def test_every_api_token_use_is_followed_by_a_checkpoint(api: Api, audit_db: AuditDb,
                                                        token_connections: TokenConnections, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``[pseudonymise] audit_signing_conn_id`` set, the API's token uses (a success and a denied one)
    are each followed by a signed checkpoint of the chain's head, sent to the connection's witness."""
    import json

    from pseudonymise.core.checkpoint import verify_against_witness

    signer = LocalSigner.generate()
    witness = tmp_path / "api-witness.jsonl"
    monkeypatch.setenv("AIRFLOW_CONN_AUDIT_SIGNING_API", json.dumps({
        "conn_type": "generic", "password": json.dumps(signer.private_jwk()),
        "extra": {"witness_path": str(witness)}}))
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__AUDIT_SIGNING_CONN_ID", "audit_signing_api")
    for name, status in (("pseudonymise", 200), ("expired", 422)):
        response = api.client.post(f"/pseudonymise/api/v1/connections/{token_connections[name]}/pseudonymise",
                                   headers=api.auth("admin"),
                                   json={"policy": {"id": "pseudonymise"}, "records": [{"id": "P-1"}]})
        assert response.status_code == status, response.text
        head = audit_db.rows()[-1]["seq"]
        lines = [json.loads(line) for line in witness.read_text().splitlines()]
        assert lines and max(json.loads(e["statement"])["seq"] for e in lines) == head, lines
    result = verify_against_witness(audit_db.store.audit, FileWitness(witness), signer.public_keys())
    assert result.ok, result
