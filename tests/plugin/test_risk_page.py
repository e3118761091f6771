"""The Risk page through Airflow's real API server app: the latest risk reports, the chosen one's class-size chart
and combinations, and the risk gates of recent runs; figures checked against pandas, never a data value shown."""

from __future__ import annotations

import random
import re

import pandas as pd
import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import RiskGateError
from pseudonymise.core.pipeline import run_pseudonymisation, run_risk_report
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.risk import RiskSpec, describe_table, size_bins
from pseudonymise.core.use import GivenToken, RunContext
from pseudonymise.plugin.batch import MemorySink, RecordBatch

from tests.plugin.conftest import Api, AuditDb, TokenConnections, page


def _extract(n: int, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    return pd.DataFrame({"birth_band": [rng.choice(["1940-44", "1945-49", "1950-54", "1955-59"]) for _ in range(n)],
                         "postcode3": [rng.choice(["QX1", "QX2", "QX3", "QX4", "QX5", "QX6", "QX7"]) for _ in range(n)],
                         "sex": [rng.choice(["F", "M"]) for _ in range(n)]})


def _report(audit_db: AuditDb, frame: pd.DataFrame, name: str, k: int, task_id: str) -> None:
    frame.to_sql(name, audit_db.store.engine, index=False)
    spec = RiskSpec(("birth_band", "postcode3", "sex"), k)

    def describe():  # type: ignore[no-untyped-def]
        with audit_db.store.engine.connect() as conn:
            return describe_table(conn, name, spec)
    run = RunContext(dag_id="risk_dag", task_id=task_id, run_id="manual__1", map_index=-1)
    run_risk_report(audit_db.store, describe, run, source=f"table:{name}", columns=spec.columns)


def test_risk_page_charts_the_chosen_report_and_lists_gates(api: Api, audit_db: AuditDb,
                                                            token_connections: TokenConnections) -> None:
    older, newer = _extract(300, 1), _extract(120, 2)
    _report(audit_db, older, "older", 3, "report_older")
    _report(audit_db, newer, "newer", 5, "report_newer")
    token, issuer = token_connections.tokens["pseudonymise"], token_connections.issuer
    policy = ColumnPolicy.from_mapping({"columns": {"patient_id": "pseudonymise"}, "default": "keep"})
    transfer = plan_transfer(RecordBatch(["patient_id", "ward"], [["P-1", "W1"], ["P-2", "W1"], ["P-3", "W2"]]),
                             SinkFactory(lambda columns, _conn: MemorySink(columns)), policy)
    with pytest.raises(RiskGateError):
        run_pseudonymisation(audit_db.store, GivenToken(token, issuer.public_keys()), policy, transfer,
                             RunContext(dag_id="risk_dag", task_id="gated", run_id="manual__1", map_index=-1),
                             risk=RiskSpec(("ward",), 2))

    html = page(api, "risk")
    assert 'id="size-chart"' in html and '<a href="risk" class="current">Risk</a>' in html
    sizes = newer.groupby(["birth_band", "postcode3", "sex"]).size()
    # the newest report is charted: one bar per non-empty bin, its classes and rows as pandas counts them
    bars = re.findall(r'data-size="([^"]+)" data-classes="(\d+)" data-rows="(\d+)" data-below-k="(\w+)"', html)
    expected = []
    for lo, hi in size_bins(5):
        inside = sizes[(sizes >= lo) & ((sizes <= hi) if hi is not None else True)]
        if len(inside):
            label = str(lo) if hi == lo else f"{lo}+" if hi is None else f"{lo}-{hi}"
            expected.append((label, str(len(inside)), str(int(inside.sum())), str(hi is not None and hi < 5).lower()))
    assert bars == expected
    below = int((sizes < 5).sum())
    assert f"{len(newer)} rows in {len(sizes)} classes" in html
    assert f"{below} classes ({int(sizes[sizes < 5].sum())} rows) below k=5" in html
    assert html.count("<tr") >= 2 + 7 + 1  # two reports, seven combinations, one gate
    gates = html.split('id="gates"', 1)[1]
    assert "risk_dag / gated" in gates and 'class="failed"' in gates and "b-failed" in gates
    for value in ("QX1", "1940-44", "P-1", "W1"):
        assert value not in html  # column names and counts only

    # choosing the older report charts it instead
    rows = re.findall(r'data-use="([0-9a-f-]{36})"', html)
    assert len(rows) == 2
    older_html = page(api, "risk", use_id=rows[1])
    older_sizes = older.groupby(["birth_band", "postcode3", "sex"]).size()
    assert f"{len(older)} rows in {len(older_sizes)} classes" in older_html


def test_risk_page_without_reports(api: Api, audit_db: AuditDb) -> None:
    html = page(api, "risk")
    assert 'id="no-reports"' in html and 'id="no-gates"' in html
    assert sa.inspect(audit_db.store.engine).has_table("pseudonymise_audit")
