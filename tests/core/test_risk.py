"""The re-identification risk gate, the risk report and dry runs, against pandas ``groupby`` on the same rows.

Every expectation is computed by pandas from the rows the test made (never by the module under test), on real
PostgreSQL (the gate's temporary table in the run's transaction; COPY both ways too), SQLite and files.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import PolicyError, RiskGateError
from pseudonymise.core.files import open_source
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_dry_run, run_pseudonymisation
from pseudonymise.core.plan import (
    FileDestination,
    QuerySource,
    SeparateTransaction,
    SharedTransaction,
    TableDestination,
    plan_transfer,
)
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.risk import RiskSpec, SpillCounts, describe_batches, describe_table, size_bins
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken, RunContext

from tests.core.conftest import Rows

QIS = ["age_band", "sex", "zip3"]


def _rows(n: int = 600, seed: int = 15) -> dict[str, list[Any]]:
    """Patients with skewed quasi-identifiers (some rare combinations), NULLs among them and in the diagnosis."""
    rng = random.Random(seed)
    zips = [f"Z{z:03d}X" for z in range(100, 130)]
    weights = [30 if i < 5 else 1 for i in range(len(zips))]
    return {
        "pid": [f"P{i:06d}" for i in range(n)],
        "age_band": [rng.choice(["0-17", "18-39", "40-64", "65+", None]) for _ in range(n)],
        "sex": [rng.choice(["F", "M"]) for _ in range(n)],
        "zip3": [rng.choices(zips, weights)[0] if rng.random() > 0.02 else None for _ in range(n)],
        "diagnosis": [rng.choice(["I10", "E11", "J45", None]) for _ in range(n)],
    }


def _expected(data: dict[str, list[Any]], qis: list[str], k: int, l_column: str | None = None,
              l_min: int = 2) -> dict[str, Any]:
    """The figures, by pandas (NULL is a value of a quasi-identifier, not of the sensitive column)."""
    df = pd.DataFrame(data)
    groups = df.groupby(qis, dropna=False)
    sizes = groups.size()
    out = {"rows": len(df), "classes": len(sizes), "smallest_class": int(sizes.min()),
           "classes_below_k": int((sizes < k).sum()), "rows_below_k": int(sizes[sizes < k].sum())}
    if l_column:
        distinct = groups[l_column].nunique()
        out.update(l_smallest=int(distinct.min()), classes_below_l=int((distinct < l_min).sum()),
                   rows_below_l=int(sizes[distinct < l_min].sum()))
    return out


def _figures(found: dict[str, Any]) -> dict[str, Any]:
    keys = ("rows", "classes", "smallest_class", "classes_below_k", "rows_below_k", "l_smallest", "classes_below_l",
            "rows_below_l")
    return {key: found[key] for key in keys if key in found}


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(sa.create_engine(db_url))
    yield store
    store.engine.dispose()


def _count(engine: sa.Engine, table: str) -> int:
    if not sa.inspect(engine).has_table(table):
        return 0
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def _token(issuer: Issuer, project: str = "research-a") -> GivenToken:
    return GivenToken(issuer.issue(project, "pseudonymisation"), issuer.public_keys())


POLICY = ColumnPolicy.from_mapping({"columns": {"pid": "pseudonymise"}, "default": "keep"})


# --- the settings -------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "message"), [
    ({"quasi_identifiers": [], "k": 5}, "non-empty list"),
    ({"quasi_identifiers": ["a", "a"]}, "twice"),
    ({"quasi_identifiers": ["a"], "k": 1}, "at least 2"),
    ({"quasi_identifiers": ["a"], "k": "5"}, "integer"),
    ({"quasi_identifiers": ["a"], "kk": 5}, "unknown field"),
    ({"quasi_identifiers": ["a"], "l": {"column": "a", "min": 2}}, "also a quasi-identifier"),
    ({"quasi_identifiers": ["a"], "l": {"column": "d", "min": 1}}, "l min"),
    ({"quasi_identifiers": ["a"], "l": 2}, "needs \"sensitive\""),
    ({"quasi_identifiers": ["a"], "l": {"col": "d"}}, "unknown field"),
    ("[1", "not valid JSON"),
    ([1], "must be an object"),
])
def test_bad_risk_settings_are_refused_naming_the_problem(data: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        RiskSpec.parse(data)


def test_risk_settings_parse_and_check_against_the_output() -> None:
    spec = RiskSpec.parse({"quasi_identifiers": "age_band, sex", "k": 3, "l": {"column": "diagnosis", "min": 2}})
    assert spec == RiskSpec(("age_band", "sex"), 3, "diagnosis", 2)
    assert RiskSpec.parse({"quasi_identifiers": ["a"], "sensitive": "d"}) == RiskSpec(("a",), 5, "d", 2)
    assert RiskSpec.parse({}) is None and RiskSpec.parse(None) is None
    with pytest.raises(PolicyError, match="'postcode' is not in the source"):
        RiskSpec(("postcode",), 5).check(["pid", "sex"], ["pid", "sex"])
    with pytest.raises(PolicyError, match="'sex' is dropped by the column policy"):
        RiskSpec(("sex",), 5).check(["pid", "sex"], ["pid"])


def test_class_size_bins_cover_every_size_once() -> None:
    bins = size_bins(5)
    assert bins[0] == (1, 1) and bins[-1][1] is None
    for (_, hi), (lo, _) in itertools.pairwise(bins):
        assert hi is not None and lo == hi + 1


# --- the gate over a run's output ---------------------------------------------------------------
def _run_to_table(store: Store, issuer: Issuer, data: dict[str, list[Any]], risk: RiskSpec | None, *,
                  table: str = "shared", mode: str = "replace", **kwargs: Any) -> Any:
    target = TableTarget(table, mode=mode)
    transfer = plan_transfer(Rows(data), TableDestination(target, SharedTransaction(store.engine)), POLICY)
    return run_pseudonymisation(store, _token(issuer), POLICY, transfer, risk=risk, **kwargs)


@pytest.mark.parametrize("l_column", [None, "diagnosis"])
def test_gate_figures_over_a_table_run_match_pandas(store: Store, issuer: Issuer, l_column: str | None) -> None:
    data = _rows()
    risk = RiskSpec(("age_band", "sex"), 5, l_column, 2 if l_column else None)
    summary = _run_to_table(store, issuer, data, risk)
    expected = _expected(data, ["age_band", "sex"], 5, l_column)
    assert _figures(summary.risk) == expected and summary.risk["passed"]
    finished = list(store.audit.iter_rows())[-1]
    assert finished["outcome"] == "success"
    assert _figures(json.loads(finished["details"])["risk"]) == expected
    assert _count(store.engine, "shared") == len(data["pid"])


def test_gate_failure_commits_nothing_and_audits_the_figures(store: Store, issuer: Issuer) -> None:
    data = _rows()
    _run_to_table(store, issuer, {k: v[:50] for k, v in data.items()}, None, mode="append")  # an earlier run
    before = {t: _count(store.engine, t) for t in ("shared", "pseudonymise_escrow", "pseudonymise_escrow_batch",
                                                     "pseudonymise_audit_checkpoint")}
    risk = RiskSpec(tuple(QIS), 5)
    expected = _expected(data, QIS, 5)
    assert expected["classes_below_k"] > 0
    with pytest.raises(RiskGateError) as err:
        _run_to_table(store, issuer, data, risk, mode="append")
    message = str(err.value)
    assert f"{expected['classes_below_k']} of {expected['classes']} classes" in message
    assert f"({expected['rows_below_k']} of {expected['rows']} rows; smallest class {expected['smallest_class']})" \
        in message
    assert "nothing was committed" in message
    assert {t: _count(store.engine, t) for t in before} == before
    rows = list(store.audit.iter_rows())
    assert store.audit.verify().ok
    finished = rows[-1]
    assert (finished["operation"], finished["outcome"], finished["error_class"]) == (
        "pseudonymise", "failed", "RiskGateError")
    assert _figures(json.loads(finished["details"])["risk"]) == expected
    for value in {*data["pid"], *filter(None, data["zip3"])}:
        assert value not in (finished["error_message"] or "") and value not in finished["details"]


@pytest.mark.parametrize("mode", ["replace", "append"])
def test_gate_over_a_copy_run_between_postgresql_databases_matches_pandas(pg_url: str, issuer: Issuer,
                                                                          mode: str) -> None:
    """PostgreSQL to PostgreSQL, COPY text blocks (the C engine's path): grouped in the target a replace run
    leaves holding its rows alone, or in the gate's temporary table (append)."""
    data = _rows(800, seed=3)
    engine = sa.create_engine(pg_url)
    pd.DataFrame(data).to_sql("visits", engine, index=False)
    store = Store(engine)
    transfer = plan_transfer(QuerySource(engine, "SELECT * FROM visits", batch_size=300),
                             TableDestination(TableTarget("shared", mode=mode), SharedTransaction(engine)), POLICY)
    assert transfer.copy_text
    risk = RiskSpec(tuple(QIS), 2, "diagnosis", 2)
    with pytest.raises(RiskGateError):
        run_pseudonymisation(store, _token(issuer), POLICY, transfer, risk=risk)
    finished = list(store.audit.iter_rows())[-1]
    assert _figures(json.loads(finished["details"])["risk"]) == _expected(data, QIS, 2, "diagnosis")
    assert _count(engine, "shared") == 0
    engine.dispose()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_gate_over_a_file_run_spills_to_disk_and_matches_pandas(sqlite_url: str, issuer: Issuer, tmp_path: Path,
                                                                fmt: str) -> None:
    """More classes than the in-memory limit: the counts spill to the SQLite file and still add up exactly."""
    data = _rows(1500, seed=9)
    source = tmp_path / f"in.{fmt}"
    frame = pd.DataFrame(data)
    frame.to_csv(source, index=False) if fmt == "csv" else frame.to_parquet(source, index=False)
    store = Store(sa.create_engine(sqlite_url))
    qis = ["pid", "sex"]  # one class per row: many more classes than the limit
    risk = RiskSpec(tuple(qis), 2)
    out = tmp_path / f"out.{fmt}"
    transfer = plan_transfer(open_source(source, batch_size=200), FileDestination(str(out)), POLICY)
    with pytest.raises(RiskGateError):
        run_pseudonymisation(store, _token(issuer), POLICY, transfer, risk=risk, risk_memory_groups=50)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    found = json.loads(list(store.audit.iter_rows())[-1]["details"])["risk"]
    assert _figures(found) == _expected(data, qis, 2) and found["classes"] == 1500
    # the same rows with coarse quasi-identifiers pass, and the file is written
    risk = RiskSpec(("age_band", "sex"), 5, "diagnosis", 2)
    transfer = plan_transfer(open_source(source, batch_size=200), FileDestination(str(out)), POLICY)
    summary = run_pseudonymisation(store, _token(issuer), POLICY, transfer, risk=risk, risk_memory_groups=3)
    expected = _expected(pd.read_csv(source, dtype=str, keep_default_na=False).replace("", None).to_dict("list")
                         if fmt == "csv" else data, ["age_band", "sex"], 5, "diagnosis")
    assert _figures(summary.risk) == expected and out.exists()


def test_spill_counts_add_up_across_spills(tmp_path: Path) -> None:
    counts = SpillCounts(1, memory_groups=2, directory=str(tmp_path))
    for values in (["a", "b", "c"], ["a", None, "d"], ["a", "b", None]):
        counts.add([values], None)
    assert counts.spills >= 2
    assert sorted(counts.query("SELECT q0, sum(n) FROM counts GROUP BY q0")) == [
        ('"a"', 3), ('"b"', 2), ('"c"', 1), ('"d"', 1), ("null", 2)]
    counts.close()
    assert list(tmp_path.iterdir()) == []


def test_spill_counts_keep_types_apart_in_memory_and_on_disk(tmp_path: Path) -> None:
    """``1``, ``True``, ``"1"`` and ``1.0`` are equal to Python but four classes, as in the database's output."""
    import datetime as dt

    for memory_groups in (1, 100):  # spilling after every batch, and never
        counts = SpillCounts(1, memory_groups=memory_groups, directory=str(tmp_path))
        for values in ([1, True, "1"], ["1", 1.0, None], [dt.date(2028, 2, 29), "2028-02-29", None]):
            counts.add([values], None)
        assert sorted(n for _, n in counts.query("SELECT q0, sum(n) FROM counts GROUP BY q0")) == [1, 1, 1, 1, 1, 2, 2]
        counts.close()


# --- the risk report ----------------------------------------------------------------------------
def _expected_combinations(data: dict[str, list[Any]], qis: list[str], k: int) -> list[dict[str, Any]]:
    from itertools import combinations

    out = []
    for size in range(1, len(qis) + 1):
        for subset in combinations(qis, size):
            figures = _expected(data, list(subset), k)
            out.append({"quasi_identifiers": list(subset), "classes": figures["classes"],
                        "smallest_class": figures["smallest_class"], "classes_below_k": figures["classes_below_k"],
                        "rows_below_k": figures["rows_below_k"]})
    return out


def _expected_distribution(data: dict[str, list[Any]], qis: list[str], k: int) -> list[dict[str, Any]]:
    sizes = pd.DataFrame(data).groupby(qis, dropna=False).size()
    out = []
    for lo, hi in size_bins(k):
        inside = sizes[(sizes >= lo) & ((sizes <= hi) if hi is not None else True)]
        out.append({"from": lo, "to": hi, "classes": len(inside), "rows": int(inside.sum())})
    return out


def test_report_of_a_table_matches_pandas(db_url: str) -> None:
    data = _rows(700, seed=21)
    engine = sa.create_engine(db_url)
    pd.DataFrame(data).to_sql("extract", engine, index=False)
    spec = RiskSpec(tuple(QIS), 5, "diagnosis", 2)
    with engine.connect() as conn:
        report = describe_table(conn, "extract", spec)
    found = report.as_dict()
    assert _figures(found) == _expected(data, QIS, 5, "diagnosis")
    assert found["combinations"] == _expected_combinations(data, QIS, 5)
    assert found["distribution"] == _expected_distribution(data, QIS, 5)
    text = report.text()
    assert "age_band, sex, zip3" in text and "class size" in text
    for value in filter(None, data["zip3"]):
        assert f'"{value}"' not in json.dumps(found)  # counts and column names, never a class's values
    with engine.connect() as conn:  # a query with bind parameters, one of them named like the gate's own
        queried = describe_table(conn, None, spec, query="SELECT * FROM extract WHERE sex = :k", parameters={"k": "F"})
    women = {key: [v for v, sex in zip(values, data["sex"], strict=True) if sex == "F"] for key, values in data.items()}
    assert _figures(queried.as_dict()) == _expected(women, QIS, 5, "diagnosis") and queried.source == "query"
    with engine.connect() as conn, pytest.raises(PolicyError, match="'postcode' are not in"):
        describe_table(conn, "extract", RiskSpec(("postcode",), 5))
    with engine.connect() as conn, pytest.raises(PolicyError, match="does not exist"):
        describe_table(conn, "nowhere", spec)
    engine.dispose()


def test_report_of_a_file_spills_and_matches_pandas(tmp_path: Path) -> None:
    data = _rows(900, seed=5)
    path = tmp_path / "extract.parquet"
    pd.DataFrame(data).to_parquet(path, index=False)
    spec = RiskSpec(tuple(QIS), 3)
    source = open_source(path, batch_size=100)
    report = describe_batches(source.record_batches(), source.columns, spec, "file:extract.parquet",
                              memory_groups=7)
    found = report.as_dict()
    assert _figures(found) == _expected(data, QIS, 3)
    assert found["combinations"] == _expected_combinations(data, QIS, 3)
    assert found["distribution"] == _expected_distribution(data, QIS, 3)
    assert report.figures.spilled > 1
    assert pq.read_table(path).num_rows == 900


# --- dry runs -----------------------------------------------------------------------------------
def _tables(engine: sa.Engine) -> dict[str, int]:
    return {t: _count(engine, t) for t in sa.inspect(engine).get_table_names()}


def test_dry_run_writes_nothing_but_its_audited_use(store: Store, issuer: Issuer, tmp_path: Path) -> None:
    data = _rows(400, seed=2)
    store.create()
    before = _tables(store.engine)
    risk = RiskSpec(("age_band", "sex"), 5, "diagnosis", 2)
    target = TableTarget("shared", mode="append")
    transfer = plan_transfer(Rows(data), TableDestination(target, SharedTransaction(store.engine)), POLICY,
                             source_label="hospital:visits", target_label="table:shared")
    checkpoints: list[object] = []
    run = RunContext(dag_id="extract", task_id="dry", on_finished=checkpoints.append)
    summary = run_dry_run(store, _token(issuer), POLICY, transfer, run, sample=120, risk=risk)
    assert checkpoints == []  # no signed checkpoint after a dry run
    after = _tables(store.engine)
    # the audit's two rows, and the token's use as max_uses counts it
    assert after == {**before, "pseudonymise_audit": before["pseudonymise_audit"] + 2,
                     "pseudonymise_admitted": before["pseudonymise_admitted"] + 1}
    assert "shared" not in after and list(tmp_path.glob("*.partial")) == []
    sample = {k: v[:120] for k, v in data.items()}
    report = summary.as_dict()["dry_run"]
    assert report["sample_rows"] == 120
    assert report["actions"] == {"pid": "pseudonymise", "age_band": "keep", "sex": "keep", "zip3": "keep",
                                 "diagnosis": "keep"}
    assert (report["target"], report["target_exists"]) == ("table:shared", False)
    assert _figures(report["risk"]) == _expected(sample, ["age_band", "sex"], 5, "diagnosis")
    assert summary.counts["rows_in"] == 120 and summary.counts["rows_out"] == 0
    assert summary.counts["escrow_rows"] == 0
    rows = list(store.audit.iter_rows())
    assert store.audit.verify().ok
    assert [(r["operation"], r["outcome"]) for r in rows] == [("dry_run", "started"), ("dry_run", "success")]
    details = json.loads(rows[-1]["details"])
    assert details["dry_run"]["sample_rows"] == 120
    text = json.dumps(summary.as_dict()) + json.dumps(details)
    for value in data["pid"]:
        assert value not in text


def test_dry_run_to_a_file_writes_no_file_and_checks_the_policy(sqlite_url: str, issuer: Issuer,
                                                                 tmp_path: Path) -> None:
    data = _rows(50, seed=1)
    source = tmp_path / "in.csv"
    pd.DataFrame(data).to_csv(source, index=False)
    store = Store(sa.create_engine(sqlite_url))
    out = tmp_path / "out.parquet"
    transfer = plan_transfer(open_source(source), FileDestination(str(out)), POLICY)
    summary = run_dry_run(store, _token(issuer), POLICY, transfer, sample=1000)
    assert summary.dry_run["sample_rows"] == 50 and "risk" not in summary.dry_run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "issuer-store", "store.db"]
    strict = ColumnPolicy.from_mapping({"columns": {"pid": "pseudonymise"}, "default": "error"})
    transfer = plan_transfer(open_source(source), FileDestination(str(out)), strict)
    with pytest.raises(PolicyError, match="have no rule"):
        run_dry_run(store, _token(issuer), strict, transfer)
    rows = list(store.audit.iter_rows())
    assert [(r["operation"], r["outcome"]) for r in rows][-1] == ("dry_run", "failed")
    assert store.audit.verify().ok and not out.exists()
    with pytest.raises(PolicyError, match="positive number"):
        run_dry_run(store, _token(issuer), POLICY, transfer, sample=0)


def test_gate_over_a_table_in_another_database_than_the_audit(sqlite_url: str, pg_url: str, issuer: Issuer) -> None:
    """A PostgreSQL target in its own transaction (the audit in SQLite): counted by spilling, its rows rolled back."""
    data = _rows(300, seed=8)
    store, target = Store(sa.create_engine(sqlite_url)), sa.create_engine(pg_url)
    risk = RiskSpec(tuple(QIS), 3)
    transfer = plan_transfer(Rows(data), TableDestination(TableTarget("shared"), SeparateTransaction(target)), POLICY)
    with pytest.raises(RiskGateError):
        run_pseudonymisation(store, _token(issuer, "research-b"), POLICY, transfer, risk=risk, risk_memory_groups=20)
    assert not sa.inspect(target).has_table("shared")
    found = json.loads(list(store.audit.iter_rows())[-1]["details"])["risk"]
    assert _figures(found) == _expected(data, QIS, 3) and found["spills"] >= 1
    target.dispose()
