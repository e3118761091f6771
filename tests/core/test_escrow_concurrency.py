"""Two reversible runs sharing values at once, batches in opposite orders: neither may deadlock.

Escrow keeps one row per (project, pseudonym) under a unique key, so a run inserting a pseudonym
another open run inserted waits for that run. Had each run inserted batch by batch without a lock,
run A (values 0-999, then 1000-1999) and run B (1000-1999, then 0-999) would each wait for the other:
PostgreSQL would abort one with "deadlock detected". A run's escrow goes in under a transaction lock on
the project's escrow: the run that takes it first (at its first escrow write, without waiting) copies its
rows straight in as it goes; the other stages its rows and inserts them at its end, once the first has
committed, storing only what the first did not. Both paths run here: values as columns (the staging path
alone) and COPY blocks through the C engine (the first run straight in, the second staged).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.copytext import CopyBlock
from pseudonymise.core.escrow import EscrowWriter
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, TableTarget
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


class _MeetingCopySource(PostgresCopySource):
    """A COPY source (the C engine's block path) that meets the other run after its first block."""

    def __init__(self, engine: sa.Engine, table: str, barrier: threading.Barrier) -> None:
        super().__init__(engine, f"SELECT pid FROM {table} ORDER BY n", batch_size=1000)
        self._barrier = barrier

    def copy_blocks(self) -> Iterator[CopyBlock]:
        rows = b"".join(block.data for block in super().copy_blocks()).splitlines(keepends=True)
        yield CopyBlock(b"".join(rows[:1000]), 1000)
        self._barrier.wait(timeout=60)
        time.sleep(1.0)  # both runs' first blocks are now written
        yield CopyBlock(b"".join(rows[1000:]), len(rows) - 1000)


@pytest.mark.parametrize("path", ["columns", "copy-blocks"])
def test_two_runs_sharing_values_in_opposite_orders_both_finish(pg_url: str, issuer: Issuer, path: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Both runs finish; the first to commit stores every value, the second none."""
    if path == "copy-blocks" and not native.available():
        pytest.skip("the block path is the C engine's")
    modes: list[str | None] = []
    flush = EscrowWriter.flush

    def noting_flush(writer: EscrowWriter, conn: Any) -> int:
        modes.append(writer._mode)  # how the run wrote: straight in, staged (None: columns, always staged)
        return flush(writer, conn)

    monkeypatch.setattr(EscrowWriter, "flush", noting_flush)
    engine = sa.create_engine(pg_url, pool_size=10)
    Store(engine).create()
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}
    with engine.begin() as conn:
        for name, order in (("a", FIRST + SECOND), ("b", SECOND + FIRST)):
            conn.execute(sa.text(f"CREATE TABLE src_{name} (n int, pid text)"))
            conn.execute(sa.text(f"INSERT INTO src_{name} VALUES (:n, :pid)"),
                         [{"n": n, "pid": pid} for n, pid in enumerate(order)])

    def run(name: str, order: list[list[str]]) -> None:
        target = TableTarget(f"dst_{name}", mode="replace")
        try:
            policy = ColumnPolicy.pseudonymise("pid")
            source: Any = _MeetingSource(order, barrier) if path == "columns" else \
                _MeetingCopySource(engine, f"src_{name}", barrier)
            sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, use_copy=path == "copy-blocks",
                                                              pseudonymised=["pid"]), copy_text=path == "copy-blocks")
            summary = run_pseudonymisation(
                Store(engine), GivenToken(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()),
                policy, plan_transfer(source, sink, policy))
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
    assert sorted(modes, key=str) == ([None, None] if path == "columns" else ["direct", "staged"])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*), count(DISTINCT pseudonym) FROM pseudonymise_escrow")).one() \
            == (2000, 2000)
        assert conn.execute(sa.text("SELECT count(*) FROM dst_a")).scalar_one() == 2000
        assert conn.execute(sa.text("SELECT count(*) FROM dst_b")).scalar_one() == 2000
