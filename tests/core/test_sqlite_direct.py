"""SQLite into SQLite done by SQLite (``core/sqlite_direct.py``): the same target as the generic path and as docs/design.md §4.

Each run is made twice, from the same source file into two stores: once as a table source (the direct path:
one ``INSERT … SELECT`` calling the C engine per value) and once as a query source (the generic path: cursor,
Arrow batches, ``executemany``). The two targets must hold the same rows, value for value and storage class for
storage class, and the pseudonyms must be those of ``tests/reference.py`` (the standard library's HMAC).
"""

from __future__ import annotations

import hmac
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core import collisions, native, pseudonymiser, sqlite_direct
from pseudonymise.core.errors import CollisionError, DatabaseIOError, InvalidTextError, UnsupportedTypeError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import RunSummary, Store, run_dry_run, run_pseudonymisation
from pseudonymise.core.plan import QuerySource, SharedTransaction, TableDestination, Transfer, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import TableTarget, table_query
from pseudonymise.core.use import GivenToken

from tests import reference

needs_native = pytest.mark.skipif(not native.available(), reason="the C engine is not built or switched off")

#: One value of each kind SQLite can hand over, per row: text (ASCII, NFD and NFC spellings of one name, empty,
#: padded, a megabyte), integers (negative, 63-bit), a blob with NUL and non-UTF-8 bytes, NULL.
PIDS: list[Any] = ["P1", "  p1 ", 42, -7, 2**62, b"\x00\xff", "Pe\u0301", "P\u00e9", "", "x" * 1_000_000, None,
                   "\u0130stanbul", "P1", "ward\tA\\", "Ärzte"]
NAMES: list[Any] = ["Ann", None, "Bo", "Cy", "Ann", 7, "Dee", "É", "Ed", "Flo", "Gus", None, "Ann", "Hal", "Ivy"]
#: kept: its first value makes a new target's column BIGINT (INTEGER affinity), the others show that affinity
SCORES: list[Any] = [2, None, 1.5, "3", b"\x01", 0.25, -1.0, "x", 5, 6, 7, 8, 9, 10, 11]
POLICY = {"columns": {"pid": {"action": "pseudonymise", "normalise": ["strip", "lower"], "domain": "patients"},
                      "name": "pseudonymise", "score": "keep", "secret": "drop"}, "default": "keep"}


def _normalised(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _source(path: Path, *, table: str = "visits", pid: str = "pid", pids: list[Any] = PIDS) -> sa.Engine:
    quoted_table, quoted_pid = '"' + table.replace('"', '""') + '"', '"' + pid.replace('"', '""') + '"'
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE {quoted_table} (id INTEGER PRIMARY KEY, {quoted_pid}, name TEXT, score, secret TEXT)")
        conn.executemany(f"INSERT INTO {quoted_table} VALUES (?, ?, ?, ?, ?)",
                         [(i + 1, p, n, s, "s") for i, (p, n, s) in enumerate(zip(pids, NAMES, SCORES, strict=False))])
    return sa.create_engine(f"sqlite:///{path}")


@pytest.fixture
def direct_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the direct path ran (the real method, wrapped to record that it ran)."""
    ran: list[str] = []
    statement = sqlite_direct.SqliteDirect._statement

    def recorded(self: sqlite_direct.SqliteDirect, *args: Any) -> str:
        ran.append(statement(self, *args))
        return ran[-1]

    monkeypatch.setattr(sqlite_direct.SqliteDirect, "_statement", recorded)
    return ran


@pytest.fixture(params=["sqlite", "callback"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How SQLite calls the column's function: as SQLite's own (``native.sqlite_register``), or through sqlite3's
    ``create_function`` (what runs where the first cannot be done: not CPython, a SQLite linked into the module)."""
    if request.param == "callback":
        monkeypatch.setattr(native, "sqlite_register", lambda *args, **kwargs: False)
    return str(request.param)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two stores (each its target's database): one for the direct path, one for the generic path."""
    pair = (Store(sa.create_engine(f"sqlite:///{tmp_path / 'direct.db'}")),
            Store(sa.create_engine(f"sqlite:///{tmp_path / 'generic.db'}")))
    yield pair
    for store in pair:
        store.engine.dispose()


def _transfer(source: sa.Engine, store: Store, target: TableTarget, policy: ColumnPolicy, *, direct: bool,
              table: str = "visits") -> Transfer:
    query = table_query(table, None, source.dialect)
    return plan_transfer(QuerySource(source, query, batch_size=4, table=table if direct else None),
                         TableDestination(target, SharedTransaction(store.engine)), policy)


def _run(source: sa.Engine, store: Store, raw: str, issuer: Issuer, target: TableTarget, *, direct: bool,
         policy: ColumnPolicy | None = None, table: str = "visits") -> RunSummary:
    policy = policy or ColumnPolicy.from_mapping(POLICY)
    transfer = _transfer(source, store, target, policy, direct=direct, table=table)
    assert (transfer.sqlite_direct is not None) == direct
    return run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy, transfer)


def _dump(engine: sa.Engine, table: str = "out") -> tuple[list[Any], list[tuple[Any, ...]]]:
    """The table's declared columns and its rows in rowid order, each value with its storage class."""
    with engine.connect() as conn:
        quoted = '"' + table.replace('"', '""') + '"'
        columns = [tuple(r) for r in conn.exec_driver_sql(f"PRAGMA table_info({quoted})")]
        names = ['"' + c[1].replace('"', '""') + '"' for c in columns]
        select = ", ".join(f"{n}, typeof({n})" for n in names)
        rows = [tuple(r) for r in conn.exec_driver_sql(f"SELECT {select} FROM {quoted} ORDER BY rowid")]
    return columns, rows


def _integer_affinity(value: Any) -> Any:
    """What a column of INTEGER affinity stores (SQLite's rules): text spelling an integer becomes one."""
    return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value


def _expected(raw: str, pids: list[Any] = PIDS, *, affinity: bool = True) -> list[tuple[Any, ...]]:
    """Source rows as docs/design.md §4 makes them: pid normalised (text only) in its domain, name plain, secret dropped,
    score kept (in a new target's BIGINT column, with ``affinity``; else in a column of no type)."""
    pid = reference.token_pseudonyms(raw, [_normalised(p) for p in pids], domain="patients")
    name = reference.token_pseudonyms(raw, NAMES)
    kept = map(_integer_affinity, SCORES) if affinity else SCORES
    return [(i + 1, p, n, s) for i, (p, n, s) in enumerate(zip(pid, name, kept, strict=True))]


def _rows(engine: sa.Engine, table: str = "out") -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(f'SELECT id, pid, name, score FROM "{table}" ORDER BY id')]


@needs_native
def test_every_storage_class_gives_the_reference_and_the_generic_paths_target(
        tmp_path: Path, issuer: Issuer, stores: tuple[Store, Store], direct_runs: list[str], route: str) -> None:
    """Mixed storage classes in one column, NFC/NFD, normalisers and a domain, a megabyte of text, NULLs."""
    source = _source(tmp_path / "src.db")
    raw = issuer.issue("research-b", "pseudonymisation")
    summaries = [_run(source, store, raw, issuer, TableTarget("out", mode="replace"), direct=direct)
                 for store, direct in zip(stores, (True, False), strict=True)]
    assert len(direct_runs) == 1 and summaries[0].path == "sqlite" and summaries[1].path is None
    assert _rows(stores[0].engine) == _expected(raw)
    assert _dump(stores[0].engine) == _dump(stores[1].engine)  # declared types, values and storage classes
    assert summaries[0].as_dict()["path"] == "sqlite"
    assert summaries[0].counts == summaries[1].counts == {
        "rows_in": 15, "rows_out": 15, "nulls": 3, "values_pseudonymised": 27, "escrow_rows": 0}
    # the NFD and NFC spellings give one pseudonym, as do "P1" and "  p1 " under strip+lower
    pids = [r[1] for r in _rows(stores[0].engine)]
    assert pids[6] == pids[7] and pids[0] == pids[1] == pids[12]
    with stores[0].engine.connect() as conn:  # the source is detached again, and nothing else attached
        assert [r[1] for r in conn.exec_driver_sql("PRAGMA database_list")] in (["main"], ["main", "temp"])


@needs_native
@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("mode", ["append", "replace_partition", "upsert", "replace"])
def test_every_write_mode_into_a_new_or_existing_target_matches_the_generic_path(
        tmp_path: Path, issuer: Issuer, stores: tuple[Store, Store], direct_runs: list[str], mode: str,
        exists: bool) -> None:
    """Each mode twice (a backfill's re-run), into a target that exists with rows of its own or that the run makes."""
    source = _source(tmp_path / "src.db")
    raw = issuer.issue("research-b", "pseudonymisation")
    options: dict[str, Any] = {"replace_partition": {"partition_column": "id", "partition_start": 3, "partition_end": 9},
                               "upsert": {"upsert_key": ["id"]}}.get(mode, {})
    for store in stores:
        if exists:
            with store.engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE out (id INTEGER, pid TEXT, name TEXT, score)")
                if mode == "upsert":
                    conn.exec_driver_sql("CREATE UNIQUE INDEX out_id ON out (id)")
                conn.exec_driver_sql("INSERT INTO out VALUES (4, 'old', 'old', 0), (99, 'kept', 'kept', 1)")
    for _ in range(2):
        for store, direct in zip(stores, (True, False), strict=True):
            _run(source, store, raw, issuer, TableTarget("out", mode=mode, **options), direct=direct)
    assert len(direct_runs) == 2
    assert _dump(stores[0].engine) == _dump(stores[1].engine)
    got = sorted(_rows(stores[0].engine), key=repr)
    want = _expected(raw, affinity=not exists)
    before = [(4, "old", "old", 0), (99, "kept", "kept", 1)] if exists else []
    outside = [r for r in before + want if not 3 <= r[0] < 9]  # what replace_partition's second run leaves
    expected = {"append": before + want * 2, "replace": want, "upsert": [r for r in before if r[0] > 15] + want,
                "replace_partition": [r for r in outside if r[0] > 15 or r[1] != "old"] + want}[mode]
    assert got == sorted(expected, key=repr)


@needs_native
def test_source_and_target_in_one_file(tmp_path: Path, issuer: Issuer, direct_runs: list[str]) -> None:
    """The source table in the store's own file: read from ``main``, nothing attached, nothing waiting on a lock."""
    path = tmp_path / "one.db"
    source = _source(path)
    store = Store(sa.create_engine(f"sqlite:///{path}"))
    raw = issuer.issue("research-b", "pseudonymisation")
    transfer = _transfer(source, store, TableTarget("out", mode="replace"), ColumnPolicy.from_mapping(POLICY),
                         direct=True)
    assert transfer.sqlite_direct is not None and transfer.sqlite_direct.same_file
    run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), ColumnPolicy.from_mapping(POLICY), transfer)
    assert len(direct_runs) == 1 and '"main"."visits"' in direct_runs[0]
    assert _rows(store.engine) == _expected(raw)
    store.engine.dispose()


@needs_native
def test_an_empty_table_makes_an_empty_target(tmp_path: Path, issuer: Issuer, stores: tuple[Store, Store],
                                              direct_runs: list[str]) -> None:
    source = _source(tmp_path / "src.db", pids=[])  # zip(strict) below needs equal lengths: no rows at all
    raw = issuer.issue("research-b", "pseudonymisation")
    summaries = [_run(source, store, raw, issuer, TableTarget("out", mode="replace"), direct=direct)
                 for store, direct in zip(stores, (True, False), strict=True)]
    assert len(direct_runs) == 1
    assert summaries[0].counts["rows_out"] == summaries[1].counts["rows_out"] == 0
    assert _dump(stores[0].engine) == _dump(stores[1].engine) == (_dump(stores[1].engine)[0], [])


@needs_native
def test_identifiers_that_try_to_break_out_of_their_quotes_are_only_names(
        tmp_path: Path, issuer: Issuer, stores: tuple[Store, Store], direct_runs: list[str]) -> None:
    table, column = 'v"; DROP TABLE visits; --', 'a"; DROP TABLE x; --'
    source = _source(tmp_path / "src.db", table=table, pid=column)
    raw = issuer.issue("research-b", "pseudonymisation")
    policy = ColumnPolicy.pseudonymise(column, default="keep")
    for store, direct in zip(stores, (True, False), strict=True):
        _run(source, store, raw, issuer, TableTarget('o"ut; --', mode="replace"), direct=direct, policy=policy,
             table=table)
    assert len(direct_runs) == 1
    assert _dump(stores[0].engine, 'o"ut; --') == _dump(stores[1].engine, 'o"ut; --')
    with stores[0].engine.connect() as conn:
        got = [r[0] for r in conn.exec_driver_sql('SELECT "a""; DROP TABLE x; --" FROM "o""ut; --" ORDER BY id')]
    assert got == reference.token_pseudonyms(raw, PIDS)
    with sqlite3.connect(tmp_path / "src.db") as conn:  # the source is untouched
        assert conn.execute(f'SELECT count(*) FROM "{table.replace(chr(34), chr(34) * 2)}"').fetchone() == (15,)


@needs_native
def test_a_float_fails_the_run_naming_column_and_row_and_nothing_is_written(
        tmp_path: Path, issuer: Issuer, stores: tuple[Store, Store], direct_runs: list[str], route: str) -> None:
    """A REAL among the identifiers: the same error class as the generic path, the row read, never the value;
    the replace's deletion rolled back, the audit ``failed``."""
    source = _source(tmp_path / "src.db", pids=[*PIDS[:4], 1234.5678, *PIDS[5:]])
    raw = issuer.issue("research-b", "pseudonymisation")
    errors = []
    for store, direct in zip(stores, (True, False), strict=True):
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE out (id INTEGER, pid TEXT, name TEXT, score)")
            conn.exec_driver_sql("INSERT INTO out VALUES (1, 'old', 'old', 0)")
        with pytest.raises(UnsupportedTypeError) as raised:
            _run(source, store, raw, issuer, TableTarget("out", mode="replace"), direct=direct)
        errors.append(str(raised.value))
        assert _rows(store.engine) == [(1, "old", "old", 0)]
        audit = list(store.audit.iter_rows())
        assert [(r["event"], r["outcome"]) for r in audit][-1] == ("finished", "failed")
        assert "1234" not in repr(audit)
    assert len(direct_runs) == 1
    assert "column 'pid'" in errors[0] and "floating-point" in errors[0] and "row 5 " in errors[0]
    assert errors[0].startswith(errors[1]) and "1234" not in errors[0]


@needs_native
def test_a_collision_inside_the_statement_fails_the_run_and_rolls_back(
        tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch, direct_runs: list[str], route: str) -> None:
    """The collision check runs inside SQLite's calls (in blocks). No two real values share a 26-character
    pseudonym, so the real check is made to see one (a stand-in for a format far too short, as in
    test_collisions.py, whose own tests check the real error): the error raised inside SQLite's calls comes
    out of the run unchanged, mid-statement, nothing is written, the audit says ``failed``."""
    seen: list[int] = []

    class ShortFormatGuard(collisions.CollisionGuard):
        def add(self, column: str, macs: Any, pseudonyms: Any, count: int | None = None) -> None:
            super().add(column, macs, pseudonyms, count=count)
            seen.append(len(macs) // 32)
            if sum(seen) > 6:
                raise CollisionError(f"column {column!r}: two different values gave the same pseudonym in this run")

    monkeypatch.setattr(pseudonymiser, "CollisionGuard", ShortFormatGuard)
    monkeypatch.setattr(sqlite_direct, "FLUSH_EVERY", 2)
    source = _source(tmp_path / "src.db")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    with pytest.raises(CollisionError, match=r"'pid'|'name'"):
        _run(source, store, issuer.issue("research-b", "pseudonymisation"), issuer,
             TableTarget("out", mode="replace"), direct=True)
    assert len(direct_runs) == 1 and sum(seen) < 2 * len(PIDS)  # raised mid-statement, not at the end
    # no row: the table a run creates on SQLite outlives its rollback, on the generic path too (pysqlite
    # commits DDL that comes before the transaction's first write)
    assert not sa.inspect(store.engine).has_table("out") or _rows(store.engine) == []
    assert [r["outcome"] for r in store.audit.iter_rows()][-1] == "failed"
    store.engine.dispose()


@needs_native
def test_the_collision_check_sees_every_pseudonym(tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch,
                                                  direct_runs: list[str], route: str) -> None:
    seen: list[tuple[str, bytes]] = []

    class RecordingGuard(collisions.CollisionGuard):
        def add(self, column: str, macs: Any, pseudonyms: Any, count: int | None = None) -> None:
            seen.append((column, macs))
            super().add(column, macs, pseudonyms, count=count)

    monkeypatch.setattr(pseudonymiser, "CollisionGuard", RecordingGuard)
    monkeypatch.setattr(sqlite_direct, "FLUSH_EVERY", 4)
    source = _source(tmp_path / "src.db")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    raw = issuer.issue("research-b", "pseudonymisation")
    _run(source, store, raw, issuer, TableTarget("out", mode="replace"), direct=True)
    key = reference.b64url_decode(reference.claims(raw)["key"])
    macs = {c: b"".join(m for col, m in seen if col == c) for c in ("pid", "name")}
    assert macs["pid"] == b"".join(hmac.new(
        key, reference.LABEL + b"patients\x00" + reference.canonical(_normalised(p)), "sha256").digest()
        for p in PIDS if p is not None)
    assert len(macs["name"]) == 32 * sum(n is not None for n in NAMES)
    store.engine.dispose()


@needs_native
def test_a_randomised_project_gets_a_fresh_pseudonym_per_occurrence(tmp_path: Path, issuer: Issuer,
                                                                    direct_runs: list[str], route: str) -> None:
    issuer.create_project("random-i", method="irreversible", treatment="randomised")
    source = _source(tmp_path / "src.db")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    summary = _run(source, store, issuer.issue("random-i", "pseudonymisation"), issuer,
                   TableTarget("out", mode="replace"), direct=True)
    assert len(direct_runs) == 1 and summary.counts["values_pseudonymised"] == 27
    pids = [r[1] for r in _rows(store.engine)]
    present = [p for p in pids if p is not None]
    assert [p is None for p in pids] == [p is None for p in PIDS]
    assert len(set(present)) == len(present) and all(PseudonymFormat().matches(p) for p in present)
    store.engine.dispose()


@needs_native
def test_runs_the_direct_path_cannot_do_take_the_generic_path(tmp_path: Path, issuer: Issuer,
                                                              direct_runs: list[str]) -> None:
    """A reversible project (escrow), a target column that converts values on the way in, a query source:
    the generic path, with its own results (escrow written; the DATE column refusing text, as it always has)."""
    source = _source(tmp_path / "src.db")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    summary = _run(source, store, issuer.issue("research-a", "pseudonymisation"), issuer,
                   TableTarget("out", mode="replace"), direct=True)
    assert summary.counts["escrow_rows"] > 0 and direct_runs == []
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE dated (id INTEGER, pid TEXT, name TEXT, score DATE)")
    with pytest.raises(DatabaseIOError, match="does not convert"):
        _run(source, store, issuer.issue("research-b", "pseudonymisation"), issuer,
             TableTarget("dated", mode="replace"), direct=True)
    assert direct_runs == []
    assert _transfer(source, store, TableTarget("q"), ColumnPolicy.from_mapping(POLICY),
                     direct=False).sqlite_direct is None
    store.engine.dispose()


@needs_native
def test_a_dry_run_of_a_table_source_reads_its_sample_and_writes_nothing(tmp_path: Path, issuer: Issuer) -> None:
    source = _source(tmp_path / "src.db")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    policy = ColumnPolicy.from_mapping(POLICY)
    transfer = _transfer(source, store, TableTarget("out", mode="replace"), policy, direct=True)
    summary = run_dry_run(store, GivenToken(issuer.issue("research-b", "pseudonymisation"), issuer.public_keys()),
                          policy, transfer, sample=5)
    assert summary.dry_run is not None and summary.counts["rows_in"] == 5
    assert not sa.inspect(store.engine).has_table("out")
    store.engine.dispose()


def test_without_the_c_engine_the_generic_path_gives_the_same_target(tmp_path: Path, issuer: Issuer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    source = _source(tmp_path / "src.db")
    monkeypatch.setattr(native, "_ext", None)  # as PSEUDONYMISE_PURE_PYTHON=1 does
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    raw = issuer.issue("research-b", "pseudonymisation")
    transfer = _transfer(source, store, TableTarget("out", mode="replace"), ColumnPolicy.from_mapping(POLICY),
                         direct=True)
    assert transfer.sqlite_direct is None
    run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), ColumnPolicy.from_mapping(POLICY), transfer)
    assert _rows(store.engine) == _expected(raw)
    store.engine.dispose()


@needs_native
def test_the_functions_leave_the_pooled_connection(tmp_path: Path, issuer: Issuer, direct_runs: list[str], route: str) -> None:
    """The connection goes back to the pool: the functions (holding the key) are unregistered."""
    source = _source(tmp_path / "src.db")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}", poolclass=sa.pool.StaticPool))
    _run(source, store, issuer.issue("research-b", "pseudonymisation"), issuer, TableTarget("out", mode="replace"),
         direct=True)
    names = sorted({word.split("(")[0] for word in direct_runs[0].split() if word.startswith("pseudonymise_")})
    assert len(names) == 2
    with store.engine.connect() as conn:
        for name in names:
            # SQLite's own function is removed; sqlite3 (before Python 3.13) can only put None in its place
            with pytest.raises(sa.exc.OperationalError, match="no such function" if route == "sqlite"
                               else "user-defined function raised exception"):
                conn.exec_driver_sql(f"SELECT {name}('x')")
    store.engine.dispose()



@needs_native
def test_text_that_is_not_utf8_fails_naming_the_pseudonymised_columns(tmp_path: Path, issuer: Issuer,
                                                                       direct_runs: list[str], route: str) -> None:
    """sqlite3 cannot hand such text to a function (nor to fetchmany): the run fails, nothing is written. Kept
    columns are copied byte for byte by SQLite (the generic path cannot read such a row at all)."""
    source = _source(tmp_path / "src.db")
    with sqlite3.connect(tmp_path / "src.db") as conn:
        conn.execute("UPDATE visits SET pid = CAST(x'80ff41' AS TEXT) WHERE id = 3")
    store = Store(sa.create_engine(f"sqlite:///{tmp_path / 'store.db'}"))
    with store.engine.begin() as conn:  # an existing target: no first batch read before the statement
        conn.exec_driver_sql("CREATE TABLE out (id INTEGER, pid TEXT, name TEXT, score)")
        conn.exec_driver_sql("INSERT INTO out VALUES (1, 'old', 'old', 0)")
    # sqlite3's callback cannot even hand the value over (so the column is one of them); SQLite's own function
    # sees which column and row
    message = r"\('pid', 'name'\) holds text" if route == "callback" else r"column 'pid' holds text .*row 3 "
    with pytest.raises(InvalidTextError, match=message) as raised:
        _run(source, store, issuer.issue("research-b", "pseudonymisation"), issuer,
             TableTarget("out", mode="replace"), direct=True)
    assert "0x80" not in str(raised.value) and "not valid UTF-8" in str(raised.value)
    assert len(direct_runs) == 1 and _rows(store.engine) == [(1, "old", "old", 0)]
    store.engine.dispose()


def test_the_attached_source_is_read_only_and_detached_after(tmp_path: Path) -> None:
    """The run's statement reads the source through the target's connection: were the source attached
    writable, a statement on that connection could change the source. Attached, a write to it is refused by
    SQLite itself; after the block the schema is gone and the source unchanged."""
    source = _source(tmp_path / "source.db")
    target = sa.create_engine(f"sqlite:///{tmp_path / 'target.db'}")
    direct = sqlite_direct.SqliteDirect(sqlite_direct.database_file(source) or "", "visits", same_file=False)
    with target.connect() as conn, direct.attached(conn) as schema:
        assert schema is not None and schema.startswith("pseudonymise_source_")
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        assert dbapi.execute(f'SELECT count(*) FROM "{schema}"."visits"').fetchone() == (len(PIDS),)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            dbapi.execute(f'DELETE FROM "{schema}"."visits"')
    with target.connect() as conn:
        assert [row[1] for row in conn.exec_driver_sql("PRAGMA database_list")] == ["main"]
    assert _rows(source, "visits") == _rows(_source(tmp_path / "again.db"), "visits")
    source.dispose()
    target.dispose()
