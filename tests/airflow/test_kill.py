"""A task killed (SIGKILL) mid-load leaves the target exactly as it was and its audit ``started``
visible without ``finished``; the retry then produces the same rows as before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.airflow.conftest import AIRFLOW, audit_rows, dag_spec, rows

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]


def test_sigkill_mid_load_leaves_target_unchanged(world: dict[str, Any]) -> None:
    engine = sa.create_engine(world["urls"]["hospital"])
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO patient_visits SELECT 100000 + g, 'K' || g, 'Name ' || g, 1950 + g % 50, DATE '2026-11-07',"
            " NULL, 'general' FROM generate_series(1, 400000) g"))
    spec = dag_spec(world, write_mode="replace_partition", partition_column="visit_date", batch_size=5000)
    airflow = world["airflow"]
    first = airflow.dags_test("pseudonymise_test", "2026-11-08", world["connections"], spec=spec, timeout=600)
    assert first.returncode == 0, first.output[-3000:]
    before = rows(world["urls"]["research"], "visits", "visit_id")
    assert len(before) == 400024  # the sample's 24 visits of that day and the 400,000 added

    env = airflow.env(world["connections"], extra={"PSEUDONYMISE_TEST_DAG": json.dumps(spec)})
    proc = subprocess.Popen([AIRFLOW, "dags", "test", "pseudonymise_test", "2026-11-08"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    research = sa.create_engine(world["urls"]["research"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with research.connect() as conn:
            started = conn.execute(sa.text("SELECT count(*) FROM pseudonymise_audit WHERE event = 'started'")).scalar()
        if started == 2:
            break
        time.sleep(0.1)
    assert started == 2, "the second run never started"
    time.sleep(1.5)  # well inside the load of 400,000 rows
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    research.dispose()

    audit = audit_rows(world["urls"]["research"])
    assert [a["outcome"] for a in audit] == ["started", "success", "started"], "the kill came too late"
    assert rows(world["urls"]["research"], "visits", "visit_id") == before

    retry = airflow.dags_test("pseudonymise_test", "2026-11-08", world["connections"], spec=spec, timeout=600)
    assert retry.returncode == 0, retry.output[-3000:]
    assert rows(world["urls"]["research"], "visits", "visit_id") == before
