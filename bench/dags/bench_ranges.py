"""The benchmark's mapped-ranges DAG (bench/airflow_ranges.py): the ``visits`` table split into
``parts`` key ranges, one mapped PseudonymiseOperator per range, as dags/patient_visits_by_key_range.py
does (the target created first, so the ranges start together), with the benchmark's columns
(``patient_id`` and ``mrn`` pseudonymised, deterministic)."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task
from pseudonymise.operators import CreateTargetTableOperator, PseudonymiseOperator, key_range_kwargs

COMMON = {"source_conn_id": "hospital_db", "columns": {"patient_id": "pseudonymise", "mrn": "pseudonymise"},
          "unlisted_columns": "keep", "target_conn_id": "research_db", "target_table": "visits_out",
          "write_mode": "replace_partition", "partition_column": "id"}

with DAG(dag_id="bench_ranges", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, params={"parts": 2},
         max_active_tasks=8, tags=["pseudonymise", "benchmark"]):

    @task
    def key_ranges(params: dict | None = None) -> list[dict]:
        return key_range_kwargs("hospital_db", "visits", "id", int((params or {}).get("parts", 2)))

    create_target = CreateTargetTableOperator(task_id="create_target", sql="SELECT * FROM visits", **COMMON)

    ranges = PseudonymiseOperator.partial(
        task_id="pseudonymise_range",
        pseudonymise_conn_id="bench_token",
        sql="SELECT * FROM visits WHERE id >= :lo AND (CAST(:hi AS bigint) IS NULL OR id < :hi)",
        **COMMON,
    ).expand_kwargs(key_ranges())
    create_target >> ranges
