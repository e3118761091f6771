"""No data value in any error (docs/design.md §6): database and file errors name the SQLSTATE, the driver's class and
the column, never the value the driver quotes.

Each fault runs a real pseudonymisation of the sample patients (``include/sample/patients.csv``) on real
PostgreSQL or SQLite: a source query whose cast fails over a patient id, a kept column written into a
target column of another type, a key the target already holds. The error must name what the plugin was
doing, the SQLSTATE and the driver's class, and no value of the sample may appear in the exception (its
text, its repr, its formatted traceback, every exception chained to it, suppressed or not), in a log
record, or in any audit row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.errors import DataIOError, PolicyError
from pseudonymise.core.files import ParquetSink
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableTarget
from pseudonymise.core.use import GivenToken

from tests.sample import assert_no_value, audit_texts, exception_texts, load_sample, sample_rows


def _run(engine: sa.Engine, issuer: Issuer, source: Any, sink: Callable[[list[str], Any], Any]) -> DataIOError:
    """A pseudonymisation (patient_id pseudonymised, the rest kept) that must fail with the plugin's error."""
    with pytest.raises(DataIOError) as info:
        policy = ColumnPolicy.pseudonymise("patient_id", default="keep")
        # a COPY source goes with a COPY sink in these cases: its blocks go to the sink as they are
        transfer = plan_transfer(source, SinkFactory(sink, copy_text=isinstance(source, PostgresCopySource)), policy,
                                 source_label="hospital:query", target_label="research:visits")
        run_pseudonymisation(Store(engine), GivenToken(issuer.issue("research-a", "pseudonymisation"),
                                                       issuer.public_keys()), policy, transfer)
    return info.value


def _outcomes(engine: sa.Engine) -> list[tuple[str, str | None]]:
    return [(r["outcome"], r["error_class"]) for r in AuditLog(engine).iter_rows()]


def _check(error: BaseException, engine: sa.Engine | None, caplog: pytest.LogCaptureFixture,
           must_say: Iterable[str]) -> None:
    assert_no_value(exception_texts(error), where="the exception")
    assert_no_value([r.getMessage() + (r.exc_text or "") for r in caplog.records], where="the log")
    if engine is not None:
        assert_no_value(audit_texts(engine), where="the audit")
        assert _outcomes(engine) == [("started", None), ("failed", "DatabaseIOError")]
    message = str(error)
    for fact in must_say:
        assert fact in message, message
    assert type(error).__name__ == "DatabaseIOError"
    assert "left out because it can quote data values" in message
    assert error.__cause__ is None and error.__context__ is None


# --- PostgreSQL -----------------------------------------------------------------------------------
def _cast_query(first_failure: int) -> str:
    """Cast the patient id to bigint from row ``first_failure`` on (the sample's ids are text: 'P770839')."""
    return (f"SELECT visit_id, CASE WHEN visit_id < {first_failure} THEN visit_id ELSE patient_id::bigint END AS"
            " patient_id, name, birth_year FROM patient_visits ORDER BY visit_id")


@pytest.mark.postgres
@pytest.mark.parametrize("first_failure", [1, 121], ids=["first-row", "mid-stream"])
@pytest.mark.parametrize("path", ["cursor", "copy"])
def test_postgres_cast_error_in_the_source_query(pg_url: str, issuer: Issuer, path: str, first_failure: int,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    engine = sa.create_engine(pg_url)
    load_sample(engine)
    query = _cast_query(first_failure)
    target = TableTarget("visits", mode="replace")
    try:
        source: Any = (PostgresCopySource(engine, query, batch_size=50) if path == "copy"
                       else SqlSource(engine, query, batch_size=50))
    except DataIOError as exc:  # the cursor fails as the query starts, before any token is used
        assert (path, first_failure) == ("cursor", 1)
        error: DataIOError = exc
        _check(error, None, caplog, ["the source query could not be read", "SQLSTATE 22P02",
                                     "psycopg2.errors.InvalidTextRepresentation"])
        return
    error = _run(engine, issuer, source, lambda cols, conn: target.sink(conn, cols, use_copy=path == "copy",
                                                                        pseudonymised=["patient_id"]))
    _check(error, engine, caplog, ["reading the source", "SQLSTATE 22P02 invalid_text_representation",
                                   "psycopg2.errors.InvalidTextRepresentation", "fix the cast"])
    assert not sa.inspect(engine).has_table("visits")


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["copy", "insert"])
def test_postgres_kept_column_into_a_wrongly_typed_target_column(pg_url: str, issuer: Issuer, path: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    engine = sa.create_engine(pg_url)
    load_sample(engine)
    with engine.begin() as conn:  # the name, kept, goes into an integer column
        conn.execute(sa.text("CREATE TABLE visits (visit_id bigint, patient_id text, name integer, birth_year integer)"))
    query = "SELECT visit_id, patient_id, name, birth_year FROM patient_visits ORDER BY visit_id"
    copy = path == "copy"
    source = PostgresCopySource(engine, query, batch_size=50) if copy else SqlSource(engine, query, batch_size=50)
    if copy:
        source.carry_as_text(["visit_id", "name", "birth_year"])
    target = TableTarget("visits", mode="append")
    error = _run(engine, issuer, source, lambda cols, conn: target.sink(conn, cols, use_copy=copy,
                                                                        pseudonymised=["patient_id"]))
    facts = ["the target table:visits", "SQLSTATE 22P02", "psycopg2.errors.InvalidTextRepresentation",
             "the type of its column in the target"]
    _check(error, engine, caplog, [*facts, "column 'name'"] if copy else facts)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM visits")).scalar_one() == 0


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["copy", "insert"])
def test_postgres_unique_violation_names_the_constraint_not_the_key(pg_url: str, issuer: Issuer, path: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL's DETAIL says ``Key (name)=(…) already exists``: only the constraint's name may come out."""
    caplog.set_level(logging.WARNING)
    engine = sa.create_engine(pg_url)
    load_sample(engine)
    with engine.begin() as conn:  # the sample has two patients of one name
        conn.execute(sa.text("CREATE TABLE visits (visit_id bigint, patient_id text, name text"
                             " CONSTRAINT visits_name_unique UNIQUE, birth_year integer)"))
    query = "SELECT visit_id, patient_id, name, birth_year FROM patient_visits ORDER BY visit_id"
    copy = path == "copy"
    source = PostgresCopySource(engine, query, batch_size=50) if copy else SqlSource(engine, query, batch_size=50)
    target = TableTarget("visits", mode="append")
    error = _run(engine, issuer, source, lambda cols, conn: target.sink(conn, cols, use_copy=copy,
                                                                        pseudonymised=["patient_id"]))
    _check(error, engine, caplog, ["SQLSTATE 23505 unique_violation", "psycopg2.errors.UniqueViolation",
                                   "table 'visits'", "constraint 'visits_name_unique'", "'upsert'"])


@pytest.mark.postgres
def test_postgres_constraint_checked_at_commit_names_the_constraint_not_the_key(
        pg_url: str, issuer: Issuer, caplog: pytest.LogCaptureFixture) -> None:
    """A deferred constraint fails at COMMIT, after every write of the run: the run's transaction as a whole
    turns the error into the plugin's."""
    caplog.set_level(logging.WARNING)
    engine = sa.create_engine(pg_url)
    load_sample(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visits (visit_id bigint, patient_id text, name text CONSTRAINT"
                             " visits_name_unique UNIQUE DEFERRABLE INITIALLY DEFERRED, birth_year integer)"))
    query = "SELECT visit_id, patient_id, name, birth_year FROM patient_visits ORDER BY visit_id"
    target = TableTarget("visits", mode="append")
    error = _run(engine, issuer, SqlSource(engine, query, batch_size=50),
                 lambda cols, conn: target.sink(conn, cols, use_copy=False, pseudonymised=["patient_id"]))
    _check(error, engine, caplog, ["nothing was committed", "SQLSTATE 23505 unique_violation",
                                   "psycopg2.errors.UniqueViolation", "constraint 'visits_name_unique'"])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM visits")).scalar_one() == 0


# --- SQLite ---------------------------------------------------------------------------------------
@pytest.fixture
def sqlite_engines(tmp_path: Path) -> tuple[sa.Engine, sa.Engine]:
    """The hospital's database (the sample) and the research one (target, audit), two SQLite files."""
    hospital = sa.create_engine(f"sqlite:///{tmp_path / 'hospital.db'}")
    load_sample(hospital)
    return hospital, sa.create_engine(f"sqlite:///{tmp_path / 'research.db'}")


@pytest.mark.parametrize("first_failure", [1, 121], ids=["first-row", "mid-stream"])
def test_sqlite_failing_source_query_does_not_quote_its_bound_values(
        sqlite_engines: tuple[sa.Engine, sa.Engine], issuer: Issuer, first_failure: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """A query of a mapped key range binds key values (``:lo``, ``:hi``); SQLAlchemy's text of the error
    repeats them (``[parameters: …]``)."""
    caplog.set_level(logging.WARNING)
    hospital, research = sqlite_engines
    ids = sorted(r["patient_id"] for r in sample_rows())
    query = ("SELECT visit_id, patient_id, name FROM patient_visits WHERE patient_id >= :lo AND patient_id < :hi"
             f" AND (visit_id < {first_failure} OR json(name) IS NOT NULL)")  # a name is not JSON: SQLite fails
    target = TableTarget("visits", mode="replace")
    try:
        source = SqlSource(hospital, query, {"lo": ids[0], "hi": ids[-1]}, batch_size=50)
    except DataIOError as exc:  # the query fails as it starts, before any token is used
        assert first_failure == 1
        _check(exc, None, caplog, ["the source query could not be read", "SQLite SQLITE_ERROR (1)",
                                   "sqlalchemy.exc.OperationalError from sqlite3.OperationalError"])
        return
    error = _run(research, issuer, source, lambda cols, conn: target.sink(conn, cols, pseudonymised=["patient_id"]))
    # mid-stream, rows come straight from the DB-API cursor: the driver's own class
    _check(error, research, caplog, ["reading the source", "SQLite SQLITE_ERROR (1)", "sqlite3.OperationalError"])


@pytest.mark.parametrize("declared", ["STRICT integer", "date"])
def test_sqlite_kept_column_into_a_wrongly_typed_target_column(
        sqlite_engines: tuple[sa.Engine, sa.Engine], issuer: Issuer, declared: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A STRICT table refuses text in an integer column (SQLite names the column, not the value); a DATE
    column's SQLAlchemy bind processor refuses text (SQLAlchemy's own error would list every parameter of the
    batch): the column is named, by its processor's error class."""
    caplog.set_level(logging.WARNING)
    hospital, research = sqlite_engines
    with research.begin() as conn:
        if declared == "date":
            conn.execute(sa.text("CREATE TABLE visits (visit_id integer, patient_id text, name date)"))
        else:
            conn.execute(sa.text("CREATE TABLE visits (visit_id integer, patient_id text, name integer) STRICT"))
    source = SqlSource(hospital, "SELECT visit_id, patient_id, name FROM patient_visits ORDER BY visit_id",
                       batch_size=50)
    target = TableTarget("visits", mode="append")
    error = _run(research, issuer, source, lambda cols, conn: target.sink(conn, cols, pseudonymised=["patient_id"]))
    facts = ["writing the target table:visits failed", "the type of its column in the target"]
    if declared == "date":
        facts += ["column 'name' does not convert to the column's type (DATE; TypeError)"]
    else:
        facts += ["SQLite SQLITE_CONSTRAINT_DATATYPE (3091)", "sqlite3.IntegrityError", "column 'name'"]
    _check(error, research, caplog, facts)
    with research.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM visits")).scalar_one() == 0


def test_partition_bound_of_another_type_is_named_by_its_column_not_its_value(tmp_path: Path) -> None:
    """Mapped key ranges make key values the partition bounds; int() would quote one."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'research.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visits (visit_id integer, patient_id text)"))
    bound = sorted(r["patient_id"].strip() for r in sample_rows())[0]
    target = TableTarget("visits", mode="replace_partition", partition_column="visit_id", partition_start=bound)
    with engine.begin() as conn, pytest.raises(PolicyError) as info:
        target.sink(conn, ["visit_id", "patient_id"])
    assert_no_value(exception_texts(info.value), where="the exception")
    assert "column 'visit_id'" in str(info.value)


# --- files ----------------------------------------------------------------------------------------
def test_parquet_value_that_does_not_fit_names_the_column_not_the_value(tmp_path: Path) -> None:
    """pyarrow says ``Could not convert 'Marie Bakker' with type str: tried to convert to int64``."""
    rows = sample_rows()
    sink = ParquetSink(tmp_path / "out.parquet", ["patient_id", "name"],
                       schema=pa.schema([pa.field("patient_id", pa.string()), pa.field("name", pa.int64())]))
    with pytest.raises(DataIOError) as info:
        sink.write({"patient_id": [r["patient_id"] for r in rows], "name": [r["name"] for r in rows]})
    assert_no_value(exception_texts(info.value), where="the exception")
    assert "column 'name'" in str(info.value) and "int64" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert list(tmp_path.iterdir()) == []


def test_parquet_second_batch_of_another_type_names_the_column_not_the_value(tmp_path: Path) -> None:
    rows = sample_rows()
    sink = ParquetSink(tmp_path / "out.parquet", ["name"])
    sink.write({"name": [1, 2]})  # the schema comes from the first batch: integers
    with pytest.raises(DataIOError) as info:
        sink.write({"name": [r["name"] for r in rows]})
    assert_no_value(exception_texts(info.value), where="the exception")
    assert "column 'name'" in str(info.value)
