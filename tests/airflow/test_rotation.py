"""Key rotation: a new key version for the project, the documented re-key of an existing table
through escrow, and the audit recording which key version made each load."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pseudonymise.core.issuer import Issuer

from tests.airflow.conftest import audit_rows, dag_spec, expected_pseudonyms, rows, token_conn

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]


def test_rotation_and_rekey_through_escrow(world: dict[str, Any]) -> None:
    issuer: Issuer = world["issuer"]
    airflow = world["airflow"]
    load = dag_spec(world, write_mode="replace", sql="SELECT visit_id, patient_id, ward FROM patient_visits",
                    parameters={})
    run = airflow.dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=load)
    assert run.returncode == 0, run.output[-3000:]
    before = rows(world["urls"]["research"], "visits", "visit_id")

    rotated = issuer.rotate_key("research-a")
    assert rotated.key_version == 2
    v2 = issuer.issue("research-a", "pseudonymisation")
    connections = {**world["connections"],
                   "pseudonymise_research_v2": token_conn(v2, issuer, "research-a"),
                   "pseudonymise_research_reverse": token_conn(issuer.issue("research-a", "reverse"), issuer,
                                                               "research-a")}
    fresh = dag_spec(world, write_mode="replace", sql="SELECT visit_id, patient_id, ward FROM patient_visits",
                     parameters={}, target_table="visits_fresh_v2", pseudonymise_conn_id="pseudonymise_research_v2")
    rekey = {"tasks": [{"operator": "RekeyPseudonymsOperator", "task_id": "rekey", "columns": {"patient_id": ""},
                        "reverse_conn_id": "pseudonymise_research_reverse",
                        "pseudonymise_conn_id": "pseudonymise_research_v2",
                        "target_conn_id": "research_db", "target_table": "visits"}]}
    for spec in (fresh, rekey):
        run = airflow.dags_test("pseudonymise_test", "2026-11-04", connections, spec=spec)
        assert run.returncode == 0, run.output[-3000:]

    after = rows(world["urls"]["research"], "visits", "visit_id")
    expected = rows(world["urls"]["research"], "visits_fresh_v2", "visit_id")
    assert after == expected  # re-keyed pseudonyms equal a fresh v2 load: joins survive rotation
    # and both are the v2 key's pseudonyms, written out again with the standard library (tests.reference)
    assert sorted(r[1] for r in after if r[1] is not None) == expected_pseudonyms(
        v2, world["urls"]["hospital"], "1900-01-01", "2100-01-01")
    assert [r[0] for r in after] == [r[0] for r in before]
    assert all(a[1] != b[1] for a, b in zip(after, before, strict=True))

    audit = audit_rows(world["urls"]["research"])
    versions = [json.loads(a["details"])["key_version"] for a in audit
                if a["event"] == "finished" and a["operation"] == "pseudonymise"]
    assert versions == [1, 2]
    rekey_uses = [a for a in audit if a["operation"] == "rekey" and a["event"] == "finished"]
    assert sorted(a["token_kind"] for a in rekey_uses) == ["pseudonymisation", "reverse"]
    assert {a["outcome"] for a in rekey_uses} == {"success"}
