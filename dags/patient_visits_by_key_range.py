"""Big tables: the whole visits table, split into key ranges, one mapped task per range.

A first task reads the key boundaries from the data (``NTILE``) while another creates the target
table; then one pseudonymise task per range is expanded. With the target already there, the mapped
tasks start together instead of waiting for whichever of them would create it; on Celery or
Kubernetes executors they run on many workers. Each mapped task replaces exactly its own key range
in the target and audits its own use, so re-runs are exact.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, task
from pseudonymise.operators import CreateTargetTableOperator, PseudonymiseOperator, key_range_kwargs

INCLUDE = Path(__file__).resolve().parent.parent / "include"
POLICY = json.loads((INCLUDE / "policies" / "patients.json").read_text(encoding="utf-8"))
POLICY["columns"]["visit_id"] = "keep"
QUERY = "SELECT visit_id, patient_id, name, birth_year, visit_date, diagnosis_code, ward FROM patient_visits"
# what the target creation and every range share: the source, the column policy, the target
COMMON = {"source_conn_id": "hospital_db", "columns": POLICY, "target_conn_id": "research_db",
          "target_table": "patient_visits_all_pseudonymised", "write_mode": "replace_partition",
          "partition_column": "visit_id"}

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

    create_target = CreateTargetTableOperator(task_id="create_target", sql=QUERY, **COMMON)

    ranges = PseudonymiseOperator.partial(
        task_id="pseudonymise_range",
        pseudonymise_conn_id="pseudonymise_research",
        sql=QUERY + " WHERE visit_id >= :lo AND (CAST(:hi AS bigint) IS NULL OR visit_id < :hi)",
        **COMMON,
    ).expand_kwargs(key_ranges())
    create_target >> ranges
