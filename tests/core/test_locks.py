"""The write modes' interval lock (locks.lock_interval) on PostgreSQL: overlapping intervals of one target
wait for each other, adjacent or disjoint ones and other targets do not."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core import locks
from pseudonymise.core.locks import _coordinate, ensure_lock_table, lock_interval, unlock_interval

from tests.conftest import wait_for_lock_wait

pytestmark = pytest.mark.postgres


def _waits(url: str, first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether a second transaction's lock waits for a first one's (still open)."""
    engine = sa.create_engine(url)
    with engine.connect() as a, engine.connect() as b:
        ta = a.begin()
        lock_interval(a, None, **first)
        tb = b.begin()
        b.execute(sa.text("SET LOCAL lock_timeout = '300ms'"))
        try:
            lock_interval(b, None, **second)
            waited = False
        except sa.exc.OperationalError as exc:
            assert "lock timeout" in str(exc)
            waited = True
        tb.rollback()
        ta.rollback()
    engine.dispose()
    return waited


DAY = dt.date(2026, 11, 4)
CASES = [
    ({"start": DAY, "end": DAY + dt.timedelta(1)}, {"start": DAY, "end": DAY + dt.timedelta(2)}, True),
    ({"start": DAY, "end": DAY + dt.timedelta(1)}, {"start": DAY + dt.timedelta(1), "end": DAY + dt.timedelta(2)}, False),
    ({"start": 1, "end": 5000}, {"start": 5000, "end": None}, False),
    ({"start": 1, "end": 5001}, {"start": 5000, "end": None}, True),
    ({"start": dt.datetime(2026, 11, 4, 12), "end": dt.datetime(2026, 11, 5)},
     {"start": dt.datetime(2026, 11, 5), "end": dt.datetime(2026, 11, 6)}, False),
    ({"start": dt.datetime(2026, 11, 4, 12), "end": dt.datetime(2026, 11, 5, 0, 0, 0, 1)},
     {"start": dt.datetime(2026, 11, 5), "end": dt.datetime(2026, 11, 6)}, True),
    ({"start": 2**60, "end": 2**60 + 1}, {"start": 2**60 + 1, "end": 2**60 + 2}, True),  # rounds: waits, to be safe
    ({"start": "a", "end": "m"}, {"start": "x", "end": "z"}, True),  # text bounds: the whole table
    ({"whole": True}, {"start": 1, "end": 2}, True),
]


@pytest.mark.parametrize(("first", "second", "waits"), CASES,
                         ids=["days-overlap", "days-adjacent", "ints-adjacent", "ints-overlap", "times-adjacent",
                              "times-overlap-1us", "huge-ints", "text", "whole-table"])
def test_which_intervals_wait(pg_url: str, first: dict[str, Any], second: dict[str, Any], waits: bool) -> None:
    assert _waits(pg_url, {"target": "table:dst", **first}, {"target": "table:dst", **second}) is waits


def test_other_targets_never_wait_and_a_released_lock_frees_at_commit(pg_url: str) -> None:
    assert not _waits(pg_url, {"target": "table:a", "whole": True}, {"target": "table:b", "whole": True})
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        with conn.begin():
            holder = lock_interval(conn, None, "table:c", whole=True)
            unlock_interval(conn, None, holder)
        with conn.begin():  # committed without its row: nothing is left behind
            assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_write_lock")).scalar() == 0
    engine.dispose()


def test_coordinates_keep_order_and_say_when_exact() -> None:
    assert _coordinate(DAY) == (DAY.toordinal(), True)
    assert _coordinate(Decimal("2.5")) == (2.5, True)
    assert _coordinate(2**60 + 1)[1] is False and _coordinate(2**53)[1] is True
    naive, aware = dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert _coordinate(naive) == _coordinate(aware)
    assert _coordinate("text") is None and _coordinate(True) is None and _coordinate(float("nan")) is None


def test_an_existing_lock_table_is_found_on_the_runs_own_connection(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's first lock looks for the table in the run's transaction: no second connection (a pool of one
    would wait for it), where the table exists; a missing one is still created in a short transaction of its own."""
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=2)
    monkeypatch.setattr(locks, "_LOCK_TABLES", set())
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS pseudonymise_write_lock"))
    ensure_lock_table(engine, None)  # created, committed
    monkeypatch.setattr(locks, "_LOCK_TABLES", set())  # a new worker process: nothing known yet
    with engine.begin() as conn:
        unlock_interval(conn, None, lock_interval(conn, None, "table:d", whole=True))
    engine.dispose()


def test_two_overlapping_inserts_that_deadlock_both_get_their_lock(pg_url: str) -> None:
    """A waits for nothing, B waits for A's row, then A inserts a row overlapping B's: each waits for the other.
    PostgreSQL fails one insert (40P01); lock_interval makes it again in its savepoint, so both writers end up
    holding their intervals, one after the other, and neither run fails."""
    import threading

    engine = sa.create_engine(pg_url, pool_size=3)
    ensure_lock_table(engine, None)
    first, second = engine.connect(), engine.connect()
    first.begin()
    second.begin()
    held = [lock_interval(first, None, "dst", 0, 100)]
    done: list[Any] = []
    waiter = threading.Thread(target=lambda: done.append(lock_interval(second, None, "dst", 0, 200)))
    waiter.start()
    wait_for_lock_wait(engine, timeout=4)  # B waits on A's transaction
    held.append(lock_interval(first, None, "dst", 150, 250))  # A now waits for B's row: a deadlock PostgreSQL breaks
    for holder in held:  # as a run does before its commit
        unlock_interval(first, None, holder)
    first.commit()
    waiter.join(30)
    assert not waiter.is_alive() and len(done) == 1 and done[0]
    second.commit()
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {locks.WRITE_LOCK_TABLE}")).scalar() == 1  # B's
    first.close()
    second.close()
    engine.dispose()
