"""Audit reversal: an authorised person reveals the originals of chosen pseudonyms.

Triggered by hand with the file of pseudonyms to check. The reverse token's use is audited
(with the triggering user) before anything is revealed, and the originals go only to the
output file named in the run's parameters.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param
from pseudonymise.operators import ReversePseudonymsOperator

with DAG(
    dag_id="pseudonymise_audit_reversal",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    catchup=False,
    params={
        "requests_file": Param("/tmp/pseudonyms_to_check.csv", type="string",
                               description="CSV with a patient_id column of pseudonyms to reveal"),
        "output_file": Param("/tmp/revealed.csv", type="string", description="where the originals are written"),
    },
    tags=["pseudonymise", "example"],
    doc_md=__doc__,
):
    ReversePseudonymsOperator(
        task_id="reveal_pseudonyms",
        pseudonymise_conn_id="pseudonymise_research_reverse",
        pseudonym_columns=["patient_id"],
        source_path="{{ params.requests_file }}",
        target_path="{{ params.output_file }}",
        audit_conn_id="research_db",
    )
