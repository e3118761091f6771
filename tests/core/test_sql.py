"""SQL sources and targets: COPY text format both ways, the cursor path, write modes, hostile names."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import DataIOError, PolicyError, UnsupportedTypeError
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableTarget, _pg_text, copy_text_fields

HOSTILE = 'we"ird; DROP TABLE x; --'
Q = '"' + HOSTILE.replace('"', '""') + '"'  # the test's own SQL quotes it by hand


def test_copy_text_fields_unescape_and_null() -> None:
    assert copy_text_fields("a\\tb\t\\N\t\\\\x\t\\n\\r\t\\101\\x41") == ["a\tb", None, "\\x", "\n\r", "AA"]
    assert copy_text_fields("") == [""]


@pytest.mark.parametrize("value", ["plain", "tab\there", "new\nline", "back\\slash", "cr\rx", "", "\\N", "ünï"])
def test_pg_text_round_trips_through_the_parser(value: str) -> None:
    assert copy_text_fields(_pg_text(value)) == [value]


def test_pg_text_null_and_types() -> None:
    assert _pg_text(None) == "\\N"
    assert _pg_text(True) == "t"
    assert _pg_text(b"\x01\xff") == "\\\\x01ff"
    assert _pg_text(dt.date(2026, 1, 2)) == "2026-01-02"


def _fill(url: str) -> sa.Engine:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE TABLE {Q} (id bigint PRIMARY KEY, "select" text, d date, n int, u uuid, '
                             "b boolean, f float8)"))
        conn.execute(sa.text(f'INSERT INTO {Q} VALUES (:id, :s, :d, :n, :u, :b, :f)'), [
            {"id": i, "s": None if i % 5 == 0 else f"v\t{i}\n\\", "d": dt.date(2026, 1, 1 + i % 28), "n": i * 7,
             "u": uuid.UUID(int=i), "b": i % 2 == 0, "f": i / 3} for i in range(1, 1001)])
    return engine


def _collect(source: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {c: [] for c in source.columns}
    batches = 0
    for batch in source.batches():
        batches += 1
        for k, v in batch.items():
            out[k].extend(v)
    out["__batches__"] = [batches]
    return out


@pytest.mark.postgres
def test_copy_source_gives_postgres_text_and_detects_types(pg_url: str) -> None:
    engine = _fill(pg_url)
    query = f'SELECT id, "select", d, n, u, b FROM {Q} WHERE id <= :hi ORDER BY id'
    source = PostgresCopySource(engine, query, {"hi": 500}, batch_size=64)
    assert source.columns == ["id", "select", "d", "n", "u", "b"]
    assert source.usable(["select", "d", "n", "u"]) and not source.usable(["b"])
    data = _collect(source)
    assert data["__batches__"] == [8]
    assert data["id"][:3] == ["1", "2", "3"] and len(data["id"]) == 500
    assert data["select"][4] is None and data["select"][0] == "v\t1\n\\"
    assert data["d"][0] == "2026-01-02" and data["u"][0] == str(uuid.UUID(int=1))
    cursor = _collect(SqlSource(engine, query, {"hi": 500}, batch_size=100))
    # the canonical text of every safe type is the same on both paths (so pseudonyms are too)
    assert data["select"] == cursor["select"]
    assert data["n"] == [str(v) for v in cursor["n"]]
    assert data["d"] == [v.isoformat() for v in cursor["d"]]
    assert data["u"] == [str(v) for v in cursor["u"]]
    with pytest.raises(UnsupportedTypeError, match="'f' is of type double precision"):
        PostgresCopySource(engine, f'SELECT f FROM {Q}').check_types(["f"])


@pytest.mark.postgres
def test_broken_query_is_a_clear_error(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    with pytest.raises(DataIOError, match="could not be read"):
        PostgresCopySource(engine, "SELECT * FROM no_such_table")
    with pytest.raises(DataIOError, match="could not be read"):
        SqlSource(engine, "SELECT * FROM no_such_table")


def _write(url: str, target: TableTarget, batches: list[dict[str, list[Any]]], copy: bool | None = None) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        sink = target.sink(conn, list(batches[0]), use_copy=copy, pseudonymised=["p"])
        for b in batches:
            sink.write(b)
        sink.commit()


def _table(url: str, name: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        t = sa.Table(name, sa.MetaData(), autoload_with=conn)
        return [tuple(r) for r in conn.execute(sa.select(t).order_by(t.c.k))]


def test_write_modes(db_url: str) -> None:
    _write_modes(db_url, None)


@pytest.mark.postgres
@pytest.mark.parametrize("copy", [True, False], ids=["copy", "insert"])
def test_write_modes_postgres_copy_and_insert(pg_url: str, copy: bool) -> None:
    _write_modes(pg_url, copy)


def _write_modes(db_url: str, copy: bool | None) -> None:
    name = HOSTILE + "_t"
    day1 = {"k": [1, 2, 3], "p": ["a\tb", None, "c\\d"], "day": ["2026-01-01", "2026-01-01", "2026-01-02"]}
    _write(db_url, TableTarget(name), [day1], copy)
    assert len(_table(db_url, name)) == 3
    _write(db_url, TableTarget(name), [day1], copy)  # append
    assert len(_table(db_url, name)) == 6
    _write(db_url, TableTarget(name, mode="replace"), [day1], copy)
    assert _table(db_url, name) == [(1, "a\tb", "2026-01-01"), (2, None, "2026-01-01"), (3, "c\\d", "2026-01-02")]
    _write(db_url, TableTarget(name, mode="replace_partition", partition_column="day", partition_start="2026-01-02",
                               partition_end="2026-01-03"),
           [{"k": [4], "p": ["new"], "day": ["2026-01-02"]}], copy)
    assert [r[0] for r in _table(db_url, name)] == [1, 2, 4]


def test_upsert(db_url: str) -> None:
    _upsert(db_url, None)


@pytest.mark.postgres
def test_upsert_postgres_copy(pg_url: str) -> None:
    _upsert(pg_url, True)


def _upsert(db_url: str, copy: bool | None) -> None:
    target = TableTarget("up", mode="upsert", upsert_key=["k"])
    _write(db_url, target, [{"k": [1, 2], "p": ["a", "b"]}], copy)
    _write(db_url, target, [{"k": [2, 3], "p": ["B", "c"]}], copy)
    assert _table(db_url, "up") == [(1, "a"), (2, "B"), (3, "c")]


def test_target_errors_before_writing(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (k integer, p text)"))
    with engine.begin() as conn, pytest.raises(PolicyError, match="'extra' are not in the target"):
        TableTarget("t").sink(conn, ["k", "p", "extra"])
    with pytest.raises(PolicyError, match="unknown"):
        TableTarget("t", mode="overwrite")
    with pytest.raises(PolicyError, match="upsert_key"):
        TableTarget("t", mode="upsert")


def test_failed_load_leaves_target_unchanged(sqlite_url: str) -> None:
    _write(sqlite_url, TableTarget("t", mode="replace"), [{"k": [1], "p": ["x"]}])
    engine = sa.create_engine(sqlite_url)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        sink = TableTarget("t", mode="replace").sink(conn, ["k", "p"])
        sink.write({"k": [2, 3], "p": ["y", "z"]})
        raise RuntimeError("killed mid-load")
    assert _table(sqlite_url, "t") == [(1, "x")]
