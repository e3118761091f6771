"""The de-identifying actions through every real path of a run, each compared with tests/reference.py.

The same visits go PostgreSQL to PostgreSQL by COPY and by cursor and INSERT (real PostgreSQL), SQLite to SQLite
(dates as ISO text), CSV to CSV (all text) and Parquet to Parquet (typed Arrow columns), each with the C engine
and with the pure-Python engine (the C engine switched off as ``PSEUDONYMISE_PURE_PYTHON=1`` does); every output, read back
and normalised to Python values (text dates parsed, timestamps as UTC instants), must equal the reference's, so
every engine gives the same result. Runs are audited: the audit's columns name each action, never a value.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.errors import PolicyError
from pseudonymise.core.files import open_source
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import FileDestination, QuerySource, SharedTransaction, TableDestination, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken

from tests import reference

UTC = dt.UTC
PLUS_ONE = dt.timezone(dt.timedelta(hours=1))
#: (visit_id, patient_id, visit_date, seen_at, birth_year, postcode, phone, name)
VISITS: list[tuple[Any, ...]] = [
    (1, "P1", dt.date(2024, 2, 29), dt.datetime(2024, 2, 29, 23, 30, tzinfo=PLUS_ONE), 1942, "1011AB", "0612345678",
     "Olga"),
    (2, "P1", dt.date(2024, 3, 14), dt.datetime(2024, 3, 14, 8, 0, tzinfo=UTC), 1942, "1011AB", "0612345678", "Olga"),
    (3, "P2", dt.date(2023, 12, 31), dt.datetime(2023, 12, 31, 12, 0, tzinfo=UTC), 1976, "3511 CD", "12", "Marie"),
    (4, None, dt.date(2024, 1, 1), dt.datetime(2024, 1, 1, tzinfo=UTC), 2012, None, None, "Lars"),
    (5, "P3", None, None, None, "9999ZZ", "+31 6 1", None),
    (6, "P2", dt.date(2000, 2, 29), dt.datetime(2000, 2, 29, 0, 0, 1, tzinfo=UTC), 19, "é9x", "0", "Ilse"),
]
COLUMNS = ["visit_id", "patient_id", "visit_date", "seen_at", "birth_year", "postcode", "phone", "name"]
POLICY = ColumnPolicy.from_mapping({"columns": {
    "visit_id": "keep",
    "patient_id": "pseudonymise",
    "visit_date": {"action": "date_shift", "subject": "patient_id", "max_days": 30},
    "seen_at": {"action": "date_shift", "subject": "patient_id", "max_days": 30},
    "birth_year": {"action": "generalise", "width": 5, "bottom": 1940, "top": 2010},
    "postcode": {"action": "generalise", "prefix": 3},
    "phone": {"action": "mask", "keep_last": 2},
    "name": "suppress",
}, "default": "error"})


def _expected(raw: str) -> list[tuple[Any, ...]]:
    key = reference.b64url_decode(reference.claims(raw)["key"])
    pseudonyms = reference.token_pseudonyms(raw, [v[1] for v in VISITS])
    out = []
    for (vid, pid, day, seen, year, postcode, phone, _), pseudonym in zip(VISITS, pseudonyms, strict=True):
        days = None if pid is None else reference.date_shift_offset(key, pid, 30)
        shifted_seen = reference.shift(seen, days)
        out.append((vid, pseudonym, reference.shift(day, days),
                    None if shifted_seen is None else shifted_seen.astimezone(UTC),  # type: ignore[union-attr]
                    reference.integer_band(year, 5, 1940, 2010), reference.text_prefix(postcode, 3),
                    reference.masked(phone, keep_last=2), None))
    return out


def _normalised(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows read back as Python values: ids as int, ISO text dates parsed, timestamps as UTC instants."""
    def day(v: Any) -> dt.date | None:
        return dt.date.fromisoformat(v) if isinstance(v, str) else v

    def instant(v: Any) -> dt.datetime | None:
        if v is None:
            return None
        moment = dt.datetime.fromisoformat(v) if isinstance(v, str) else v
        return moment.astimezone(UTC)

    return sorted((int(r[0]), r[1], day(r[2]), instant(r[3]), *r[4:]) for r in rows)


def _text(v: Any) -> str | None:
    return None if v is None else v.isoformat() if isinstance(v, dt.date) else str(v)


def _run(store: Store, issuer: Issuer, raw: str, transfer: Any, policy: ColumnPolicy = POLICY) -> Any:
    return run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy, transfer)


def _pg_source(pg_url: str, table: str = "visits") -> sa.Engine:
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (visit_id bigint, patient_id text, visit_date date, "
                             "seen_at timestamptz, birth_year integer, postcode text, phone text, name text)"))
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (:a, :b, :c, :d, :e, :f, :g, :h)"),
                     [dict(zip("abcdefgh", v, strict=True)) for v in VISITS])
    return engine


@pytest.fixture(params=["c-engine", "pure-python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both engines: the C engine where it is built, and the pure-Python one."""
    if request.param == "pure-python":
        monkeypatch.setattr(native, "_ext", None)
    return str(request.param)


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    store = Store(sa.create_engine(pg_url))
    yield store
    store.engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("use_copy", [None, False], ids=["copy", "cursor"])
def test_postgres_paths_equal_the_reference(pg_store: Store, pg_url: str, issuer: Issuer,
                                            use_copy: bool | None, engine: str) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    source = _pg_source(pg_url)
    transfer = plan_transfer(QuerySource(source, "SELECT * FROM visits ORDER BY visit_id", batch_size=4),
                             TableDestination(TableTarget("out", mode="replace"), SharedTransaction(pg_store.engine)),
                             POLICY, use_copy=use_copy)
    assert transfer.copy_text == (use_copy is None) and not transfer.native_blocks  # columns, not raw COPY blocks
    summary = _run(pg_store, issuer, raw, transfer)
    with pg_store.engine.connect() as conn:
        got = [tuple(r) for r in conn.execute(sa.text(f"SELECT {', '.join(COLUMNS)} FROM out"))]
        types = dict(conn.execute(sa.text("SELECT column_name, data_type FROM information_schema.columns "
                                          "WHERE table_name = 'out'")).all())
    assert _normalised(got) == _normalised(_expected(raw))
    assert types["visit_date"] == "date" and types["seen_at"] == "timestamp with time zone"
    assert types["birth_year"] == types["postcode"] == types["phone"] == "text"
    assert summary.counts["rows_out"] == 6
    audit = [r for r in pg_store.audit.iter_rows() if r["event"] == "finished"][-1]
    assert json.loads(audit["columns"]) == ["patient_id", "visit_date:date_shift", "seen_at:date_shift",
                                            "birth_year:generalise", "postcode:generalise", "phone:mask",
                                            "name:suppress"]


def _sqlite_source(path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visits (visit_id INTEGER, patient_id TEXT, visit_date TEXT, seen_at TEXT, "
                             "birth_year INTEGER, postcode TEXT, phone TEXT, name TEXT)"))
        conn.execute(sa.text("INSERT INTO visits VALUES (:a, :b, :c, :d, :e, :f, :g, :h)"),
                     [dict(zip("abcdefgh", (*v[:2], _text(v[2]), _text(v[3]), *v[4:]), strict=True)) for v in VISITS])
    return engine


def test_sqlite_path_equals_the_reference(tmp_path: Path, issuer: Issuer, engine: str) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'target.db'}"))
    transfer = plan_transfer(QuerySource(_sqlite_source(tmp_path / "source.db"), "SELECT * FROM visits", batch_size=4),
                             TableDestination(TableTarget("out", mode="replace"), SharedTransaction(store.engine)),
                             POLICY)
    _run(store, issuer, raw, transfer)
    with store.engine.connect() as conn:
        got = [tuple(r) for r in conn.execute(sa.text(f"SELECT {', '.join(COLUMNS)} FROM out"))]
    assert _normalised(got) == _normalised(_expected(raw))
    assert got[0][2] == reference.shift("2024-02-29", reference.date_shift_offset(
        reference.b64url_decode(reference.claims(raw)["key"]), "P1", 30))  # ISO text stays ISO text


def test_csv_path_equals_the_reference(tmp_path: Path, issuer: Issuer, engine: str) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    source = tmp_path / "visits.csv"
    table = pa.table({c: pa.array([_text(v[i]) for v in VISITS], pa.string()) for i, c in enumerate(COLUMNS)})
    pa_csv.write_csv(table, source)
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    out = tmp_path / "out.csv"
    _run(store, issuer, raw, plan_transfer(open_source(source, batch_size=4), FileDestination(str(out)), POLICY))
    got = pa_csv.read_csv(out, convert_options=pa_csv.ConvertOptions(
        column_types=dict.fromkeys(COLUMNS, pa.string()), strings_can_be_null=True)).to_pylist()
    assert _normalised([tuple(r[c] for c in COLUMNS) for r in got]) == _normalised(_expected(raw))


def test_parquet_path_equals_the_reference_and_keeps_the_types(tmp_path: Path, issuer: Issuer, engine: str) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    source = tmp_path / "visits.parquet"
    arrays = [pa.array([v[i] for v in VISITS]) for i in range(len(COLUMNS))]
    arrays[3] = pa.array([v[3] for v in VISITS], pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.Table.from_arrays(arrays, names=COLUMNS), source)
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    out = tmp_path / "out.parquet"
    _run(store, issuer, raw, plan_transfer(open_source(source, batch_size=4), FileDestination(str(out)), POLICY))
    table = pq.read_table(out)
    assert _normalised([tuple(r[c] for c in COLUMNS) for r in table.to_pylist()]) == _normalised(_expected(raw))
    assert table.schema.field("visit_date").type == pa.date32()
    assert table.schema.field("seen_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("birth_year").type == pa.string()


@pytest.mark.postgres
def test_one_subject_keeps_one_offset_across_tables_and_runs(pg_store: Store, pg_url: str, issuer: Issuer,
                                                             tmp_path: Path) -> None:
    """Visits in PostgreSQL and lab results in a CSV file, in two runs of one deterministic project: each subject's
    dates move by the same days in both, so intervals between its visits and its labs survive."""
    raw = issuer.issue("research-b", "pseudonymisation")
    source = _pg_source(pg_url)
    _run(pg_store, issuer, raw, plan_transfer(QuerySource(source, "SELECT * FROM visits"),
                                              TableDestination(TableTarget("out", mode="replace"),
                                                               SharedTransaction(pg_store.engine)), POLICY))
    labs = tmp_path / "labs.csv"
    labs.write_text("patient,taken\nP1,2024-03-01\nP2,2024-03-01\nP1,2024-04-01\n", encoding="utf-8")
    lab_policy = ColumnPolicy.from_mapping({"columns": {
        "patient": "pseudonymise", "taken": {"action": "date_shift", "subject": "patient", "max_days": 30}}})
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    _run(store, issuer, raw, plan_transfer(open_source(labs), FileDestination(str(tmp_path / "labs_out.csv")),
                                           lab_policy), lab_policy)
    lab_rows = pa_csv.read_csv(tmp_path / "labs_out.csv").to_pylist()
    with pg_store.engine.connect() as conn:
        visits = {(r[0], r[1]): r[2] for r in conn.execute(sa.text("SELECT visit_id, patient_id, visit_date FROM out"))}
    p1 = visits[(1, reference.token_pseudonyms(raw, ["P1"])[0])]
    assert lab_rows[0]["patient"] == reference.token_pseudonyms(raw, ["P1"])[0]  # the join on the pseudonym works
    # 2024-02-29 (visit) to 2024-03-01 (lab) is one day before shifting, and after
    assert lab_rows[0]["taken"] - p1 == dt.timedelta(days=1)
    assert lab_rows[2]["taken"] - lab_rows[0]["taken"] == dt.timedelta(days=31)


def test_a_policy_naming_a_missing_subject_fails_before_anything_is_written(tmp_path: Path, issuer: Issuer) -> None:
    raw = issuer.issue("research-b", "pseudonymisation")
    policy = ColumnPolicy.from_mapping({"columns": {"visit_date": {"action": "date_shift", "subject": "patient",
                                                                    "max_days": 5}}, "default": "keep"})
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    transfer = plan_transfer(QuerySource(_sqlite_source(tmp_path / "source.db"), "SELECT * FROM visits"),
                             TableDestination(TableTarget("out", mode="replace"), SharedTransaction(store.engine)),
                             policy)
    with pytest.raises(PolicyError, match="subject' names 'patient', which is not in the source"):
        _run(store, issuer, raw, transfer, policy)
    assert not sa.inspect(store.engine).has_table("out")
    assert [r["outcome"] for r in store.audit.iter_rows()][-1] == "failed"
