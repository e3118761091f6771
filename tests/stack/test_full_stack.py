"""The whole stack from plain processes: PostgreSQL, OpenBao, Airflow API server, scheduler and DAG
processor (LocalExecutor); the token connection comes from Vault through the VaultBackend.

A run is triggered through the REST API as a real client would, then `airflow backfill create`
covers three days twice; target rows, audit rows and the logs are checked in PostgreSQL and on disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog

from scripts.full_stack import DAG_ID, FullStack

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault]


def test_full_stack_rest_trigger_and_backfill_twice(tmp_path: Path) -> None:
    t0 = time.monotonic()
    stack = FullStack(tmp_path / "stack").start()
    try:
        stack.wait_for_dag(DAG_ID)
        stack.trigger(DAG_ID, "2026-11-06T00:00:00Z")
        stack.wait_for_runs(DAG_ID, 1)
        snapshots = []
        for reprocess in ("none", "completed"):
            stack.backfill(DAG_ID, "2026-11-03", "2026-11-05", reprocess)
            stack.wait_for_runs(DAG_ID, 4)
            snapshots.append(stack.research_rows(
                "SELECT * FROM patient_visits_pseudonymised ORDER BY visit_date, patient_id, birth_year"))
        runs = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
        assert {r["state"] for r in runs} == {"success"}, runs
        assert {r["run_type"] for r in runs} >= {"manual", "backfill"}
        assert snapshots[0] == snapshots[1]
        per_day = dict(stack.research_rows(
            "SELECT visit_date::text, count(*) FROM patient_visits_pseudonymised GROUP BY 1"))
        assert {d: per_day[d] for d in ("2026-11-03", "2026-11-04", "2026-11-05")} == \
            {"2026-11-03": 24, "2026-11-04": 24, "2026-11-05": 24}

        engine = sa.create_engine(stack.pg.url("research"))
        audit = AuditLog(engine)
        assert audit.verify().ok
        rows = list(audit.iter_rows())
        finished = [r for r in rows if r["event"] == "finished"]
        # one use per task run: 1 REST-triggered, the scheduler's own latest interval, 3 + 3 backfill
        # (the reprocessing backfill reuses the run ids with a new try number)
        task_runs = {(r["run_id"], r["try_number"]) for r in rows}
        assert len(finished) == len({r["use_id"] for r in rows}) == len(task_runs) == 8
        assert {r["outcome"] for r in finished} == {"success"}
        assert {r["token_kind"] for r in finished} == {"pseudonymisation"}
        engine.dispose()

        # 8 mapped tasks over key ranges, running at once (parallelism 8) on one target and one audit
        mapped_dag = "pseudonymise_visits_by_key_range"
        stack.wait_for_dag(mapped_dag)
        run_id = stack.request("POST", f"/api/v2/dags/{mapped_dag}/dagRuns", {"logical_date": None})["dag_run_id"]
        runs = stack.wait_for_runs(mapped_dag, 1)
        assert {r["state"] for r in runs} == {"success"}, runs
        tis = stack.request("GET", f"/api/v2/dags/{mapped_dag}/dagRuns/{run_id}/taskInstances?limit=100")
        mapped = [t for t in tis["task_instances"] if t["task_id"] == "pseudonymise_range"]
        assert sorted(t["map_index"] for t in mapped) == list(range(8)) and {t["state"] for t in mapped} == {"success"}
        assert stack.research_rows("SELECT count(*), count(DISTINCT visit_id) FROM patient_visits_all_pseudonymised") \
            == [(240, 240)]
        engine = sa.create_engine(stack.pg.url("research"))
        audit = AuditLog(engine)
        assert audit.verify().ok
        mapped_uses = [r for r in audit.iter_rows() if r["dag_id"] == mapped_dag and r["event"] == "finished"]
        assert sorted(r["map_index"] for r in mapped_uses) == list(range(8))
        assert {r["outcome"] for r in mapped_uses} == {"success"}
        engine.dispose()

        logs = "\n".join(p.read_text(errors="replace") for p in (stack.work / "airflow").rglob("*.log"))
        logs += "\n".join(p.read_text(errors="replace") for p in stack.work.glob("*.log"))
        assert "pseudonymise: 24 rows in" in logs
        assert stack.token not in logs
    finally:
        stack.stop()
    print(f"\nfull-stack test wall time: {time.monotonic() - t0:.0f} s")
