"""No data value in any error, through real Airflow (``airflow dags test``) on real PostgreSQL.

``PseudonymiseOperator`` runs the sample patients into a research database twice with a fault: a source
query whose cast fails over a patient id, and a kept column (the patient's name) sent to an integer
column of the target. The task must fail naming the SQLSTATE, the driver's class (and the column where
PostgreSQL names it), and no value of the sample may appear in the audit table, in the task's output or
in any log file the run wrote.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import sqlalchemy as sa

from tests.airflow.conftest import ROOT, DagRun, audit_rows, dag_spec
from tests.sample import assert_no_value, sample_values

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]


def _run_and_logs(world: dict[str, Any], spec: dict[str, Any]) -> tuple[DagRun, str]:
    """The DAG run, and the text of its output and of every log file written while it ran."""
    airflow = world["airflow"]
    started = time.time() - 1
    # the plugin of this tree (not only the one the virtual environment points at)
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
    run = airflow.dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec,
                            extra_env={"PYTHONPATH": path})
    texts = [run.output]
    for file in airflow.home.rglob("*"):
        if file.is_file() and file.stat().st_mtime >= started and not file.name.endswith((".db", ".pyc", "-wal",
                                                                                           "-journal", "-shm")):
            texts.append(file.read_text(errors="replace"))
    return run, "\n".join(texts)


def _check(world: dict[str, Any], run: DagRun, logs: str, facts: list[str]) -> None:
    assert run.returncode != 0
    audit = audit_rows(world["urls"]["research"])
    assert_no_value([logs], where="the task's output and logs")
    assert_no_value([repr(audit)], where="the audit")
    assert [(a["outcome"], a["error_class"]) for a in audit] == [("started", None), ("failed", "DatabaseIOError")]
    for fact in facts:  # the error did reach the task log and the audit, without the value
        assert fact in logs, logs[-4000:]
        assert fact in audit[1]["error_message"], audit[1]["error_message"]
    assert "The driver's message is left out" in audit[1]["error_message"]
    assert sample_values(), "the sample is empty"


def test_cast_error_in_the_source_query(world: dict[str, Any]) -> None:
    sql = ("SELECT visit_id, patient_id::bigint AS patient_id, birth_year, visit_date, ward FROM patient_visits"
           " WHERE visit_date >= :start AND visit_date < :end")
    run, logs = _run_and_logs(world, dag_spec(world, sql=sql))
    _check(world, run, logs, ["reading the source", "SQLSTATE 22P02", "InvalidTextRepresentation"])
    assert not sa.inspect(sa.create_engine(world["urls"]["research"])).has_table("visits")


@pytest.mark.parametrize("use_copy", [None, False], ids=["copy", "insert"])
def test_kept_column_into_a_wrongly_typed_target_column(world: dict[str, Any], use_copy: bool | None) -> None:
    research = sa.create_engine(world["urls"]["research"])
    with research.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visits (visit_id bigint, patient_id text, name integer, visit_date date)"))
    sql = ("SELECT visit_id, patient_id, name, visit_date FROM patient_visits"
           " WHERE visit_date >= :start AND visit_date < :end")
    run, logs = _run_and_logs(world, dag_spec(world, sql=sql, use_copy=use_copy))
    facts = ["the target", "SQLSTATE 22P02", "InvalidTextRepresentation"]
    _check(world, run, logs, [*facts, "column 'name'"] if use_copy is None else facts)
    with research.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM visits")).scalar_one() == 0
    research.dispose()
