"""The key-range example DAG on CeleryExecutor: Redis as the broker, two Celery workers as separate processes.

The stack is scripts/full_stack.py's with ``executor="celery"`` (PostgreSQL, OpenBao, API server,
scheduler, DAG processor, Redis started as an unprivileged user on loopback, two ``airflow celery
worker`` processes with their own hostnames). One stack serves every assertion: the mapped tasks run
on both workers (their task instances' recorded hostnames, through the REST API), the target
created by its own task before the ranges start, one audited use per mapped task, and the target
equal to a one-task run's and to the pseudonyms computed independently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog

from scripts.full_stack import FullStack
from tests.airflow.conftest import expected_pseudonyms

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.vault, pytest.mark.slow]

MAPPED_DAG = "pseudonymise_visits_by_key_range"
TARGET = "patient_visits_all_pseudonymised"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    started = FullStack(tmp_path_factory.mktemp("celery") / "stack", executor="celery", workers=2,
                        concurrency=4).start()
    try:
        yield started
    finally:
        started.stop()


def _run(stack: FullStack, parts: int) -> tuple[str, list[dict[str, Any]]]:
    """Trigger the key-range DAG with ``parts`` ranges through the REST API, wait for it, return its task instances."""
    run_id = stack.request("POST", f"/api/v2/dags/{MAPPED_DAG}/dagRuns",
                           {"logical_date": None, "conf": {"parts": parts}})["dag_run_id"]
    run = stack.wait_for_run(MAPPED_DAG, run_id, timeout=600, poll=2)
    tis = stack.request("GET", f"/api/v2/dags/{MAPPED_DAG}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
    assert run["state"] == "success", [(t["task_id"], t["map_index"], t["state"], t["hostname"]) for t in tis]
    return run_id, tis


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_key_ranges_on_two_celery_workers(stack: FullStack) -> None:
    t0 = time.monotonic()
    assert stack.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    stack.wait_for_dag(MAPPED_DAG)
    research = sa.create_engine(stack.pg.url("research"))
    assert not sa.inspect(research).has_table(TARGET)

    # 8 mapped ranges on a new target
    run_id, tis = _run(stack, 8)
    mapped = [t for t in tis if t["task_id"] == "pseudonymise_range"]
    assert sorted(t["map_index"] for t in mapped) == list(range(8)) and {t["state"] for t in mapped} == {"success"}
    # both workers ran ranges: the hostname each task instance recorded is its worker's
    by_host: dict[str, int] = {}
    for t in mapped:
        by_host[t["hostname"]] = by_host.get(t["hostname"], 0) + 1
    assert set(by_host) == set(stack.worker_hostnames), by_host
    # the target was created by its own task, finished before any range started
    create = next(t for t in tis if t["task_id"] == "create_target")
    assert create["state"] == "success" and create["hostname"] in stack.worker_hostnames
    assert _instant(create["end_date"]) <= min(_instant(t["start_date"]) for t in mapped)
    mapped_rows = stack.research_rows(f"SELECT * FROM {TARGET} ORDER BY visit_id")
    assert len(mapped_rows) == 240 and len({r[0] for r in mapped_rows}) == 240

    # one audited use per mapped task, each started and finished with success; the chain holds
    audit = AuditLog(research)
    assert audit.verify().ok
    rows = [r for r in audit.iter_rows() if r["dag_id"] == MAPPED_DAG and r["run_id"] == run_id]
    finished = [r for r in rows if r["event"] == "finished"]
    assert sorted(r["map_index"] for r in finished) == list(range(8))
    assert {r["outcome"] for r in finished} == {"success"}
    assert len({r["use_id"] for r in rows}) == 8 and len(rows) == 16
    assert sum(r["rows_out"] for r in finished) == 240
    # each use names the worker that used the token, as its task instance does
    assert {r["map_index"]: r["host"] for r in finished} == {t["map_index"]: t["hostname"] for t in mapped}
    assert {r["task_id"] for r in rows} == {"pseudonymise_range"}  # creating the target uses no token

    # the same DAG as one task over the whole table, into a fresh target: the same rows
    with research.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {TARGET} RENAME TO mapped_run"))
    _, tis = _run(stack, 1)
    assert [t["map_index"] for t in tis if t["task_id"] == "pseudonymise_range"] == [0]
    assert stack.research_rows(f"SELECT * FROM {TARGET} ORDER BY visit_id") == mapped_rows
    assert stack.research_rows(f"SELECT count(*) FROM (SELECT * FROM mapped_run EXCEPT ALL SELECT * FROM {TARGET}) d") \
        == [(0,)]
    # and the pseudonyms are those docs/design.md §4 gives, computed with the standard library
    assert sorted(r[0] for r in stack.research_rows(f"SELECT patient_id FROM {TARGET}") if r[0] is not None) == \
        expected_pseudonyms(stack.token, stack.pg.url("hospital"), "1900-01-01", "2100-01-01")
    research.dispose()

    logs = "\n".join(p.read_text(errors="replace") for p in (stack.work / "airflow").rglob("*.log"))
    logs += "\n".join(p.read_text(errors="replace") for p in stack.work.glob("*.log"))
    assert stack.token not in logs and stack.redis.password not in logs
    print(f"\ncelery stack: up in {stack.started_in:.0f} s, test {time.monotonic() - t0:.0f} s; ranges per worker {by_host}")
