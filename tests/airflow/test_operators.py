"""The operators in real Airflow (``airflow dags test``) against real PostgreSQL.

Source, target, audit and escrow are PostgreSQL databases of the session's throwaway cluster;
tokens come from a plain ``pseudonymise`` connection unless a test says otherwise.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer

from tests import reference
from tests.airflow.conftest import (
    EXAMPLE_DAGS,
    ROOT,
    audit_rows,
    dag_spec,
    expected_pseudonyms,
    forged_token,
    rows,
    token_conn,
)

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]


def test_example_dag_end_to_end_on_postgres(world: dict[str, Any]) -> None:
    run = world["airflow"].dags_test("pseudonymise_patient_extract", "2026-11-04", world["connections"],
                                     dags_folder=EXAMPLE_DAGS)
    assert run.returncode == 0, run.output[-4000:]
    out = rows(world["urls"]["research"])
    # interval [2026-11-03, 2026-11-04): the sample has 24 visits that day
    assert len(out) == 24
    assert all(r[2] == dt.date(2026, 11, 3) for r in out)  # visit_date kept, typed as date (COPY carried the type)
    assert sorted(r[0] for r in out) == expected_pseudonyms(world["token"], world["urls"]["hospital"], "2026-11-03",
                                                            "2026-11-04")
    audit = audit_rows(world["urls"]["research"])
    assert [a["outcome"] for a in audit] == ["started", "success"]
    finished = audit[1]
    assert finished["dag_id"] == "pseudonymise_patient_extract" and finished["task_id"] == "pseudonymise_visits"
    assert finished["rows_in"] == finished["rows_out"] == 24 and finished["escrow_rows"] > 0
    assert finished["data_interval_start"].startswith("2026-11-03")
    assert finished["token_jti"] == reference.claims(world["token"])["jti"]
    assert world["token"] not in run.output
    assert world["token"] not in json.dumps(audit, default=str)


def test_backfill_three_days_twice_gives_identical_rows_and_one_use_per_run(world: dict[str, Any]) -> None:
    days = ["2026-11-03", "2026-11-04", "2026-11-05"]
    snapshots = []
    for _ in range(2):
        for day in days:
            run = world["airflow"].dags_test("pseudonymise_patient_extract", day, world["connections"],
                                             dags_folder=EXAMPLE_DAGS)
            assert run.returncode == 0, run.output[-3000:]
        snapshots.append(rows(world["urls"]["research"]))
    assert snapshots[0] == snapshots[1]
    assert len(snapshots[0]) == 24 * 3
    audit = audit_rows(world["urls"]["research"])
    uses = {a["use_id"] for a in audit}
    assert len(uses) == 6
    assert sorted(a["outcome"] for a in audit if a["event"] == "finished") == ["success"] * 6


@pytest.mark.parametrize("mode, expected_factor", [("append", 2), ("replace_partition", 1), ("upsert", 1),
                                                   ("replace", 1)])
def test_write_modes_on_a_rerun(world: dict[str, Any], mode: str, expected_factor: int) -> None:
    extra: dict[str, Any] = {"write_mode": mode}
    if mode == "replace_partition":
        extra["partition_column"] = "visit_date"
    if mode == "upsert":
        extra["upsert_key"] = ["visit_id"]
    spec = dag_spec(world, **extra)
    for _ in range(2):
        run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
        assert run.returncode == 0, run.output[-3000:]
    out = rows(world["urls"]["research"], "visits", "visit_id")
    assert len(out) == 24 * expected_factor
    assert len({r[0] for r in out}) == 24


def test_replace_partition_keeps_other_days(world: dict[str, Any]) -> None:
    spec = dag_spec(world, write_mode="replace_partition", partition_column="visit_date")
    for day in ("2026-11-04", "2026-11-05", "2026-11-04"):
        run = world["airflow"].dags_test("pseudonymise_test", day, world["connections"], spec=spec)
        assert run.returncode == 0, run.output[-3000:]
    out = rows(world["urls"]["research"], "visits", "visit_id")
    assert sorted({r[3] for r in out}) == [dt.date(2026, 11, 3), dt.date(2026, 11, 4)]
    assert len(out) == 48


def test_missing_column_fails_before_any_write(world: dict[str, Any]) -> None:
    spec = dag_spec(world, columns={"patient_id": "pseudonymise", "no_such_column": "pseudonymise"})
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
    assert run.returncode != 0
    assert "no_such_column" in run.output and "not in the source" in run.output
    engine = sa.create_engine(world["urls"]["research"])
    assert not sa.inspect(engine).has_table("visits")
    audit = audit_rows(world["urls"]["research"])
    assert [a["outcome"] for a in audit] == ["started", "failed"]
    assert audit[1]["error_class"] == "PolicyError"


def test_unsupported_type_fails_before_any_write(world: dict[str, Any]) -> None:
    spec = dag_spec(world, sql="SELECT visit_id, birth_year::float8 AS score FROM patient_visits",
                    columns={"score": "pseudonymise"}, parameters={})
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
    assert run.returncode != 0
    assert "score" in run.output and "double precision" in run.output
    engine = sa.create_engine(world["urls"]["research"])
    assert not sa.inspect(engine).has_table("visits")


@pytest.mark.parametrize("case", ["expired", "not_yet_valid", "wrong_kind", "wrong_project", "unknown_issuer",
                                  "tampered", "revoked"])
def test_denied_uses_are_audited_and_write_nothing(world: dict[str, Any], case: str, tmp_path: Path) -> None:
    issuer: Issuer = world["issuer"]
    project = "research-a"
    if case == "expired":
        token = forged_token(issuer, project, exp_offset=-3600)
    elif case == "not_yet_valid":
        token = forged_token(issuer, project, nbf_offset=3600, exp_offset=7200)
    elif case == "wrong_kind":
        token = issuer.issue(project, "reverse")
    elif case == "wrong_project":
        token, project = issuer.issue("research-b", "pseudonymisation"), "research-a"
    elif case == "unknown_issuer":
        from pseudonymise.core.issuer import DirectoryStore

        other = Issuer.init(DirectoryStore(tmp_path / "other"), "rogue")
        other.create_project(project)
        token = other.issue(project, "pseudonymisation")
    elif case == "revoked":  # revoked in the audit the operator writes to (docs/design.md §3, v1.1)
        from pseudonymise.core.audit import AuditLog, AuditUse
        from pseudonymise.core.tokens import verify_token

        token = issuer.issue(project, "pseudonymisation")
        revoking = AuditLog(sa.create_engine(world["urls"]["research"]))
        revoking.revoke(verify_token(token, issuer.public_keys()).jti, "test", AuditUse(operation="revoke"))
        revoking.engine.dispose()
    else:
        head, payload, sig = issuer.issue(project, "pseudonymisation").split(".")
        from pseudonymise.core.tokens import b64url_decode, b64url_encode

        claims = json.loads(b64url_decode(payload))
        claims["sub"] = "research-b"
        token = ".".join([head, b64url_encode(json.dumps(claims).encode()), sig])
    connections = {**world["connections"], "pseudonymise_research": token_conn(token, issuer, project)}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections, spec=dag_spec(world))
    assert run.returncode != 0
    expected = {"expired": "TokenExpiredError", "not_yet_valid": "TokenNotYetValidError", "wrong_kind": "TokenKindError",
                "wrong_project": "TokenProjectError", "unknown_issuer": "UnknownIssuerKeyError",
                "tampered": "TokenSignatureError", "revoked": "TokenRevokedError"}[case]
    audit = [a for a in audit_rows(world["urls"]["research"]) if a["operation"] != "revoke"]
    assert [a["outcome"] for a in audit] == ["started", "denied"]
    assert audit[1]["error_class"] == expected
    assert token not in run.output and token not in json.dumps(audit, default=str)
    assert not sa.inspect(sa.create_engine(world["urls"]["research"])).has_table("visits")


def test_mapped_key_ranges_equal_single_task(world: dict[str, Any]) -> None:
    base = dag_spec(world, sql="SELECT visit_id, patient_id, birth_year, visit_date, ward FROM patient_visits",
                    parameters={}, write_mode="replace", target_table="visits_single")["tasks"][0]
    single = {"tasks": [base]}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=single)
    assert run.returncode == 0, run.output[-3000:]
    mapped_task = {k: v for k, v in base.items() if k not in ("operator", "task_id", "parameters")}
    mapped_task.update({
        "sql": "SELECT visit_id, patient_id, birth_year, visit_date, ward FROM patient_visits"
               " WHERE visit_id >= :lo AND (CAST(:hi AS bigint) IS NULL OR visit_id < :hi)",
        "target_table": "visits_mapped", "write_mode": "replace_partition", "partition_column": "visit_id",
    })
    spec = {"mapped": {"conn_id": "hospital_db", "table": "patient_visits", "key": "visit_id", "parts": 2,
                       "task": mapped_task}}
    for _ in range(2):  # re-running the mapped tasks replaces exactly their ranges
        run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
        assert run.returncode == 0, run.output[-3000:]
    assert rows(world["urls"]["research"], "visits_mapped", "visit_id") == rows(world["urls"]["research"],
                                                                                "visits_single", "visit_id")
    audit = audit_rows(world["urls"]["research"])
    mapped_uses = {(a["use_id"], a["map_index"]) for a in audit if a["task_id"] == "mapped"}
    assert sorted(m for _, m in mapped_uses) == [0, 0, 1, 1]


def test_secondary_reverse_and_purge_example_dags(world: dict[str, Any], tmp_path: Path) -> None:
    issuer: Issuer = world["issuer"]
    run = world["airflow"].dags_test("pseudonymise_patient_extract", "2026-11-04", world["connections"],
                                     dags_folder=EXAMPLE_DAGS)
    assert run.returncode == 0, run.output[-3000:]
    vendor_token = issuer.issue("vendor-x", "secondary", source_project="research-a")
    reverse_token = issuer.issue("research-a", "reverse")
    connections = {**world["connections"],
                   "pseudonymise_vendor": token_conn(vendor_token, issuer, "vendor-x"),
                   "pseudonymise_research_reverse": token_conn(reverse_token, issuer, "research-a")}
    run = world["airflow"].dags_test("pseudonymise_vendor_share", "2026-11-04", connections, dags_folder=EXAMPLE_DAGS)
    assert run.returncode == 0, run.output[-3000:]
    research = rows(world["urls"]["research"])
    vendor = rows(world["urls"]["vendor"], "vendor_patient_visits", "patient_id")
    assert len(vendor) == len(research) == 24
    assert not {r[0] for r in vendor} & {r[0] for r in research}

    requests = tmp_path / "requests.csv"
    picked = sorted({r[0] for r in research})[:3]
    requests.write_text("patient_id\n" + "\n".join(picked) + "\nunknownpseudonym\n")
    output = tmp_path / "revealed.csv"
    # The example reversal DAG waits for a person's approval (tests/stack/test_four_eyes.py runs it with the
    # API server); here the operator alone. First four eyes, with no API server to read the approval from:
    # refused before the token is read, audited denied, nothing written.
    reveal = {"operator": "ReversePseudonymsOperator", "task_id": "reveal",
              "pseudonymise_conn_id": "pseudonymise_research_reverse", "pseudonym_columns": ["patient_id"],
              "source_path": str(requests), "target_path": str(output), "audit_conn_id": "research_db",
              "reason": "check of a data quality complaint", "airflow_api_conn_id": "airflow_api"}
    api_down = {**connections, "airflow_api": {"conn_type": "http", "host": "http://127.0.0.1", "port": 9,
                                               "login": "viewer", "password": "not-a-real-password"}}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", api_down, spec={"tasks": [reveal]})
    assert run.returncode != 0 and not output.exists()
    assert "is unreachable" in run.output and "not-a-real-password" not in run.output
    refused = [a for a in audit_rows(world["urls"]["research"]) if a["operation"] == "reverse"]
    assert [a["outcome"] for a in refused][-2:] == ["started", "denied"]
    assert refused[-1]["token_jti"] is None and refused[-1]["error_class"] == "ApprovalUnavailableError"
    assert json.loads(refused[-1]["details"])["four_eyes"]["reason"] == "check of a data quality complaint"

    # Four eyes waived by the DAG (require_approval=False): it runs, and the audit says it was waived.
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections,
                                     spec={"tasks": [{**reveal, "require_approval": False}]})
    assert run.returncode == 0, run.output[-3000:]
    assert "four eyes WAIVED" in run.output
    revealed = [r["patient_id"] for r in csv.DictReader(output.open())]
    engine = sa.create_engine(world["urls"]["hospital"])
    with engine.connect() as conn:
        originals = {str(r[0]).strip().upper() for r in conn.execute(sa.text("SELECT patient_id FROM patient_visits"))}
    assert all(v in originals for v in revealed[:3]) and revealed[3] == ""
    for value in revealed[:3]:
        assert value not in run.output  # originals go to the target only, never to the log
    audit = audit_rows(world["urls"]["research"])
    reverse_rows = [a for a in audit if a["operation"] == "reverse"][-2:]
    assert [a["outcome"] for a in reverse_rows] == ["started", "success"]
    assert reverse_rows[0]["seq"] < reverse_rows[1]["seq"]
    assert json.loads(reverse_rows[1]["details"])["four_eyes"]["via"] == "waived"

    run = world["airflow"].dags_test("pseudonymise_retention_purge", "2026-11-04", connections,
                                     dags_folder=EXAMPLE_DAGS)
    assert run.returncode == 0, run.output[-3000:]
    assert [a["outcome"] for a in audit_rows(world["urls"]["research"]) if a["operation"] == "purge"] == \
        ["started", "success"]


def _hospital_days(url: str) -> dict[str, int]:
    with sa.create_engine(url).connect() as conn:
        return {str(d): n for d, n in conn.execute(sa.text(
            "SELECT visit_date, count(*) FROM patient_visits GROUP BY visit_date"))}


def test_source_retire_after_a_verified_load(world: dict[str, Any], tmp_path: Path) -> None:
    """SourceRetireOperator downstream of the load: the interval's source rows are exported (through
    object storage, a file:// URL) and deleted once the audit holds the load's success with as many rows;
    run without a load of the interval, it fails, names the reason and deletes nothing."""
    before = _hospital_days(world["urls"]["hospital"])
    retire = {"operator": "SourceRetireOperator", "task_id": "retire", "source_conn_id": "hospital_db",
              "table": "patient_visits", "interval_column": "visit_date", "load_task_id": "pseudonymise",
              "audit_conn_id": "research_db"}
    alone = world["airflow"].dags_test("pseudonymise_test", "2026-11-05", world["connections"],
                                       spec={"tasks": [retire]})
    assert alone.returncode != 0 and "no successful 'pseudonymise' load by task pseudonymise_test.pseudonymise" \
        in alone.output
    assert _hospital_days(world["urls"]["hospital"]) == before
    export = tmp_path / "archive" / "visits-{{ ds }}.csv"
    export.parent.mkdir()
    spec = dag_spec(world)
    spec["tasks"].append({**retire, "upstream": "pseudonymise", "export_path": f"file://{export}"})
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
    assert run.returncode == 0, run.output[-3000:]
    after = _hospital_days(world["urls"]["hospital"])
    [gone] = set(before) - set(after)  # the run's data interval: one day, the day the load read
    assert {d: n for d, n in before.items() if d != gone} == after
    [written] = list((tmp_path / "archive").iterdir())
    with written.open(newline="", encoding="utf-8") as fh:
        exported = list(csv.DictReader(fh))
    assert len(exported) == before[gone] and {r["visit_date"] for r in exported} == {gone}
    assert all(r["patient_id"] for r in exported)  # the originals, archived before deletion
    audit = [a for a in audit_rows(world["urls"]["research"]) if a["event"] == "finished"]
    assert [(a["operation"], a["outcome"]) for a in audit] == [("retire", "failed"), ("pseudonymise", "success"),
                                                               ("retire", "success")]
    assert audit[2]["rows_out"] == audit[1]["rows_in"] == before[gone]
    assert audit[2]["target"] == f"file:file://{written}"


def test_subject_erasure_operator(world: dict[str, Any]) -> None:
    """SubjectErasureOperator after a reversible load: the subject's escrow row and target rows are gone,
    nobody else's; the identifier is in no log and no audit row."""
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"],
                                     spec=dag_spec(world, sql="SELECT visit_id, patient_id, visit_date, ward "
                                                              "FROM patient_visits", parameters={}))
    assert run.returncode == 0, run.output[-3000:]
    research = sa.create_engine(world["urls"]["research"])
    with research.connect() as conn:
        escrow_before = conn.execute(sa.text("SELECT count(*) FROM pseudonymise_escrow")).scalar()
        visits_before = conn.execute(sa.text("SELECT count(*) FROM visits")).scalar()
    with sa.create_engine(world["urls"]["hospital"]).connect() as conn:
        subject_visits = conn.execute(sa.text(
            "SELECT count(*) FROM patient_visits WHERE upper(trim(patient_id)) = 'P770839'")).scalar()
    erase = {"operator": "SubjectErasureOperator", "task_id": "erase", "audit_conn_id": "research_db",
             "source_conn_id": "hospital_db", "pseudonymise_conn_id": "pseudonymise_research",
             "identifiers_sql": "SELECT DISTINCT patient_id FROM patient_visits WHERE upper(trim(patient_id)) = 'P770839'",
             "column": "patient_id", "normalise": ["strip", "upper"],
             "targets": [{"conn_id": "research_db", "table": "visits", "column": "patient_id"}]}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-05", world["connections"], spec={"tasks": [erase]})
    assert run.returncode == 0, run.output[-3000:]
    with research.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_escrow")).scalar() == escrow_before - 1
        assert conn.execute(sa.text("SELECT count(*) FROM visits")).scalar() == visits_before - subject_visits
    assert subject_visits > 0
    audit = [a for a in audit_rows(world["urls"]["research"]) if a["operation"] == "erase" and a["event"] == "finished"]
    assert [(a["outcome"], a["escrow_rows"], a["rows_out"]) for a in audit] == [
        ("success", 1, None), ("success", None, subject_visits)]
    assert "P770839" not in run.output and "P770839" not in json.dumps(audit_rows(world["urls"]["research"]),
                                                                       default=str)


def test_create_target_table_operator_refuses_create_table_false() -> None:
    from pseudonymise.operators import CreateTargetTableOperator

    with pytest.raises(ValueError, match="create_table=False contradicts it"):
        CreateTargetTableOperator(task_id="create", pseudonymise_conn_id="t", source_conn_id="s", sql="SELECT 1",
                                  columns={"id": "pseudonymise"}, target_conn_id="d", target_table="x",
                                  create_table=False)


# --- de-identifying actions ----------------------------------------------------------------------------------
def _research_expected(token: str, source: list[dict[str, str]]) -> list[tuple[Any, ...]]:
    """The research extract policy applied with tests.reference: (patient_id, birth_year, visit_date, postcode)."""
    key = reference.b64url_decode(reference.claims(token)["key"])
    out = []
    for row in source:
        subject = row["patient_id"].strip().upper()
        out.append((reference.pseudonym(key, subject), reference.integer_band(row["birth_year"], 5),
                    dt.date.fromisoformat(row["visit_date"]) + dt.timedelta(
                        days=reference.date_shift_offset(key, subject, 30)), row["postcode"][:3]))
    return sorted(out)


def test_research_extract_example_dag_de_identifies_and_reruns_identically(world: dict[str, Any]) -> None:
    """The example DAG: the sample visits (with postcodes) into research_db, twice; the same table both times,
    equal to the reference, every use audited with its columns' actions."""
    with open(ROOT / "include/sample/research_visits.csv", encoding="utf-8", newline="") as fh:
        source = list(csv.DictReader(fh))
    snapshots = []
    for _ in range(2):
        run = world["airflow"].dags_test("pseudonymise_research_extract", "2026-11-04", world["connections"],
                                         dags_folder=EXAMPLE_DAGS)
        assert run.returncode == 0, run.output[-4000:]
        snapshots.append(rows(world["urls"]["research"], "research_extract", "patient_id, visit_date, postcode"))
    assert snapshots[0] == snapshots[1]
    engine = sa.create_engine(world["urls"]["research"])
    with engine.connect() as conn:
        got = sorted(tuple(r) for r in conn.execute(sa.text(
            "SELECT patient_id, birth_year, visit_date::date, postcode FROM research_extract")))
        names = [r[0] for r in conn.execute(sa.text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'research_extract' "
            "ORDER BY ordinal_position"))]
    engine.dispose()
    assert names == ["patient_id", "birth_year", "visit_date", "diagnosis_code", "ward", "postcode"]
    assert got == _research_expected(world["token"], source)
    finished = [a for a in audit_rows(world["urls"]["research"]) if a["event"] == "finished"]
    assert [(a["operation"], a["outcome"]) for a in finished] == [("pseudonymise", "success"),
                                                                  ("risk_report", "success")] * 2
    assert json.loads(finished[0]["columns"]) == ["patient_id", "birth_year:generalise", "visit_date:date_shift",
                                                  "postcode:generalise"]
    # the k=5 gate over the birth-year bands passed and is recorded; the report's figures match pandas
    import pandas as pd

    frame = pd.DataFrame(got, columns=["patient_id", "birth_year", "visit_date", "postcode"])
    assert json.loads(finished[0]["details"])["risk"]["smallest_class"] == frame.groupby("birth_year").size().min()
    report = json.loads(finished[1]["details"])
    assert json.dumps(report).count("P7") == 0  # counts and column names only


def test_operator_shifts_postgres_dates_by_copy_and_upserts_identically(world: dict[str, Any]) -> None:
    """PostgreSQL to PostgreSQL (COPY text, then columns): typed dates shifted per patient, bands and prefixes as
    text, a suppressed column NULL of its type; upsert on the visit key twice gives the same rows."""
    columns = {"visit_id": "keep", "patient_id": {"action": "pseudonymise", "normalise": ["strip", "upper"]},
               "birth_year": {"action": "generalise", "width": 5, "bottom": 1940, "top": 2010},
               "visit_date": {"action": "date_shift", "subject": "patient_id", "max_days": 30},
               "ward": {"action": "mask", "keep_first": 2}, "diagnosis_code": "suppress"}
    spec = dag_spec(world, sql="SELECT visit_id, patient_id, birth_year, visit_date, ward, diagnosis_code "
                               "FROM patient_visits WHERE visit_date >= :start AND visit_date < :end",
                    columns=columns, unlisted_columns="error", write_mode="upsert", upsert_key=["visit_id"])
    for _ in range(2):
        run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
        assert run.returncode == 0, run.output[-3000:]
    out = rows(world["urls"]["research"], "visits", "visit_id")
    assert len(out) == 24
    key = reference.b64url_decode(reference.claims(world["token"])["key"])
    hospital = sa.create_engine(world["urls"]["hospital"])
    with hospital.connect() as conn:
        source = [tuple(r) for r in conn.execute(sa.text(
            "SELECT visit_id, patient_id, birth_year, visit_date, ward FROM patient_visits "
            "WHERE visit_date = DATE '2026-11-03' ORDER BY visit_id"))]
    hospital.dispose()
    expected = [(vid, reference.pseudonym(key, pid.strip().upper()), reference.integer_band(year, 5, 1940, 2010),
                 day + dt.timedelta(days=reference.date_shift_offset(key, pid.strip().upper(), 30)),
                 reference.masked(ward, keep_first=2), None) for vid, pid, year, day, ward in source]
    assert out == expected
    assert all(isinstance(r[3], dt.date) for r in out)  # the target's visit_date is a date, as the source's
