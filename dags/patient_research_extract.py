"""Daily patient visits, pseudonymised into the research partner's table.

Each run takes one day of visits (its data interval), pseudonymises ``patient_id`` with the
research project's token, drops names, and replaces that day in the target table, so re-running
or backfilling a day gives exactly the same rows.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, CronDataIntervalTimetable
from pseudonymise.operators import PseudonymiseOperator

INCLUDE = Path(__file__).resolve().parent.parent / "include"
# The column policy is data, in include/policies/, so a reviewer can read it without reading code.
PATIENT_POLICY = json.loads((INCLUDE / "policies" / "patients.json").read_text(encoding="utf-8"))

with DAG(
    dag_id="pseudonymise_patient_extract",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 11, 1),
    catchup=False,
    template_searchpath=[str(INCLUDE / "sql")],
    tags=["pseudonymise", "example"],
    doc_md=__doc__,
):
    PseudonymiseOperator(
        task_id="pseudonymise_visits",
        pseudonymise_conn_id="pseudonymise_research",
        source_conn_id="hospital_db",
        sql="patient_visits.sql",
        parameters={"start": "{{ data_interval_start | ds }}", "end": "{{ data_interval_end | ds }}"},
        columns=PATIENT_POLICY,
        target_conn_id="research_db",
        target_table="patient_visits_pseudonymised",
        write_mode="replace_partition",
        partition_column="visit_date",
    )
