"""pseudonymise.lineage: dataset names as OpenLineage's naming conventions and Airflow's asset URIs write them,
and the facets built from a policy's actions, serialised as the OpenLineage client sends them."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa
from airflow.sdk import Asset
from openlineage.client.serde import Serde
from pseudonymise.lineage import operator_lineage, path_dataset, query_origins, query_tables, table_dataset


def test_postgres_tables_are_named_by_host_port_database_schema_and_table() -> None:
    engine = sa.create_engine("postgresql+psycopg2://warehouse:s3cret-pw@db.example:6543/hospital")
    ds = table_dataset(engine, "patient_visits")
    assert (ds.namespace, ds.name) == ("postgres://db.example:6543", "hospital.public.patient_visits")
    assert ds.uri == "postgres://db.example:6543/hospital/public/patient_visits"
    assert Asset(uri=ds.uri).uri == ds.uri  # as the postgres provider normalises it: nothing to change
    assert "s3cret-pw" not in repr(ds) and "warehouse" not in repr(ds)
    default_port = table_dataset(sa.create_engine("postgresql://u@h/db"), "t", "research")
    assert default_port.uri == "postgres://h:5432/db/research/t"


def test_sqlite_and_files_and_object_storage(tmp_path: Path) -> None:
    ds = table_dataset(sa.create_engine(f"sqlite:///{tmp_path / 'research.db'}"), "visits")
    assert (ds.namespace, ds.name) == (f"sqlite:{tmp_path / 'research.db'}", "main.visits")
    assert Asset(uri=ds.uri).uri == ds.uri
    local = path_dataset(str(tmp_path / "out.parquet"))
    assert (local.namespace, local.name, local.uri) == ("file://", str(tmp_path / "out.parquet"),
                                                       f"file://{tmp_path / 'out.parquet'}")
    assert path_dataset(f"file://{tmp_path}/a.csv") == path_dataset(str(tmp_path / "a.csv"))
    s3 = path_dataset("s3://research-bucket/extracts/2026/visits.parquet")
    assert (s3.namespace, s3.name, s3.uri) == ("s3://research-bucket", "extracts/2026/visits.parquet",
                                               "s3://research-bucket/extracts/2026/visits.parquet")


def test_query_sources_are_traced_to_their_tables_and_columns() -> None:
    engine = sa.create_engine("postgresql://u@h:5432/hospital")
    sql = ("SELECT v.patient_id AS pid, p.birth_year, v.visit_date FROM visits v JOIN clinic.people p"
           " ON p.id = v.person_id WHERE v.visit_date >= :start")
    assert sorted(d.name for d in query_tables(sql, engine)) == ["hospital.clinic.people", "hospital.public.visits"]
    origins = query_origins(sql, engine)
    assert {c: (d.name, f) for c, (d, f) in origins.items()} == {
        "pid": ("hospital.public.visits", "patient_id"), "birth_year": ("hospital.clinic.people", "birth_year"),
        "visit_date": ("hospital.public.visits", "visit_date")}


def test_column_lineage_carries_each_columns_action_and_no_secret() -> None:
    src = table_dataset(sa.create_engine("postgresql://u@h:5432/hospital"), "patient_visits")
    dst = table_dataset(sa.create_engine("postgresql://u@h:5432/research"), "visits")
    columns = [("patient_id", "pseudonymise"), ("name", "drop"), ("birth_year", "keep"), ("visit_date", "shift")]
    summary = {"operation": "pseudonymise", "use_id": "u-1", "project": "research-a", "token_jti": "jti-secret-ish",
               "token_fingerprint": "abcd", "columns": ["patient_id"], "rows_in": 24, "rows_out": 24, "nulls": 1}
    lineage = operator_lineage([src], [dst], columns, None, summary)
    event = json.loads(Serde.to_json(lineage.outputs[0]))
    fields = event["facets"]["columnLineage"]["fields"]
    assert set(fields) == {"patient_id", "birth_year", "visit_date"}  # the dropped column has no output
    actions = {c: f["inputFields"][0]["transformations"][0] for c, f in fields.items()}
    assert actions["birth_year"] == {"type": "DIRECT", "subtype": "IDENTITY", "description": "keep", "masking": False}
    # any action the policy names (here one another branch may add) is a masking transformation under its name
    assert actions["visit_date"] == {"type": "DIRECT", "subtype": "TRANSFORMATION", "description": "shift",
                                     "masking": True}
    assert actions["patient_id"]["description"] == "pseudonymise" and actions["patient_id"]["masking"] is True
    assert {f["inputFields"][0]["name"] for f in fields.values()} == {"hospital.public.patient_visits"}
    run = json.loads(Serde.to_json(lineage.run_facets["pseudonymise"]))
    assert run["columns"] == dict(columns) and run["counts"] == {"rows_in": 24, "rows_out": 24, "nulls": 1}
    assert run["auditUseId"] == "u-1" and "jti-secret-ish" not in json.dumps(run)
    reverse = operator_lineage([dst], [src], [("patient_id", "reverse")])
    reversed_field = json.loads(Serde.to_json(reverse.outputs[0]))["facets"]["columnLineage"]["fields"]["patient_id"]
    assert reversed_field["inputFields"][0]["transformations"][0]["masking"] is False


def test_without_a_traceable_origin_no_column_lineage_is_invented() -> None:
    a = table_dataset(sa.create_engine("postgresql://u@h/x"), "a")
    b = table_dataset(sa.create_engine("postgresql://u@h/x"), "b")
    lineage = operator_lineage([a, b], [a], [("id", "keep")])  # two inputs, no origins: which one is unknown
    assert "columnLineage" not in (lineage.outputs[0].facets or {})
    assert operator_lineage([], [], None).run_facets == {}
