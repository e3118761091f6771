"""Escrow in a PostgreSQL database whose default collation is linguistic (ICU ``en-US``), as most production
databases are (the test cluster's own is ``C``).

The escrow key (project, pseudonym) compares bytes (``COLLATE "C"``) in the tables the plugin makes now, so its
index costs no collation call per comparison; tables made by earlier versions keep the database's collation. Both
must work in every escrow path: the direct and staged writes, the look-ups, concurrent runs, reversal and the
purge. The tests of escrow written straight in, and the concurrency tests, run again here on such a database
(imported below, with ``pg_url`` overridden).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from pseudonymise.core.escrow import EscrowTables
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_purge

from scripts.services import PostgresServer
from tests.conftest import fresh_database
from tests.core.test_escrow_concurrency import (  # noqa: F401  (collected again, on this module's database)
    test_two_runs_sharing_values_in_opposite_orders_both_finish,
)
from tests.core.test_escrow_direct import (  # noqa: F401
    store,  # the escrow tables, on this module's database
    test_a_run_whose_set_of_sealed_values_overflowed_looks_its_blocks_up,
    test_a_second_run_of_the_project_stages_and_waits_for_the_first,
    test_a_writer_without_the_lock_cannot_slip_a_duplicate_in,
    test_blocks_go_straight_into_escrow_in_the_run_transaction,
    test_the_look_up_reads_names_any_prefix_may_give,
    test_what_escrow_holds_is_left_out_and_a_batch_that_adds_nothing_leaves_no_row,
)
from tests.core.test_pipeline import Collect, Rows, _pseudonymise, _reverse

pytestmark = pytest.mark.postgres

PIDS = ["P1", "p1", "Ärzte", "aerzte", "B-7", "b7", "P1"]  # equal under no linguistic rule, ordered apart by one


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database whose default collation is ICU's en-US (overrides the shared fixture for this module)."""
    yield from fresh_database(postgres, "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")


def _collations(engine: sa.Engine, table: str) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT a.attname, c.collname FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation "
            "WHERE a.attrelid = CAST(:t AS regclass) AND a.attname IN ('project', 'pseudonym')"), {"t": table})
        return {name: coll for name, coll in rows}


def _linguistic(engine: sa.Engine) -> bool:
    """Whether the database orders text linguistically: 'a' before 'B' (in bytes 'B' comes first)."""
    with engine.connect() as conn:
        return bool(conn.execute(sa.text("SELECT 'a' < 'B'")).scalar_one())


def _run_everything(pipeline: Store, issuer: Issuer) -> None:
    """Two reversible runs of one project (the second finds the first's rows), reversal of every value and the
    purge: each compares the escrow key."""
    raw = issuer.issue("research-a", "pseudonymisation")
    out, again = Collect(), Collect()
    _pseudonymise(pipeline, raw, issuer, Rows({"id": list(range(len(PIDS))), "pid": PIDS}), lambda columns, conn: out)
    more = [*PIDS, "new-1", "NEW-1"]
    _pseudonymise(pipeline, raw, issuer, Rows({"id": list(range(len(more))), "pid": more}), lambda columns, conn: again)
    assert again.rows["pid"][: len(PIDS)] == out.rows["pid"]
    with pipeline.engine.connect() as conn:
        held = conn.execute(sa.text("SELECT count(*) FROM pseudonymise_escrow")).scalar_one()
    assert held == len(set(more))  # one row per distinct value: none stored twice, none lost to a collation
    revealed = Collect()
    _reverse(pipeline, issuer.issue("research-a", "reverse"), issuer, Rows({"pid": again.rows["pid"]}),
             lambda columns, conn: revealed)
    assert revealed.rows["pid"] == more
    end = issuer.project("research-a").retention_until
    assert run_purge(pipeline, project="research-a", now=end + timedelta(seconds=1)).counts == {"escrow_rows": held}


def test_new_escrow_keys_compare_bytes_in_a_linguistic_database(pg_url: str, issuer: Issuer) -> None:
    pipeline = Store(sa.create_engine(pg_url))
    try:
        pipeline.create()
        assert _linguistic(pipeline.engine)
        assert _collations(pipeline.engine, "pseudonymise_escrow") == {"project": "C", "pseudonym": "C"}
        _run_everything(pipeline, issuer)
    finally:
        pipeline.engine.dispose()


def test_an_escrow_table_made_before_keeps_the_database_collation_and_still_works(pg_url: str,
                                                                                   issuer: Issuer) -> None:
    """A table made by an earlier version (its key in the database's collation) is left as it is, and every path
    still works on it; the look-ups still use its key's index."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:  # the v1.1 table as earlier versions made it: no COLLATE on the key
        ddl = str(sa.schema.CreateTable(EscrowTables.define(sa.MetaData()).values).compile(dialect=engine.dialect))
        conn.exec_driver_sql(ddl.replace(' COLLATE "C"', ""))
    pipeline = Store(engine)
    try:
        pipeline.create()
        assert _collations(engine, "pseudonymise_escrow") == {"project": "default", "pseudonym": "default"}
        _run_everything(pipeline, issuer)
        with engine.connect() as conn:  # the staged flush's test of what escrow holds goes by the key's index
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("CREATE TEMP TABLE s (pseudonym text)")
            plan = "\n".join(r[0] for r in conn.exec_driver_sql(
                "EXPLAIN SELECT * FROM s WHERE NOT EXISTS (SELECT FROM pseudonymise_escrow e "
                "WHERE e.project = 'research-a' AND e.pseudonym = s.pseudonym)"))
        assert "pseudonymise_escrow_pkey" in plan
    finally:
        engine.dispose()


def test_the_key_index_serves_the_look_ups_whatever_their_text_collation(pg_url: str) -> None:
    """The look-ups compare the key with the run's text (staging table, array of names) in the database's
    collation; the key's own collation wins, so its index is used."""
    engine = sa.create_engine(pg_url)
    try:
        Store(engine).create()
        with engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.exec_driver_sql("CREATE TEMP TABLE s (pseudonym text)")
            plans = ["\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + query)) for query in (
                "SELECT * FROM s WHERE NOT EXISTS (SELECT FROM pseudonymise_escrow e "
                "WHERE e.project = 'research-a' AND e.pseudonym = s.pseudonym)",
                "SELECT u.i FROM unnest(CAST('{a,b}' AS text[])) WITH ORDINALITY AS u(p, i) WHERE EXISTS "
                "(SELECT FROM pseudonymise_escrow e WHERE e.project = 'research-a' AND e.pseudonym = u.p)")]
        assert all("pseudonymise_escrow_pkey" in plan for plan in plans), plans
    finally:
        engine.dispose()
