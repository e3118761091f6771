"""Concurrent runs on one PostgreSQL target and audit table: 8 range tasks at once, and two
overlapping runs of the same interval. No deadlock, no lost or duplicated row, a valid chain."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, TableTarget
from pseudonymise.core.use import GivenToken, RunContext

pytestmark = [pytest.mark.slow]


def _task(url: str, token: str, jwks: dict[str, Any], lo: int, hi: int, mode: str, queue: Any) -> None:
    """One task, in its own process like a worker: COPY out a key range, pseudonymise, COPY in, audit."""
    from pseudonymise.core.tokens import TrustedKeys

    try:
        engine = sa.create_engine(url)
        store = Store(engine)
        source = PostgresCopySource(engine, "SELECT id, patient_id, day FROM src WHERE id >= :lo AND id < :hi",
                                    {"lo": lo, "hi": hi}, batch_size=500)
        if mode == "range":
            target = TableTarget("dst", mode="replace_partition", partition_column="id", partition_start=lo,
                                 partition_end=hi)
        else:
            target = TableTarget("dst", mode="replace_partition", partition_column="day",
                                 partition_start="2026-11-04", partition_end="2026-11-05")
        policy = ColumnPolicy.pseudonymise("patient_id", default="keep")
        sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, pseudonymised=["patient_id"],
                                                          type_names=source.type_names), copy_text=True)
        summary = run_pseudonymisation(store, GivenToken(token, TrustedKeys.from_jwks(jwks)), policy,
                                       plan_transfer(source, sink, policy),
                                       RunContext(task_id=f"range_{lo}", map_index=lo // 1000))
        queue.put(("ok", summary.counts["rows_out"]))
    except BaseException as exc:
        queue.put(("error", repr(exc)))


def _source(url: str, rows: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id bigint PRIMARY KEY, patient_id text, day date)"))
        conn.execute(sa.text("INSERT INTO src SELECT g, 'P' || g, DATE '2026-11-04' FROM generate_series(0, :n - 1) g"),
                     {"n": rows})
    engine.dispose()


def _run_all(url: str, issuer: Issuer, ranges: list[tuple[int, int]], mode: str) -> list[tuple[str, Any]]:
    token = issuer.issue("research-a", "pseudonymisation")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_task, args=(url, token, issuer.public_keys().to_jwks(), lo, hi, mode, queue))
             for lo, hi in ranges]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    return results


@pytest.mark.postgres
def test_eight_concurrent_range_tasks(pg_url: str, issuer: Issuer) -> None:
    _source(pg_url, 8000)
    results = _run_all(pg_url, issuer, [(i * 1000, (i + 1) * 1000) for i in range(8)], "range")
    assert results == [("ok", 1000)] * 8, results
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*), count(DISTINCT id) FROM dst")).one() == (8000, 8000)
    audit = AuditLog(engine)
    assert audit.verify().ok
    rows = list(audit.iter_rows())
    assert len(rows) == 16 and sorted(r["outcome"] for r in rows) == ["started"] * 8 + ["success"] * 8


@pytest.mark.postgres
def test_two_overlapping_runs_of_one_interval_leave_one_copy(pg_url: str, issuer: Issuer) -> None:
    _source(pg_url, 3000)
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:  # an existing target, so only the partition lock can keep the runs apart
        conn.execute(sa.text("CREATE TABLE dst (id bigint, patient_id text, day date)"))
    results = _run_all(pg_url, issuer, [(0, 3000), (0, 3000)], "interval")
    assert results == [("ok", 3000)] * 2, results
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*), count(DISTINCT id) FROM dst")).one() == (3000, 3000)
    assert AuditLog(engine).verify().ok


def _use_once(url: str, token: str, jwks: dict[str, Any], barrier: Any, queue: Any) -> None:
    """One process using a single-use reverse token, released at the same moment as the other."""
    from pseudonymise.core.errors import TokenUsedUpError
    from pseudonymise.core.tokens import TrustedKeys
    from pseudonymise.core.use import TokenUse

    try:
        audit = AuditLog(sa.create_engine(url))
        audit.create()
        barrier.wait(timeout=60)
        with TokenUse(audit, "reverse", GivenToken(token, TrustedKeys.from_jwks(jwks)), kind="reverse"):
            time.sleep(0.5)  # both uses overlap: the second admission happens while the first is running
        queue.put("success")
    except TokenUsedUpError:
        queue.put("denied")
    except BaseException as exc:
        queue.put(f"error {exc!r}")


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_two_concurrent_uses_of_a_single_use_token(db_url: str, issuer: Issuer) -> None:
    """docs/design.md §3 (v1.1): uses are counted under the audit lock, so two processes using a single-use token at
    the same instant get one success and one denial, never two successes."""
    token = issuer.issue("research-a", "reverse", max_uses=1)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    AuditLog(sa.create_engine(db_url)).create()  # the tables exist before the race
    procs = [ctx.Process(target=_use_once, args=(db_url, token, issuer.public_keys().to_jwks(), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert results == ["denied", "success"], results
    audit = AuditLog(sa.create_engine(db_url))
    assert audit.verify().ok
    finished = [r["outcome"] for r in audit.iter_rows() if r["event"] == "finished"]
    assert sorted(finished) == ["denied", "success"]
