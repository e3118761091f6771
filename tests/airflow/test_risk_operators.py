"""The risk gate, dry runs and ``RiskReportOperator`` in real Airflow (``airflow dags test``) on real PostgreSQL.

One DAG run holds four independent tasks, so Airflow starts once: a dry run, a risk report of the source
table, a run whose gate fails and a run whose gate passes. Expectations come from pandas ``groupby`` over the
source rows (read straight from PostgreSQL), never from the module under test.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from tests.airflow.conftest import audit_rows, dag_spec

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]

DAY = "SELECT visit_id, patient_id, birth_year, visit_date, ward FROM patient_visits" \
      " WHERE visit_date >= '2026-11-01' AND visit_date < '2026-11-08'"


def _expected(frame: pd.DataFrame, qis: list[str], k: int) -> dict[str, int]:
    sizes = frame.groupby(qis, dropna=False).size()
    return {"rows": len(frame), "classes": len(sizes), "smallest_class": int(sizes.min()),
            "classes_below_k": int((sizes < k).sum()), "rows_below_k": int(sizes[sizes < k].sum())}


def _pick(found: dict[str, Any], expected: dict[str, int]) -> dict[str, Any]:
    return {key: found[key] for key in expected}


def _counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        names = sa.inspect(conn).get_table_names()
        counts = {n: int(conn.execute(sa.text(f'SELECT count(*) FROM "{n}"')).scalar_one()) for n in names}
    engine.dispose()
    return counts


def test_gate_dry_run_and_report_in_one_dag_run(world: dict[str, Any]) -> None:
    base = dag_spec(world, sql=DAY, parameters={})["tasks"][0]
    strict = {"quasi_identifiers": ["birth_year", "ward"], "k": 5}
    loose = {"quasi_identifiers": ["ward"], "k": 2}
    spec = {"tasks": [
        {**base, "task_id": "dry", "dry_run": True, "sample": 40, "risk": strict, "target_table": "visits_dry"},
        {"operator": "RiskReportOperator", "task_id": "report", "source_conn_id": "hospital_db",
         "source_table": "patient_visits", "quasi_identifiers": ["birth_year", "ward"], "k": 5,
         "audit_conn_id": "research_db"},
        {**base, "task_id": "gate_fails", "risk": strict, "target_table": "visits_fail"},
        {**base, "task_id": "gate_passes", "risk": loose, "target_table": "visits_ok"},
    ]}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
    assert run.returncode != 0  # gate_fails fails the DAG run
    hospital = sa.create_engine(world["urls"]["hospital"])
    with hospital.connect() as conn:
        week = pd.read_sql(sa.text(DAY + " ORDER BY visit_id"), conn)
        table = pd.read_sql(sa.text("SELECT * FROM patient_visits"), conn)
    hospital.dispose()

    audit = audit_rows(world["urls"]["research"])  # the chain verifies
    finished = {a["task_id"]: a for a in audit if a["event"] == "finished"}
    details = {task: json.loads(row["details"] or "{}") for task, row in finished.items()}
    assert {t: (finished[t]["operation"], finished[t]["outcome"]) for t in finished} == {
        "dry": ("dry_run", "success"), "report": ("risk_report", "success"),
        "gate_fails": ("pseudonymise", "failed"), "gate_passes": ("pseudonymise", "success")}

    # the dry run: the sample's figures, nothing written
    sample = week.head(40)
    dry = details["dry"]["dry_run"]
    assert dry["sample_rows"] == 40 and dry["target_exists"] is False
    assert _pick(dry["risk"], _expected(sample, ["birth_year", "ward"], 5)) == _expected(sample, ["birth_year", "ward"], 5)
    assert "dry run, nothing written: 40 rows sampled" in run.output

    # the report of the whole source table, with every combination of its quasi-identifiers
    report = details["report"]["risk_report"]
    assert _pick(report, _expected(table, ["birth_year", "ward"], 5)) == _expected(table, ["birth_year", "ward"], 5)
    combos = {tuple(c["quasi_identifiers"]): c for c in report["combinations"]}
    for qis in (("birth_year",), ("ward",), ("birth_year", "ward")):
        expected = _expected(table, list(qis), 5)
        assert combos[qis]["rows_below_k"] == expected["rows_below_k"]
        assert combos[qis]["classes_below_k"] == expected["classes_below_k"]

    # the failed gate: its figures in the audit, nothing of it committed
    expected = _expected(week, ["birth_year", "ward"], 5)
    assert _pick(details["gate_fails"]["risk"], expected) == expected
    assert finished["gate_fails"]["error_class"] == "RiskGateError"
    assert f"{expected['classes_below_k']} of {expected['classes']} classes" in finished["gate_fails"]["error_message"]

    # the passing gate: rows written, k and the classes below k in the audit
    expected = _expected(week, ["ward"], 2)
    assert _pick(details["gate_passes"]["risk"], expected) == expected
    counts = _counts(world["urls"]["research"])
    assert counts["visits_ok"] == len(week)
    assert "visits_fail" not in counts and "visits_dry" not in counts
    # escrow holds the passing run's pseudonyms only: one per distinct patient of the week
    assert counts["pseudonymise_escrow"] == week["patient_id"].str.strip().str.upper().nunique()
    for value in week["patient_id"]:
        assert value.strip() not in json.dumps(details)


def test_bad_risk_settings_fail_when_the_dag_loads() -> None:
    from pseudonymise.core.errors import PolicyError
    from pseudonymise.operators import PseudonymiseOperator, RiskReportOperator

    with pytest.raises(PolicyError, match="k must be an integer of at least 2"):
        PseudonymiseOperator(task_id="t", columns=["patient_id"], risk={"quasi_identifiers": ["ward"], "k": 1})
    templated = PseudonymiseOperator(task_id="t", columns=["patient_id"], risk={"quasi_identifiers": "{{ params.qi }}"})
    assert templated.risk == {"quasi_identifiers": "{{ params.qi }}"} and "risk" in templated.template_fields
    with pytest.raises(ValueError, match="either risk or quasi_identifiers"):
        RiskReportOperator(task_id="r", quasi_identifiers=["ward"], risk={"quasi_identifiers": ["ward"]})
