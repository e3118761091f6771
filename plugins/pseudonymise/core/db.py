"""SQL plumbing shared by escrow, audit and targets: UTC timestamps, the database clock, advisory locks, inserts
that skip existing keys, engines.

Everything goes through SQLAlchemy Core so the same code runs on SQLite (the embedded default)
and PostgreSQL; the few dialect differences (advisory locks, ``ON CONFLICT``) live here.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the database stores (SQLite has no time zones)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where an aware UTC instant is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def database_now(conn: Connection) -> datetime:
    """The database server's clock (docs/design.md §6: audit time comes from the database, not the worker)."""
    name = conn.dialect.name
    if name == "postgresql":
        value = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    elif name == "sqlite":
        value = conn.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    else:
        value = conn.execute(sa.select(sa.func.current_timestamp())).scalar_one()
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def advisory_lock(conn: Connection, name: str) -> None:
    """Serialise writers of ``name`` until the transaction ends (PostgreSQL advisory lock).

    Other databases are serialised by the caller's first write (a row update), which takes the
    database's own write lock on SQLite and a row lock elsewhere.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(name)})


def _lock_key(name: str) -> int:
    """The advisory lock key of ``name`` (PostgreSQL's locks are keyed by a 64-bit integer)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def try_advisory_lock(conn: Connection, name: str) -> bool:
    """:func:`advisory_lock` without waiting: whether the transaction now holds it (other databases: always)."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _lock_key(name)}).scalar_one())


@contextlib.contextmanager
def joined(conn: Connection) -> Iterator[Connection]:
    """``conn`` as ``engine.begin()`` gives one, for statements that join its caller's transaction: nothing is
    committed or rolled back on leaving (the caller does that)."""
    yield conn


@contextlib.contextmanager
def sqlite_write_transaction(engine: Engine) -> Iterator[Connection]:
    """One SQLite transaction that holds the database's write lock from its start (``BEGIN IMMEDIATE``, waiting
    for another writer as the engine's timeout says), committed on leaving, rolled back on an error.

    Python's sqlite3 opens a transaction only before INSERT, UPDATE or DELETE: schema statements otherwise
    run one transaction each, each synced to disk on its own commit (a new audit database: twenty of them).
    Here they are all one, so a set of tables is created whole or not at all."""
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn
        conn.commit()


def insert_ignoring_duplicates(table: sa.Table, index_elements: list[str]) -> Any:
    """An INSERT that skips rows whose key already exists, as the dialect spells it, returning the key."""
    return _InsertIgnore(table, index_elements)


class _InsertIgnore:
    def __init__(self, table: sa.Table, index_elements: list[str]) -> None:
        self.table = table
        self.index_elements = index_elements

    def execute(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        name = conn.dialect.name
        if name in ("postgresql", "sqlite"):
            if name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            stmt = insert(self.table).on_conflict_do_nothing(index_elements=self.index_elements)
            stmt = stmt.returning(self.table.c[self.index_elements[-1]])
            return len(conn.execute(stmt, rows).all())
        # Generic path: look the keys up, insert the missing ones (the caller holds the lock).
        keycols = [self.table.c[k] for k in self.index_elements]
        wanted = {tuple(r[k] for k in self.index_elements) for r in rows}
        existing: set[tuple[Any, ...]] = set()
        for chunk in _chunks(sorted(wanted), 500):
            cond = sa.or_(*[sa.and_(*[c == v for c, v in zip(keycols, key, strict=True)]) for key in chunk])
            existing.update(tuple(r) for r in conn.execute(sa.select(*keycols).where(cond)))
        fresh = [r for r in rows if tuple(r[k] for k in self.index_elements) not in existing]
        if fresh:
            conn.execute(self.table.insert(), fresh)
        return len(fresh)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the options this plugin relies on (SQLite waits for locks instead of failing)."""
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 60})
    return sa.create_engine(url, **kwargs)
