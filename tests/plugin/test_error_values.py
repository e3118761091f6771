"""No data value in any error, as the plugin's API and audit page show the audit (to any reader, a viewer too).

The faults of ``tests/core/test_error_values.py`` (a cast that fails over a patient id in the source
query, a patient's name sent to an integer column of the target) run into a PostgreSQL database that
holds the target and the audit, configured as the plugin's ``audit_conn_id``; then ``GET …/audit`` and
the audit page must show the failed uses with their SQLSTATE, and none of the sample's values.
"""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import DataIOError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableTarget
from pseudonymise.core.use import GivenToken, RunContext

from tests.plugin.conftest import Api
from tests.sample import assert_no_value, load_sample

pytestmark = pytest.mark.postgres
BASE = "/pseudonymise/api/v1"


def _fail(engine: sa.Engine, issuer: Issuer, source: object, target: TableTarget, copy: bool) -> None:
    with pytest.raises(DataIOError):
        policy = ColumnPolicy.pseudonymise("patient_id", default="keep")
        sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, use_copy=copy, pseudonymised=["patient_id"]),
                           copy_text=copy)
        transfer = plan_transfer(source, sink, policy, source_label="hospital:query",  # type: ignore[arg-type]
                                 target_label="research:visits")
        run_pseudonymisation(Store(engine), GivenToken(issuer.issue("research-a", "pseudonymisation"),
                                                       issuer.public_keys()), policy, transfer,
                             RunContext(dag_id="extract", task_id="pseudonymise", run_id="r1"))


def test_the_audit_api_and_page_show_no_value_of_a_failed_run(api: Api, pg_url: str, issuer: Issuer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sa.create_engine(pg_url)
    load_sample(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visits (visit_id bigint, patient_id text, name integer, birth_year integer)"))
    cast = ("SELECT visit_id, patient_id::bigint AS patient_id, name, birth_year FROM patient_visits"
            " ORDER BY visit_id")
    _fail(engine, issuer, PostgresCopySource(engine, cast, batch_size=50), TableTarget("visits"), copy=True)
    kept = "SELECT visit_id, patient_id, name, birth_year FROM patient_visits ORDER BY visit_id"
    _fail(engine, issuer, PostgresCopySource(engine, kept, batch_size=50), TableTarget("visits"), copy=True)
    _fail(engine, issuer, SqlSource(engine, kept, batch_size=50), TableTarget("visits"), copy=False)

    url = sa.make_url(pg_url)
    conn_id = f"audit_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(
        {"conn_type": "postgres", "host": url.host, "port": url.port, "login": url.username, "schema": url.database}))
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID", conn_id)

    answer = api.client.get(f"{BASE}/audit", headers=api.auth("viewer"))
    assert answer.status_code == 200, answer.text
    assert_no_value([answer.text], where="the API's audit rows")
    failed = [r for r in answer.json()["rows"] if r["outcome"] == "failed"]
    assert [r["error_class"] for r in failed] == ["DatabaseIOError"] * 3
    assert all("SQLSTATE 22P02" in r["error_message"] and "InvalidTextRepresentation" in r["error_message"]
               for r in failed)
    assert sum("column 'name'" in r["error_message"] for r in failed) == 1  # COPY names it; INSERT cannot

    page = api.client.get("/pseudonymise/audit", headers=api.auth("viewer"))
    assert page.status_code == 200, page.text[:2000]
    assert_no_value([page.text], where="the audit page")
    assert "DatabaseIOError" in page.text
    engine.dispose()
