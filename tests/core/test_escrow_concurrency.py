"""Two reversible runs sharing values at once, batches in opposite orders: neither may deadlock.

Escrow keeps one row per (project, pseudonym) under a unique key, so a run inserting a pseudonym
another open run inserted waits for that run. Had each run inserted batch by batch without a lock,
run A (values 0-999, then 1000-1999) and run B (1000-1999, then 0-999) would each wait for the other:
PostgreSQL would abort one with "deadlock detected". Deferred escrow moves a run's rows in one insert
at its end, under a transaction lock on the project's escrow, so the runs finish one after the other
and the second stores only what the first did not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken

pytestmark = pytest.mark.postgres
FIRST = [f"P{i}" for i in range(1000)]
SECOND = [f"P{i}" for i in range(1000, 2000)]


class _MeetingSource:
    """Yields its first batch, waits until the other run has written its own first batch, then the second."""

    def __init__(self, batches: list[list[str]], barrier: threading.Barrier) -> None:
        self.columns = ["pid"]
        self._batches, self._barrier = batches, barrier

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        yield {"pid": list(self._batches[0])}
        self._barrier.wait(timeout=60)
        time.sleep(1.0)  # both runs' first batches are now written (the writer thread is not waited for)
        yield {"pid": list(self._batches[1])}


def test_two_runs_sharing_values_in_opposite_orders_both_finish(pg_url: str, issuer: Issuer) -> None:
    """Both runs finish; the first to commit stores every value, the second none."""
    engine = sa.create_engine(pg_url, pool_size=10)
    Store(engine).create()
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def run(name: str, order: list[list[str]]) -> None:
        target = TableTarget(f"dst_{name}", mode="replace")
        try:
            policy = ColumnPolicy.pseudonymise("pid")
            summary = run_pseudonymisation(
                Store(engine), GivenToken(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()),
                policy, plan_transfer(_MeetingSource(order, barrier),
                                      SinkFactory(lambda cols, conn: target.sink(conn, cols)), policy))
            outcome[name] = summary.counts["escrow_rows"]
        except Exception as exc:  # reported below, with the other run's outcome
            outcome[name] = repr(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("a", [FIRST, SECOND])),
               threading.Thread(target=run, args=("b", [SECOND, FIRST]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a run hung"
    assert all(isinstance(v, int) for v in outcome.values()), outcome
    assert sorted(outcome.values()) == [0, 2000], outcome  # the first to commit writes them all
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*), count(DISTINCT pseudonym) FROM pseudonymise_escrow")).one() \
            == (2000, 2000)
        assert conn.execute(sa.text("SELECT count(*) FROM dst_a")).scalar_one() == 2000
        assert conn.execute(sa.text("SELECT count(*) FROM dst_b")).scalar_one() == 2000
