"""Vendor share: re-pseudonymise the research table with a secondary token, whenever it changes.

The vendor gets second-level pseudonyms that it cannot link to the research partner's (or any
other project's) pseudonyms. Scheduled on the research table's asset.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG
from pseudonymise.operators import SecondaryPseudonymiseOperator, target_alias

# the research table's asset alias: each load attaches the table's asset (postgres://host:port/research/public/…)
RESEARCH_TABLE = target_alias("research_db", "patient_visits_pseudonymised")

with DAG(
    dag_id="pseudonymise_vendor_share",
    schedule=[RESEARCH_TABLE],
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,  # each run replaces the whole vendor table: one at a time, in the order of the loads
    tags=["pseudonymise", "example"],
    doc_md=__doc__,
):
    SecondaryPseudonymiseOperator(
        task_id="secondary_pseudonymise",
        pseudonymise_conn_id="pseudonymise_vendor",
        source_conn_id="research_db",
        sql="SELECT patient_id, birth_year, diagnosis_code FROM patient_visits_pseudonymised",
        columns={"patient_id": "pseudonymise", "birth_year": "keep", "diagnosis_code": "keep"},
        target_conn_id="vendor_db",
        target_table="vendor_patient_visits",
        write_mode="replace",
        audit_conn_id="research_db",
    )
