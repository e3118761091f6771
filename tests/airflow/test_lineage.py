"""Lineage in real Airflow runs: the OpenLineage provider's own listener and extractor (``ExtractorManager``
picks the operators' ``get_openlineage_facets_on_*`` methods) write their events to a file transport, and
the target's asset event carries the table's OpenLineage-style URI.

Nothing is mocked: the events are those the provider would send to a Marquez or any OpenLineage backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.airflow.conftest import dag_spec, token_conn
from tests.sample import assert_no_value

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]


def _events(path: Path) -> list[dict[str, Any]]:
    """The OpenLineage events the file transport wrote (one JSON document per line)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _ol_env(path: Path) -> dict[str, str]:
    return {"AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(path), "append": True}),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "pseudonymise-tests"}


def _task_event(events: list[dict[str, Any]], task_id: str, kind: str) -> dict[str, Any]:
    matching = [e for e in events if e["eventType"] == kind and e["job"]["name"].endswith(f".{task_id}")]
    assert matching, f"no {kind} event for {task_id}: {[(e['eventType'], e['job']['name']) for e in events]}"
    return matching[-1]


def _pg_names(url: str) -> tuple[str, str]:
    u = sa.make_url(url)
    return f"postgres://{u.host}:{u.port}", u.database or ""


def test_openlineage_events_name_the_tables_and_each_columns_action(world: dict[str, Any], tmp_path: Path) -> None:
    """A load, a secondary share of it and a reversal into a file, in one DAG run."""
    events_file = tmp_path / "openlineage.jsonl"
    revealed = tmp_path / "revealed.csv"
    spec = dag_spec(world, columns={"patient_id": {"action": "pseudonymise", "normalise": ["strip", "upper"]},
                                    "ward": "drop", "birth_year": "keep", "visit_id": "keep", "visit_date": "keep"},
                    unlisted_columns="error")
    spec["tasks"] += [
        {"operator": "SecondaryPseudonymiseOperator", "task_id": "share", "upstream": "pseudonymise",
         "pseudonymise_conn_id": "pseudonymise_vendor", "source_conn_id": "research_db", "source_table": "visits",
         "columns": {"patient_id": "pseudonymise"}, "unlisted_columns": "keep", "target_conn_id": "vendor_db",
         "target_table": "vendor_visits", "audit_conn_id": "research_db"},
        {"operator": "ReversePseudonymsOperator", "task_id": "reveal", "upstream": "pseudonymise",
         "pseudonymise_conn_id": "pseudonymise_reverse", "source_conn_id": "research_db", "source_table": "visits",
         "pseudonym_columns": ["patient_id"], "target_path": str(revealed), "audit_conn_id": "research_db",
         # four eyes needs the API server (tests/stack/test_full_stack.py); lineage is the point here
         "require_approval": False},
        {"operator": "EscrowPurgeOperator", "task_id": "purge", "upstream": "reveal", "audit_conn_id": "research_db"},
    ]
    issuer = world["issuer"]
    connections = {**world["connections"],
                   "pseudonymise_vendor": token_conn(issuer.issue("vendor-x", "secondary", source_project="research-a"),
                                                     issuer, "vendor-x"),
                   "pseudonymise_reverse": token_conn(issuer.issue("research-a", "reverse"), issuer, "research-a")}
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections, spec=spec,
                                     extra_env=_ol_env(events_file))
    assert run.returncode == 0, run.output[-4000:]
    events = _events(events_file)
    complete = _task_event(events, "pseudonymise", "COMPLETE")
    source_ns, source_db = _pg_names(world["urls"]["hospital"])
    target_ns, target_db = _pg_names(world["urls"]["research"])
    assert [(d["namespace"], d["name"]) for d in complete["inputs"]] == [(source_ns, f"{source_db}.public.patient_visits")]
    (output,) = complete["outputs"]
    assert (output["namespace"], output["name"]) == (target_ns, f"{target_db}.public.visits")
    fields = output["facets"]["columnLineage"]["fields"]
    assert set(fields) == {"visit_id", "patient_id", "birth_year", "visit_date"}  # ward was dropped
    for column, spec_field in fields.items():
        (origin,) = spec_field["inputFields"]
        assert (origin["namespace"], origin["name"], origin["field"]) == \
            (source_ns, f"{source_db}.public.patient_visits", column)
        (transformation,) = origin["transformations"]
        if column == "patient_id":
            assert transformation == {"type": "DIRECT", "subtype": "TRANSFORMATION", "description": "pseudonymise",
                                      "masking": True}
        else:
            assert transformation == {"type": "DIRECT", "subtype": "IDENTITY", "description": "keep", "masking": False}
    facet = complete["run"]["facets"]["pseudonymise"]
    assert facet["columns"] == {"visit_id": "keep", "patient_id": "pseudonymise", "birth_year": "keep",
                                "visit_date": "keep", "ward": "drop"}
    assert facet["operation"] == "pseudonymise" and facet["counts"]["rows_in"] > 0 and facet["auditUseId"]
    start = _task_event(events, "pseudonymise", "START")
    assert [d["name"] for d in start["outputs"]] == [f"{target_db}.public.visits"]

    # the secondary share: the research table's column, re-pseudonymised
    share = _task_event(events, "share", "COMPLETE")
    vendor_ns, vendor_db = _pg_names(world["urls"]["vendor"])
    assert [(d["namespace"], d["name"]) for d in share["inputs"]] == [(target_ns, f"{target_db}.public.visits")]
    (vendor,) = share["outputs"]
    assert (vendor["namespace"], vendor["name"]) == (vendor_ns, f"{vendor_db}.public.vendor_visits")
    shared = vendor["facets"]["columnLineage"]["fields"]["patient_id"]["inputFields"][0]
    assert (shared["name"], shared["field"]) == (f"{target_db}.public.visits", "patient_id")
    assert shared["transformations"][0]["description"] == "secondary" and shared["transformations"][0]["masking"]
    # the reversal: into a file, unmasking
    reveal = _task_event(events, "reveal", "COMPLETE")
    (file_out,) = reveal["outputs"]
    assert (file_out["namespace"], file_out["name"]) == ("file://", str(revealed))
    unmasked = file_out["facets"]["columnLineage"]["fields"]["patient_id"]["inputFields"][0]["transformations"][0]
    assert unmasked["description"] == "reverse" and unmasked["masking"] is False
    assert reveal["run"]["facets"]["pseudonymise"]["operation"] == "reverse"

    # an operator whose datasets follow from its arguments: the purge deletes from the escrow table
    purge = _task_event(events, "purge", "COMPLETE")
    assert [(d["namespace"], d["name"]) for d in purge["outputs"]] == [(target_ns, f"{target_db}.public.pseudonymise_escrow")]
    assert purge["run"]["facets"]["pseudonymise"]["operation"] == "purge"

    # never a value or a token in what is sent (the revealed file holds values; the events do not)
    text = events_file.read_text()
    for conn in connections.values():
        if conn.get("conn_type") == "pseudonymise":
            assert conn["password"] not in text
    assert_no_value([text], where="the OpenLineage events")


def test_the_target_asset_event_carries_the_openlineage_uri(world: dict[str, Any], tmp_path: Path) -> None:
    """The task's outlet is the table's asset alias; the run attaches ``postgres://host:port/db/public/visits``."""
    spec = dag_spec(world)
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-05", world["connections"], spec=spec)
    assert run.returncode == 0, run.output[-4000:]
    host_port, database = _pg_names(world["urls"]["research"])
    uri = f"{host_port}/{database}/public/visits"
    meta = sa.create_engine(_metadata_url(world))
    with meta.connect() as conn:
        assets = {r[0] for r in conn.execute(sa.text("SELECT uri FROM asset"))}
        aliases = {r[0] for r in conn.execute(sa.text("SELECT name FROM asset_alias"))}
        linked = conn.execute(sa.text(
            "SELECT a.uri FROM asset a JOIN asset_alias_asset aa ON aa.asset_id = a.id"
            " JOIN asset_alias al ON al.id = aa.alias_id WHERE al.name = :name"),
            {"name": "pseudonymise/research_db/default/visits"}).scalars().all()
        events = conn.execute(sa.text(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = :uri"),
            {"uri": uri}).scalars().all()
    meta.dispose()
    assert uri in assets and "pseudonymise/research_db/default/visits" in aliases
    assert uri in linked
    assert events, "no asset event for the target table"
    extra = events[-1] if isinstance(events[-1], dict) else json.loads(events[-1])
    assert extra["audit_use_id"] and extra["rows_out"] > 0


def _metadata_url(world: dict[str, Any]) -> str:
    """Airflow's metadata database of the test session (SQLite in its AIRFLOW_HOME)."""
    return f"sqlite:///{world['airflow'].home / 'airflow.db'}"


def test_retire_erase_and_rekey_name_what_they_read_and_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operators whose datasets follow from their arguments, asked as the provider's extractor asks them
    (``get_openlineage_facets_on_start``/``_on_complete``): retiring reads the source and deletes from it after
    the export, erasing deletes from the escrow and from each named target, re-keying rewrites its table in
    place with the action ``rekey`` on each pseudonym column and no other column claimed. Connections are
    SQLite files (``sqlite:/path/main/table``); nothing runs, so nothing is mocked."""
    from pseudonymise.operators import RekeyPseudonymsOperator, SourceRetireOperator, SubjectErasureOperator

    dbs = {name: tmp_path / f"{name}.db" for name in ("hospital", "research", "vendor")}
    for name, path in dbs.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}_DB", f"sqlite:///{path}")

    def names(datasets: Any) -> list[tuple[str, str]]:
        return [(d.namespace, d.name) for d in datasets]

    retire = SourceRetireOperator(task_id="retire", source_conn_id="hospital_db", table="visits",
                                  interval_column="visit_date", load_task_id="pseudonymise",
                                  audit_conn_id="research_db", export_path=str(tmp_path / "export.parquet"))
    start = retire.get_openlineage_facets_on_start()
    hospital_visits = (f"sqlite:{dbs['hospital']}", "main.visits")
    assert names(start.inputs) == [hospital_visits]
    assert names(start.outputs) == [("file://", str(tmp_path / "export.parquet")), hospital_visits]

    erase = SubjectErasureOperator(task_id="erase", audit_conn_id="research_db", source_conn_id="research_db",
                                   pseudonyms_sql="SELECT p FROM erasures", project="research-a",
                                   targets=[{"conn_id": "research_db", "table": "visits", "column": "patient_id"},
                                            {"conn_id": "vendor_db", "table": "vendor_visits", "column": "patient_id"}])
    erased = erase.get_openlineage_facets_on_complete(None)
    assert erased.inputs == []
    assert names(erased.outputs) == [(f"sqlite:{dbs['research']}", "main.pseudonymise_escrow"),
                                     (f"sqlite:{dbs['research']}", "main.visits"),
                                     (f"sqlite:{dbs['vendor']}", "main.vendor_visits")]

    rekey = RekeyPseudonymsOperator(task_id="rekey", columns=["patient_id"], reverse_conn_id="pseudonymise_reverse",
                                    pseudonymise_conn_id="pseudonymise_new", target_conn_id="research_db",
                                    target_table="visits")
    rekeyed = rekey.get_openlineage_facets_on_complete(None)
    assert names(rekeyed.inputs) == names(rekeyed.outputs) == [(f"sqlite:{dbs['research']}", "main.visits")]
    fields = rekeyed.outputs[0].facets["columnLineage"].fields
    assert list(fields) == ["patient_id"]
    (origin,) = fields["patient_id"].inputFields
    assert (origin.name, origin.field) == (rekeyed.inputs[0].name, "patient_id")
    assert origin.transformations[0].description == "rekey" and origin.transformations[0].masking is True
