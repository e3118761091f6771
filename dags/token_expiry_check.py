"""Daily check of the pseudonymisation tokens in use: warn two weeks before expiry, fail three days before.

List every ``pseudonymise`` connection of the deployment in the ``pseudonymise_connections``
Variable (a JSON list); tasks cannot enumerate connections served by a secrets backend.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG
from pseudonymise.operators import TokenExpiryCheckOperator

with DAG(
    dag_id="pseudonymise_token_expiry_check",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    render_template_as_native_obj=True,
    tags=["pseudonymise", "example", "operations"],
    doc_md=__doc__,
):
    TokenExpiryCheckOperator(
        task_id="check_token_expiry",
        conn_ids="{{ var.json.get('pseudonymise_connections', ['pseudonymise_research']) }}",
        warn_days=14,
        fail_days=3,
    )
