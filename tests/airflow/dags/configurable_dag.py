"""A DAG the Airflow tests configure through PSEUDONYMISE_TEST_DAG (JSON): which operators, with what.

``{"tasks": [{"operator": "PseudonymiseOperator", "task_id": "...", "upstream": "<task_id>", ...kwargs}],
   "mapped": {"conn_id": ..., "table": ..., "key": ..., "parts": 2, "task": {...kwargs}}}``
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from airflow.sdk import DAG, CronDataIntervalTimetable, task
from pseudonymise import operators

spec = json.loads(os.environ.get("PSEUDONYMISE_TEST_DAG", "{}"))

with DAG(
    dag_id="pseudonymise_test",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 11, 1),
    catchup=False,
):
    made = {}
    for i, item in enumerate(spec.get("tasks", [])):
        kwargs = dict(item)
        op = getattr(operators, kwargs.pop("operator"))
        upstream = kwargs.pop("upstream", None)
        made[item.get("task_id", f"task_{i}")] = op(task_id=kwargs.pop("task_id", f"task_{i}"), **kwargs)
        if upstream:
            made[upstream] >> made[item.get("task_id", f"task_{i}")]

    mapped = spec.get("mapped")
    if mapped:

        @task
        def key_ranges() -> list[dict]:
            return operators.key_range_kwargs(mapped["conn_id"], mapped["table"], mapped["key"], mapped["parts"])

        operators.PseudonymiseOperator.partial(task_id="mapped", **mapped["task"]).expand_kwargs(key_ranges())
