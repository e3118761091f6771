"""Two runs at once whose ``replace_partition`` intervals overlap without being equal.

A run over [4th, 6th) (a REST-triggered run with an explicit data interval, say) while a backfill run
replaces [4th, 5th): both replace the 4th. Found by this test when the write mode's lock was keyed on
the exact bounds: the two writers did not wait for each other, each DELETEd without seeing the
other's uncommitted rows, and the 4th ended up twice. The lock is now an interval
(``db.lock_interval``): the second writer waits for the first to commit, then replaces its rows.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, TableTarget
from pseudonymise.core.use import GivenToken, RunContext

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
GATE_KEY = 0x50530002  # held by the test: every writer stops after its rows, transaction open


def _replace(url: str, token: str, jwks: dict[str, Any], start: str, end: str, queue: Any) -> None:
    """One task in its own process: replace the days [start, end) of ``dst`` with those of ``src``."""
    from pseudonymise.core.tokens import TrustedKeys

    try:
        engine = sa.create_engine(url)
        source = PostgresCopySource(engine, "SELECT id, patient_id, day FROM src WHERE day >= :s AND day < :e",
                                    {"s": start, "e": end})
        target = TableTarget("dst", mode="replace_partition", partition_column="day", partition_start=start,
                             partition_end=end)
        policy = ColumnPolicy.pseudonymise("patient_id", default="keep")
        sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, pseudonymised=["patient_id"],
                                                          type_names=source.type_names), copy_text=True)
        run_pseudonymisation(Store(engine), GivenToken(token, TrustedKeys.from_jwks(jwks)), policy,
                             plan_transfer(source, sink, policy), RunContext(task_id=f"replace_{start}_{end}"))
        queue.put("ok")
    except BaseException as exc:
        queue.put(repr(exc))


def test_partially_overlapping_intervals_leave_one_copy(pg_url: str, issuer: Issuer) -> None:
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE src (id bigint PRIMARY KEY, patient_id text, day date)"))
        conn.execute(sa.text("INSERT INTO src SELECT g, 'P' || g, DATE '2026-11-04' + g % 2 FROM generate_series(1, 200) g"))
        conn.execute(sa.text("CREATE TABLE dst (id bigint, patient_id text, day date)"))
        conn.execute(sa.text(
            "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({GATE_KEY}); RETURN NULL; END $$"))
        conn.execute(sa.text("CREATE TRIGGER gate AFTER INSERT ON dst FOR EACH STATEMENT EXECUTE FUNCTION gate()"))
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": GATE_KEY})
        token = issuer.issue("research-a", "pseudonymisation")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_replace, args=(pg_url, token, issuer.public_keys().to_jwks(), s, e, queue))
                 for s, e in (("2026-11-04", "2026-11-05"), ("2026-11-04", "2026-11-06"))]
        for p in procs:
            p.start()
        # both writers are in: at the gate, or waiting for the other (a lock, a row)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE NOT l.granted AND a.datname = current_database()")).scalar()
            if waiting == 2:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the two writers never both waited at the gate: the overlap was not exercised")
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": GATE_KEY})
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        assert results == ["ok", "ok"], results
        per_day = dict(conn.execute(sa.text("SELECT day::text, count(*) FROM dst GROUP BY 1")).all())
    engine.dispose()
    assert per_day == {"2026-11-04": 100, "2026-11-05": 100}
