"""Retention purge: every day, delete escrow past its project's retention end (audited).

After the purge the link between pseudonyms and originals is severed for ever, whoever holds a
reverse token.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG
from pseudonymise.operators import EscrowPurgeOperator

with DAG(
    dag_id="pseudonymise_retention_purge",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    tags=["pseudonymise", "example"],
    doc_md=__doc__,
):
    EscrowPurgeOperator(task_id="purge_expired_escrow", audit_conn_id="research_db")
