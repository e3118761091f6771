"""SQL sources and targets: COPY text format both ways, the cursor path, write modes, hostile names."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import DatabaseIOError, DataIOError, PolicyError, UnsupportedTypeError
from pseudonymise.core.sql import (
    PostgresCopySource,
    SqlSource,
    TableTarget,
    _pg_text,
    copy_text_fields,
    record_batch,
    reflect_table,
)

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


# --- the generic path on SQLite: the DB-API cursor both ways ----------------------------------------
def _sqlite_file(url: str) -> str:
    return url.removeprefix("sqlite:///")


def test_sqlite_source_reads_the_drivers_values_from_the_cursor(sqlite_url: str) -> None:
    """Every storage class, NULLs, and a column of mixed classes (SQLite's dynamic typing) come out as
    sqlite3 itself gives them, in batches of ``batch_size``."""
    import sqlite3

    rows = [(i, None if i % 4 == 0 else f"v\t{i}", f"2026-01-{1 + i % 28:02d}", i / 4 if i % 3 else None,
             bytes([i % 256, 0]), 2**62 + i, i if i % 2 else f"t{i}") for i in range(1, 11)]
    with sqlite3.connect(_sqlite_file(sqlite_url)) as conn:
        conn.execute("CREATE TABLE s (k INTEGER PRIMARY KEY, t TEXT, d DATE, f REAL, b BLOB, big BIGINT, mixed)")
        conn.executemany("INSERT INTO s VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    source = SqlSource(sa.create_engine(sqlite_url), "SELECT * FROM s WHERE k >= :lo ORDER BY k", {"lo": 2},
                       batch_size=4)
    assert source.reads_the_cursor
    data = _collect(source)
    assert data.pop("__batches__") == [3]
    assert data == {name: [r[i] for r in rows[1:]] for i, name in enumerate(["k", "t", "d", "f", "b", "big", "mixed"])}


@pytest.mark.postgres
def test_postgres_cursor_source_still_reads_through_sqlalchemy(pg_url: str) -> None:
    """PostgreSQL's generic path reads a server-side cursor that SQLAlchemy reads ahead of the caller."""
    engine = _fill(pg_url)
    source = SqlSource(engine, f'SELECT id, "select" FROM {Q} ORDER BY id', batch_size=300)
    assert not source.reads_the_cursor
    data = _collect(source)
    assert data["__batches__"] == [4] and data["id"] == list(range(1, 1001))


def _typed_columns() -> list[sa.Column[Any]]:
    return [sa.Column("k", sa.Integer, primary_key=True), sa.Column("t", sa.Text), sa.Column("d", sa.Date),
            sa.Column("ts", sa.DateTime), sa.Column("b", sa.Boolean), sa.Column("n", sa.Numeric(10, 2)),
            sa.Column("f", sa.Float), sa.Column("blob", sa.LargeBinary), sa.Column("big", sa.BigInteger)]


def _typed_rows() -> dict[str, list[Any]]:
    import decimal

    n = 7
    return {"k": list(range(1, n + 1)), "t": ["a\tb", None, "ünï", "", "x'y", "\\N", "z"],
            "d": [dt.date(2026, 1, i) for i in range(1, n)] + [None],
            "ts": [dt.datetime(2026, 1, i, 10, i, 0, i * 1000) for i in range(1, n)] + [None],
            "b": [True, False, None, True, False, True, False],
            "n": [decimal.Decimal("1.25"), None, decimal.Decimal("-3.5"), decimal.Decimal(0), decimal.Decimal("9.99"),
                  decimal.Decimal("12"), decimal.Decimal("0.01")],
            "f": [0.5, None, -1.25, 3.0, 1e10, 2.5, 0.1], "blob": [b"\x00\xff", None, b"", b"a", b"b", b"c", b"d"],
            "big": [2**62, None, -(2**62), 0, 1, 2, 3]}


def _stored(url: str, table: str) -> list[tuple[Any, ...]]:
    """Each cell as SQLite stores it (its storage class and value), read with sqlite3 itself."""
    import sqlite3

    names = [c.name for c in _typed_columns()]
    with sqlite3.connect(_sqlite_file(url)) as conn:
        return conn.execute(f"SELECT {', '.join(f'typeof({c}), {c}' for c in names)} FROM {table} ORDER BY k").fetchall()


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_sqlite_bulk_insert_stores_what_sqlalchemys_insert_stores(sqlite_url: str, mode: str) -> None:
    """The cursor's executemany binds every type as SQLAlchemy's own INSERT did before it (dates and
    timestamps as SQLite text, booleans as integers, decimals as reals), NULLs included."""
    engine = sa.create_engine(sqlite_url)
    meta = sa.MetaData()
    for name in ("ours", "theirs"):
        sa.Table(name, meta, *_typed_columns())
    meta.create_all(engine)
    batch = _typed_rows()
    with engine.begin() as conn:
        sink = TableTarget("ours", mode=mode, upsert_key=["k"] if mode == "upsert" else None).sink(conn, list(batch))
        sink.write({k: v[:3] for k, v in batch.items()})
        sink.write({k: v[3:] for k, v in batch.items()})
        sink.commit()
        rows = [dict(zip(batch, r, strict=True)) for r in zip(*batch.values(), strict=True)]
        conn.execute(meta.tables["theirs"].insert(), rows)  # SQLAlchemy's own INSERT, as the target was written before
    assert _stored(sqlite_url, "ours") == _stored(sqlite_url, "theirs")
    assert len(_stored(sqlite_url, "ours")) == 7


def test_sqlite_bulk_insert_handles_hostile_column_names(sqlite_url: str) -> None:
    import sqlite3

    names = ['we"ird; --', "a b", "per%cent", ":colon", "?q"]
    engine = sa.create_engine(sqlite_url)
    batch = {name: [f"{i}-{name}" for i in range(3)] for name in names}
    for _ in range(2):  # created with its unique key, then the same rows again
        with engine.begin() as conn:
            sink = TableTarget(HOSTILE, mode="upsert", upsert_key=[names[0]]).sink(conn, names)
            sink.write(batch)
            sink.commit()
    with sqlite3.connect(_sqlite_file(sqlite_url)) as conn:
        got = conn.execute(f"SELECT * FROM {Q} ORDER BY rowid").fetchall()
    assert got == [tuple(batch[n][i] for n in names) for i in range(3)]


def test_sqlite_value_of_the_wrong_type_fails_naming_the_column_and_writes_nothing(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    meta = sa.MetaData()
    sa.Table("t", meta, sa.Column("k", sa.Integer), sa.Column("d", sa.Date))
    meta.create_all(engine)
    _write(sqlite_url, TableTarget("t"), [{"k": [1], "d": [dt.date(2026, 1, 1)]}])
    with pytest.raises(DatabaseIOError, match="column 'd' does not convert") as raised, engine.begin() as conn:
        sink = TableTarget("t", mode="replace").sink(conn, ["k", "d"])
        sink.write({"k": [2], "d": [dt.date(2026, 1, 2)]})
        sink.write({"k": [3], "d": ["secret-value-3"]})
    assert "secret-value" not in str(raised.value) and raised.value.__context__ is None
    assert _table(sqlite_url, "t") == [(1, dt.date(2026, 1, 1))]


# --- Arrow batches from the generic source ------------------------------------------------------------
@pytest.mark.parametrize("values, arrow_type", [
    (["a", None, "ü"], pa.string()), ([1, None, -(2**63)], pa.int64()), ([True, None], pa.bool_()),
    ([None, None], pa.null()), ([0.5, None, 2.0], pa.float64()), ([b"\x00", None], pa.binary()),
    ([dt.date(2026, 1, 2), None], pa.date32()),
])
def test_record_batch_holds_columns_of_one_type_exactly(values: list[Any], arrow_type: pa.DataType) -> None:
    batch = record_batch({"c": values, "k": list(range(len(values)))})
    assert batch is not None and batch.schema.field("c").type == arrow_type
    back = batch.column(0).to_pylist()
    assert back == values and list(map(type, back)) == list(map(type, values))


@pytest.mark.parametrize("values", [
    [1, "1"], ["a", b"a"], [1, 2.5], [2.5, 1], [True, 1], [dt.date(2026, 1, 1), dt.datetime(2026, 1, 1, 5)],
    [2**64], ["lone \ud800"], [uuid.UUID(int=1)], [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)],
])
def test_record_batch_refuses_what_arrow_would_not_give_back_exactly(values: list[Any]) -> None:
    """Several Python types in one column (SQLite allows it), or a type Arrow would change: columns stay Python."""
    assert record_batch({"ok": ["x"] * len(values), "c": values}) is None


def test_sqlite_source_gives_record_batches_and_python_columns_where_arrow_cannot(sqlite_url: str) -> None:
    import sqlite3

    with sqlite3.connect(_sqlite_file(sqlite_url)) as conn:
        conn.execute("CREATE TABLE s (k INTEGER, v)")
        conn.executemany("INSERT INTO s VALUES (?, ?)", [(1, "a"), (2, None), (3, 7), (4, "d")])
    batches = list(SqlSource(sa.create_engine(sqlite_url), "SELECT * FROM s ORDER BY k", batch_size=2).record_batches())
    assert isinstance(batches[0], pa.RecordBatch) and batches[0].to_pydict() == {"k": [1, 2], "v": ["a", None]}
    assert batches[1] == {"k": [3, 4], "v": [7, "d"]}  # an integer and a text in one column


@pytest.mark.postgres
def test_copy_blocks_ramp_up_then_hold_the_batch_size(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    """The first blocks hold an eighth, a quarter, a half of ``batch_size`` rows (so the writer starts early), the
    rest at least ``batch_size``; every block is whole rows, none is lost (reads of 100 rows each, as a pipe may
    give them)."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ramp (id bigint)"))
    source = PostgresCopySource(engine, "SELECT * FROM ramp", batch_size=1000)
    reads = [b"".join(b"%d\n" % (100 * r + i) for i in range(100)) for r in range(50)]
    monkeypatch.setattr(source, "_chunks", lambda: (chunk for chunk in reads))
    blocks = list(source.copy_blocks())
    assert [b.rows for b in blocks] == [200, 300, 500, 1000, 1000, 1000, 1000]
    assert all(b.data.count(b"\n") == b.rows and b.data.endswith(b"\n") for b in blocks)
    assert b"".join(b.data for b in blocks) == b"".join(reads)


@pytest.mark.postgres
def test_copy_blocks_of_a_real_copy_are_whole_rows_and_complete(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE ramp AS SELECT g AS id, 'P' || g AS pid FROM generate_series(1, 100000) g"))
    blocks = list(PostgresCopySource(engine, "SELECT * FROM ramp ORDER BY id", batch_size=40_000).copy_blocks())
    assert blocks[0].rows >= 5_000 and all(b.rows >= 40_000 for b in blocks[3:-1])
    rows = b"".join(b.data for b in blocks).decode().splitlines()
    assert rows == [f"{g}\tP{g}" for g in range(1, 100_001)] and sum(b.rows for b in blocks) == 100_000


@pytest.mark.postgres
def test_a_new_postgres_target_of_declared_types_can_be_created_before_any_row(pg_url: str, sqlite_url: str) -> None:
    """What lets the run's writer create the target while the first batch is still being read (core/pipeline.py)."""
    engine = sa.create_engine(pg_url)
    types = {"id": "bigint", "pid": "text"}
    with engine.begin() as conn:
        sink = TableTarget("fresh", mode="replace").sink(conn, ["id", "pid"], use_copy=True, pseudonymised=["pid"],
                                                         type_names=types)
        assert sink.creates_without_rows
        sink.open_table({})
        assert not sink.creates_without_rows and sink.table is not None
        assert {c.name: str(c.type) for c in sink.table.c} == {"id": "BIGINT", "pid": "TEXT"}
        sink.commit()
    with engine.begin() as conn:  # what it made of the new table's columns is what a full reflection gives
        declared = {"id": "bigint", "at": "timestamp with time zone", "d": "date", "n": "numeric(10,2)",
                    "u": "uuid", "b": "boolean", "v": "character varying(20)", "tags": "text[]", "pid": "text"}
        made = TableTarget("typed", mode="replace_partition", partition_column="d", partition_start="2026-01-01",
                           partition_end="2026-02-01").sink(conn, list(declared), use_copy=True, pseudonymised=["pid"],
                                                            type_names=declared)
        made.open_table({})
        assert made.table is not None
        full = reflect_table(conn, "typed", None)
        assert full is not None
        assert [(c.name, repr(c.type), c.nullable) for c in made.table.c] == \
            [(c.name, repr(c.type), c.nullable) for c in full.c]
        made.commit()
    with engine.begin() as conn:
        existing = TableTarget("fresh", mode="replace").sink(conn, ["id", "pid"], use_copy=True, type_names=types)
        assert not existing.creates_without_rows  # there already: its write mode was applied as it opened
        untyped = TableTarget("other", mode="replace").sink(conn, ["id", "pid"], use_copy=True)
        assert not untyped.creates_without_rows  # its types come from the first batch's values
    with sa.create_engine(sqlite_url).begin() as conn:
        assert not TableTarget("fresh").sink(conn, ["id"], type_names={"id": "bigint"}).creates_without_rows
