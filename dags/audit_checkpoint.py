"""Audit checkpoints: every hour, sign the audit chain's head and hand it to witnesses outside its database.

A hash chain alone does not stop the audit database's owner from cutting off its last rows or
rewriting it (docs/design.md §6.1). Each run signs ``{audit id, seq, row_hash, time}`` with the audit signing
key of connection ``pseudonymise_audit_signing`` (a private JWK from ``pseudonymise audit keygen`` in
its password, or an ``ed25519`` Vault Transit key named in its extras, which the audit database never
holds), records it in ``pseudonymise_audit_checkpoint`` and sends it to the witnesses the connection
names (an append-only file, Vault KV with check-and-set). The task fails, naming the checkpoint, if
the chain contradicts the latest witnessed one; ``pseudonymise audit verify --witness …`` says the same.
Data operators given ``audit_signing_conn_id`` also checkpoint after each use; this run covers the rest.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG
from pseudonymise.operators import AuditCheckpointOperator

with DAG(
    dag_id="pseudonymise_audit_checkpoint",
    schedule="@hourly",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    tags=["pseudonymise", "example", "audit"],
    doc_md=__doc__,
):
    AuditCheckpointOperator(task_id="checkpoint_audit", audit_conn_id="research_db",
                            audit_signing_conn_id="pseudonymise_audit_signing", retries=2)
