"""Audit reversal: an authorised person reveals the originals of chosen pseudonyms, with four eyes.

Triggered by hand with the file of pseudonyms to check and the reason. The file's pseudonyms are
digested first, and the approval shows that digest and their count. A second person approves the
run in Airflow's human-in-the-loop view (Browse → Required Actions, or the REST API's
``hitlDetails``); the reversal then runs only if the approver is not the user who triggered the run,
as the Airflow API server recorded both, and only on the very pseudonyms approved (the file changed
after the approval is refused), once (cleared and run again, it is refused: ask in a new run). The reverse token's use is audited (requester, approver,
reason) before anything is revealed, and the originals go only to the output file named in the
run's parameters.

Connections: ``pseudonymise_research_reverse`` (the reverse token), ``research_db`` (audit and
escrow), and ``airflow_api`` (the API server's URL and a viewer user, to read the approval).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import DAG, Param
from pseudonymise.operators import PseudonymSetDigestOperator, ReversePseudonymsOperator

with DAG(
    dag_id="pseudonymise_audit_reversal",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    catchup=False,
    params={
        "requests_file": Param("/tmp/pseudonyms_to_check.csv", type="string",
                               description="CSV with a patient_id column of pseudonyms to reveal"),
        "output_file": Param("/tmp/revealed.csv", type="string", description="where the originals are written"),
        "reason": Param("", type="string", minLength=10,
                        description="why the originals are needed (the approver decides on it; audited)"),
    },
    tags=["pseudonymise", "example"],
    doc_md=__doc__,
):
    digest = PseudonymSetDigestOperator(
        task_id="digest_requests",
        pseudonym_columns=["patient_id"],
        source_path="{{ params.requests_file }}",
    )
    approve = ApprovalOperator(
        task_id="approve_reversal",
        subject="Reveal the originals of pseudonyms (run {{ run_id }})",
        body="{{ dag_run.triggering_user_name }} asks to reveal the pseudonyms in `{{ params.requests_file }}` "
             "into `{{ params.output_file }}`.\n\n"
             "{{ ti.xcom_pull(task_ids='digest_requests')['line'] }}\n\n"
             "Reason: {{ params.reason }}\n\n"
             "Approve only if you are not the requester and the reason justifies it; only these pseudonyms "
             "can then be revealed, once.",
        response_timeout=timedelta(days=2),
    )
    reveal = ReversePseudonymsOperator(
        task_id="reveal_pseudonyms",
        pseudonymise_conn_id="pseudonymise_research_reverse",
        pseudonym_columns=["patient_id"],
        source_path="{{ params.requests_file }}",
        target_path="{{ params.output_file }}",
        reason="{{ params.reason }}",
        approval_task_id="approve_reversal",
        airflow_api_conn_id="airflow_api",
        audit_conn_id="research_db",
    )
    digest >> approve >> reveal
