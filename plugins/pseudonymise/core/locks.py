"""Write-range locks (docs/design.md §7): a writer of a target keeps out every other writer of an overlapping interval.

Backfills re-run intervals and mapped tasks write key ranges of one table at once; two writers may
run together only if their intervals cannot overlap. On PostgreSQL each lock is a row of a lock
table under an exclusion constraint; on other databases writers are serialised by their first write
and nothing is done here.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pseudonymise.core.db import advisory_lock

WRITE_LOCK_TABLE = "pseudonymise_write_lock"
_FULL = 1e308  # the span of a whole table, and the end of an open interval
_LOCK_TABLES: set[tuple[str, str | None]] = set()


def _coordinate(value: Any) -> tuple[float, bool] | None:
    """An order-preserving number for a partition bound, and whether it is exact (``None``: no such number).

    Dates count days, datetimes microseconds since the epoch (naive ones read as UTC), so adjacent
    intervals stay apart; integers beyond 2**53 round, and are then treated conservatively.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        number = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    elif isinstance(value, date):
        number = value.toordinal()
    elif isinstance(value, (int, Decimal, float)):
        number = value
    else:
        return None
    try:
        f = float(number)
    except (OverflowError, ValueError):
        return None
    if math.isnan(f):
        return None
    return f, isinstance(number, float) or Decimal(f) == Decimal(number)


def ensure_lock_table(engine: Engine, schema: str | None, look_on: Connection | None = None) -> str:
    """The lock table of ``schema`` (created in its own short transaction if missing); its quoted name.

    :param look_on: an open connection of ``engine`` to look for the table on first (a run's own transaction),
        so that no second connection is opened when the table exists."""
    prep = engine.dialect.identifier_preparer
    name = f"{prep.quote(schema)}.{prep.quote(WRITE_LOCK_TABLE)}" if schema else prep.quote(WRITE_LOCK_TABLE)
    key = (engine.url.render_as_string(hide_password=True), schema)
    if key in _LOCK_TABLES:
        return name
    if look_on is not None and look_on.execute(sa.text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
        _LOCK_TABLES.add(key)
        return name
    with engine.begin() as conn:
        if conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": name}).scalar() is None:
            advisory_lock(conn, f"pseudonymise-create:{name}")
            conn.execute(sa.text(
                f"CREATE TABLE IF NOT EXISTS {name} (holder text PRIMARY KEY, target text NOT NULL, span box NOT NULL, "
                "EXCLUDE USING gist (span WITH &&))"))
    _LOCK_TABLES.add(key)
    return name


#: Inserts of a lock row, when PostgreSQL ends a deadlock between two overlapping inserts by failing this one.
_LOCK_ATTEMPTS = 3


def lock_interval(conn: Connection, schema: str | None, target: str, start: Any = None, end: Any = None,
                  whole: bool = False) -> str | None:
    """Until the transaction ends, keep out every other writer of ``target`` whose interval overlaps
    ``[start, end)`` (``whole``: the whole table); return the lock's holder id for :func:`unlock_interval`.

    On PostgreSQL the interval is a row of the lock table, a box whose x is the target and whose y is
    the interval, under an exclusion constraint (``&&``): a writer whose box overlaps one that an open
    transaction holds waits until that transaction ends, which removes its row first. Intervals that
    do not overlap (mapped key ranges, days of a backfill) do not wait for each other. Bounds without
    an order-preserving number (text) lock the whole table. Other databases serialise writers by the
    first write (see :func:`advisory_lock`); nothing is done there.
    """
    if conn.dialect.name != "postgresql":
        return None
    table = ensure_lock_table(conn.engine, schema, look_on=conn)
    low = None if whole else _coordinate(start)
    high = (_FULL, True) if end is None else _coordinate(end)
    if low is None or high is None:
        y0, y1 = -_FULL, _FULL
    else:
        # half-open [start, end): an exact whole-number end moves in by half a unit (PostgreSQL compares
        # geometry with an absolute tolerance of 1e-6, so a smaller step would still touch the next
        # interval); any other end stays, and adjacent intervals then wait for each other, to be safe
        y0 = low[0]
        y1 = high[0] - 0.5 if high[1] and high[0].is_integer() and abs(high[0]) < 2**52 else high[0]
        y1 = max(y1, y0)
    x = float(int.from_bytes(hashlib.sha256(target.encode()).digest()[:4], "big") >> 1)
    holder = uuid.uuid4().hex
    insert = sa.text(f"INSERT INTO {table} (holder, target, span) VALUES (:h, :t, box(point(:x, :y0), point(:x, :y1)))")
    for attempt in range(_LOCK_ATTEMPTS):
        # Two writers inserting overlapping boxes at the same moment each find the other's row and wait for the
        # other: PostgreSQL ends that deadlock by failing one insert. In a savepoint, that insert alone is undone
        # (its row gone, so the other goes on) and is made again: it then waits for the other's transaction.
        savepoint = conn.begin_nested()
        try:
            conn.execute(insert, {"h": holder, "t": target[:500], "x": x, "y0": y0, "y1": y1})
        except sa.exc.OperationalError as exc:
            savepoint.rollback()
            if getattr(exc.orig, "pgcode", None) != "40P01" or attempt == _LOCK_ATTEMPTS - 1:
                raise
            continue
        savepoint.commit()
        return holder
    raise AssertionError("unreachable")


def unlock_interval(conn: Connection, schema: str | None, holder: str | None) -> None:
    """Drop the lock's row inside the transaction: writers waiting for it go on once the transaction ends."""
    if holder is None:
        return
    conn.execute(sa.text(f"DELETE FROM {ensure_lock_table(conn.engine, schema)} WHERE holder = :h"), {"h": holder})
