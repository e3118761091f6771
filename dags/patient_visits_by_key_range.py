"""Big tables: the whole visits table, split into key ranges, one mapped task per range.

A first task reads the key boundaries from the data (``NTILE``), then one pseudonymise task per
range is expanded; on Celery or Kubernetes executors they run on many workers. Each mapped task
replaces exactly its own key range in the target and audits its own use, so re-runs are exact.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task
from pseudonymise.operators import PseudonymiseOperator, key_range_kwargs

INCLUDE = Path(__file__).resolve().parent.parent / "include"
POLICY = json.loads((INCLUDE / "policies" / "patients.json").read_text(encoding="utf-8"))
POLICY["columns"]["visit_id"] = "keep"

with DAG(
    dag_id="pseudonymise_visits_by_key_range",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    catchup=False,
    params={"parts": 8},
    tags=["pseudonymise", "example"],
    doc_md=__doc__,
):

    @task
    def key_ranges(params: dict | None = None) -> list[dict]:
        return key_range_kwargs("hospital_db", "patient_visits", "visit_id", int((params or {}).get("parts", 8)))

    PseudonymiseOperator.partial(
        task_id="pseudonymise_range",
        pseudonymise_conn_id="pseudonymise_research",
        source_conn_id="hospital_db",
        sql="SELECT visit_id, patient_id, name, birth_year, visit_date, diagnosis_code, ward FROM patient_visits"
            " WHERE visit_id >= :lo AND (CAST(:hi AS bigint) IS NULL OR visit_id < :hi)",
        columns=POLICY,
        target_conn_id="research_db",
        target_table="patient_visits_all_pseudonymised",
        write_mode="replace_partition",
        partition_column="visit_id",
    ).expand_kwargs(key_ranges())
