"""Escrow written straight into the escrow table (docs/design.md §5) by a run that holds its project's escrow lock, on
PostgreSQL: blocks of the C engine go in with ``COPY`` as they come, what escrow already holds is left out, a run
that cannot have the lock stages and waits for it, and a writer that takes no lock cannot slip a duplicate in.

The expectations are read back from escrow with SQL and opened with a reverse token; digests are recomputed
with hashlib (``_stored_digest``), independently of the writer.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.copytext import CopyBlock
from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import EscrowError
from pseudonymise.core.escrow import EscrowTables, EscrowWriter, reveal
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser, _Escrowed
from pseudonymise.core.sealer import BatchSealer, EscrowBlock, EscrowBlocks
from pseudonymise.core.tokens import Token
from sqlalchemy.engine import Engine

from tests.conftest import wait_for_lock_wait
from tests.core.conftest import Mint
from tests.core.test_escrow import _stored_digest

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(not native.available(), reason="escrow blocks come from the C engine")]


def _engine(token: Token, limit: int | None = None) -> Pseudonymiser:
    """One run's engine (its set of sealed MACs is the run's); ``limit`` makes that set overflow early."""
    engine = Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))
    if limit is not None:
        engine._escrowed = _Escrowed(limit)
    return engine


def _blocks(engine: Pseudonymiser, values: list[str]) -> EscrowBlocks:
    """What escrow must seal of one batch of ``values`` through the C engine's COPY path."""
    batch = engine.pseudonymise_batch(CopyBlock("".join(f"{v}\n" for v in values).encode(), len(values)), ["id"])
    assert isinstance(batch.escrow, EscrowBlocks)
    return batch.escrow


def _pseudonyms(token: Token, values: list[str]) -> list[str]:
    out = Pseudonymiser(token, ColumnPolicy.pseudonymise("id")).pseudonymise_batch({"id": values}).columns["id"]
    return list(out)


@pytest.fixture
def store(pg_url: str) -> Any:
    engine = make_engine(pg_url)
    metadata = sa.MetaData()
    tables = EscrowTables.define(metadata)
    metadata.create_all(engine)
    yield engine, tables
    engine.dispose()


def _count(engine: Engine | sa.Connection, tables: EscrowTables, table: str = "values") -> int:
    def query(conn: sa.Connection) -> int:
        return conn.execute(sa.select(sa.func.count()).select_from(getattr(tables, table))).scalar_one()
    if isinstance(engine, sa.Connection):
        return query(engine)
    with engine.connect() as conn:
        return query(conn)


def _check_stored(engine: Engine, tables: EscrowTables, writer: EscrowWriter, mint: Mint, project: str,
                  expected: list[str], listed: dict[str, str] | None = None) -> None:
    """Each listed digest is that of the rows its batch stored, and escrow opens to exactly ``expected``."""
    with engine.connect() as conn:
        for batch_id, digest in writer.digests.items():
            assert digest == _stored_digest(conn, tables, batch_id)
        names = [r[0] for r in conn.execute(sa.select(tables.values.c.pseudonym)
                                            .where(tables.values.c.project == project))]
        assert len(names) == len(set(names))
        revealed = reveal(conn, tables, mint(project, "reverse"), names, lambda: {**(listed or {}), **writer.digests})
    assert sorted(revealed.values.values()) == sorted(expected)


def test_blocks_go_straight_into_escrow_in_the_run_transaction(store: Any, mint: Mint) -> None:
    """A first run of a project: a block is sealed on a thread while the block before is copied into the escrow
    table (seen inside the transaction before the flush, which copies the last), once per pseudonym, and
    nothing of it is visible to others until the commit."""
    engine, tables = store
    token = mint("research-a")
    run = _engine(token)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=1)
    with engine.begin() as conn:
        assert writer.write(conn, _blocks(run, ["a", "b", "a", "c"])) == 0  # being sealed
        assert writer.write(conn, _blocks(run, ["c", "d", "b"])) == 3  # the first copied; c and b listed before
        assert _count(conn, tables) == 3 and _count(engine, tables) == 0
        assert _count(conn, tables, "batches") == 1
        assert writer.flush(conn) == 1  # the last block: d
        assert _count(conn, tables, "batches") == 2
    assert len(writer.digests) == 2
    _check_stored(engine, tables, writer, mint, "research-a", ["a", "b", "c", "d"])
    with engine.connect() as conn:  # each batch's rows in pseudonym order: their counters follow the sorted names
        for batch_id in writer.digests:
            rows = conn.execute(sa.select(tables.values.c.pseudonym).where(tables.values.c.batch_id == batch_id)
                                .order_by(tables.values.c.nonce)).scalars().all()
            assert rows == sorted(rows, key=str.encode)


def test_rows_sealed_without_the_c_engine_go_in_alike(store: Any, mint: Mint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The binary rows sealed by ``cryptography`` (no C engine) are what PostgreSQL stores and reveal opens."""
    engine, tables = store
    token = mint("research-a")
    blocks = _blocks(_engine(token), ["a", "b", "c"])
    monkeypatch.setattr(native, "available", lambda: False)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=1)
    with engine.begin() as conn:
        assert writer.write(conn, blocks) == 0
        assert writer.flush(conn) == 3
    _check_stored(engine, tables, writer, mint, "research-a", ["a", "b", "c"])
    with engine.connect() as conn:  # the retention end PostgreSQL read from the binary rows is the token's
        assert conn.execute(sa.select(tables.values.c.retention_until).distinct()).scalars().all() \
            == [token.retention_until]


def test_sealing_runs_beside_the_copy_and_its_failure_reaches_the_run(store: Any, mint: Mint,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch is sealed on a thread of its own; a failure there is raised in the writer's thread (at the
    flush here) and nothing is committed."""
    engine, tables = store
    token = mint("research-a")
    seal = BatchSealer.binary_block_rows
    threads: list[str] = []

    def noting(sealer: BatchSealer, batch_id: str, block: EscrowBlock) -> bytes:
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            raise EscrowError("sealing failed (test)")
        return seal(sealer, batch_id, block)

    monkeypatch.setattr(BatchSealer, "binary_block_rows", noting)
    run = _engine(token)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=1)
    with pytest.raises(EscrowError, match=r"sealing failed \(test\)"), engine.begin() as conn:
        writer.write(conn, _blocks(run, ["a"]))
        writer.write(conn, _blocks(run, ["b"]))
        writer.flush(conn)
    assert threads == ["pseudonymise-escrow-seal"] * 2
    assert _count(engine, tables) == 0 and _count(engine, tables, "batches") == 0


def test_blocks_are_gathered_into_larger_sorted_batches_and_the_rest_copied_at_the_flush(store: Any, mint: Mint) -> None:
    engine, tables = store
    token = mint("research-a")
    run = _engine(token)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=5)
    with engine.begin() as conn:
        assert writer.write(conn, _blocks(run, ["a", "b", "c"])) == 0  # gathered
        assert writer.write(conn, _blocks(run, ["d", "e", "a"])) == 0  # 5 values: one batch, being sealed
        assert writer.write(conn, _blocks(run, ["f"])) == 0  # gathered
        assert _count(conn, tables) == 0
        assert writer.flush(conn) == 6
        assert writer.flush(conn) == 0
    assert len(writer.digests) == 2 and _count(engine, tables, "batches") == 2
    _check_stored(engine, tables, writer, mint, "research-a", ["a", "b", "c", "d", "e", "f"])


def test_what_escrow_holds_is_left_out_and_a_batch_that_adds_nothing_leaves_no_row(store: Any, mint: Mint) -> None:
    engine, tables = store
    token = mint("research-a")
    earlier = EscrowWriter(token, tables, defer=True, direct_rows=1)
    with engine.begin() as conn:
        earlier.write(conn, _blocks(_engine(token), ["e", "f"]))
        earlier.flush(conn)
    run = _engine(token)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=1)
    with engine.begin() as conn:
        assert writer.write(conn, _blocks(run, ["e", "g", "f", "h"])) == 0  # g and h being sealed
        assert writer.write(conn, _blocks(run, ["e", "f"])) == 0  # listed before: nothing to seal
        assert writer.flush(conn) == 2
    assert len(writer.digests) == 1
    assert _count(engine, tables) == 4 and _count(engine, tables, "batches") == 2
    _check_stored(engine, tables, writer, mint, "research-a", ["e", "f", "g", "h"], earlier.digests)


def test_the_look_up_reads_names_any_prefix_may_give(store: Any, mint: Mint) -> None:
    """The pseudonyms go to PostgreSQL as one text array: quotes, backslashes, commas, braces, spaces and
    non-ASCII in them (a project's prefix may hold any) are looked up as they are."""
    engine, tables = store
    token = mint("research-a")
    odd = ['a"b', "c\\d", "e,f", "{g}", "h i", "NULL", "é-ж"]
    names = [n.ljust(6, "x").encode() for n in odd]
    width = max(map(len, names))
    names = [n.ljust(width, b"x") for n in names]
    block = EscrowBlock(b"".join(names), width, b"v" * len(names), np.arange(len(names) + 1, dtype=np.uint64))
    held = [n.decode() for n in names[::2]]
    with engine.begin() as conn:
        conn.execute(tables.values.insert(), [{"project": token.project, "pseudonym": p, "batch_id": "b",
                                               "nonce": bytes(12), "ciphertext": b"c",
                                               "retention_until": token.retention_until} for p in held])
        other = mint("research-b")  # another project's rows are not this one's
        conn.execute(tables.values.insert(), [{"project": other.project, "pseudonym": names[1].decode(), "batch_id": "b",
                                               "nonce": bytes(12), "ciphertext": b"c",
                                               "retention_until": token.retention_until}])
        found = EscrowWriter(token, tables, defer=True)._held(conn, block)
    assert found.tolist() == [i % 2 == 0 for i in range(len(names))]


def test_a_run_whose_set_of_sealed_values_overflowed_looks_its_blocks_up(store: Any, mint: Mint) -> None:
    """Past the engine's exact set, a block may repeat a value of an earlier block (the table that takes over
    forgets): the engine's blocks say so from then on, and the writer leaves what the run itself stored out
    instead of failing on the key."""
    engine, tables = store
    token = mint("research-a")
    run = _engine(token, limit=4)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=1)
    values, more = [f"v{i}" for i in range(12)], ["w0", "w1", "v3"]
    with engine.begin() as conn:
        [first], [second] = _blocks(run, values), _blocks(run, more)
        assert (first.repeats, second.repeats) == (False, True)  # the first overflowed the set of 4
        assert writer.write(conn, EscrowBlocks([first])) == 0  # being sealed
        # a block that may repeat is looked up, after what was sealed is copied (12); 2 of its 3 are new
        assert writer.write(conn, EscrowBlocks([second])) == 12
        first.repeats = True  # as the forgetting table would list a value again
        assert writer.write(conn, EscrowBlocks([first])) == 2  # the 2 copied before the look-up; none new
        assert writer.flush(conn) == 0
    _check_stored(engine, tables, writer, mint, "research-a", values + more[:2])


def test_a_second_run_of_the_project_stages_and_waits_for_the_first(store: Any, mint: Mint) -> None:
    """The run holding the project's escrow lock writes straight in; another run of the project meanwhile
    stages its rows (it streams on), waits for the lock at its flush, and then stores only what the first did
    not."""
    engine, tables = store
    token = mint("research-a")
    first, second = EscrowWriter(token, tables, defer=True, direct_rows=1), EscrowWriter(token, tables, defer=True, direct_rows=1)
    outcome: dict[str, Any] = {}
    staged = threading.Event()

    def other_run() -> None:
        try:
            with engine.begin() as conn:
                outcome["written"] = second.write(conn, _blocks(_engine(token), ["b", "c", "x"]))
                staged.set()
                outcome["flushed"] = second.flush(conn)
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = repr(exc)
            staged.set()

    with engine.connect() as conn:
        with conn.begin():
            assert first.write(conn, _blocks(_engine(token), ["a", "b", "c"])) == 0  # being sealed
            thread = threading.Thread(target=other_run)
            thread.start()
            assert staged.wait(30) and outcome == {"written": 0}, outcome  # staged: not written yet
            wait_for_lock_wait(engine)  # its flush waits for the first run's lock
            assert thread.is_alive()
            assert first.flush(conn) == 3
        thread.join(60)
    assert outcome == {"written": 0, "flushed": 1}, outcome
    assert _count(engine, tables) == 4
    _check_stored(engine, tables, second, mint, "research-a", ["a", "b", "c", "x"], first.digests)


def test_a_writer_without_the_lock_cannot_slip_a_duplicate_in(store: Any, mint: Mint) -> None:
    """A writer that takes no lock (a version before the lock, a hand-written insert) commits a pseudonym after
    the run found the project empty: the run's COPY meets the key and fails with an error that names the cause
    and the fix, never the pseudonym, and commits nothing."""
    engine, tables = store
    token = mint("research-a")
    run = _engine(token)
    writer = EscrowWriter(token, tables, defer=True, direct_rows=1)
    [late] = _pseudonyms(token, ["late"])
    with pytest.raises(EscrowError, match=r"held the project's escrow lock.*nothing of this run was committed") \
            as info, engine.begin() as conn:
        writer.write(conn, _blocks(run, ["a"]))
        with engine.begin() as other:
            other.execute(tables.values.insert(), {"project": token.project, "pseudonym": late,
                                                   "batch_id": str(uuid.uuid4()), "nonce": bytes(12),
                                                   "ciphertext": b"other", "retention_until": token.retention_until})
        writer.write(conn, _blocks(run, ["b", "late"]))
        writer.flush(conn)  # the block holding it is copied last
    assert late not in str(info.value) and "late" not in str(info.value)
    assert _count(engine, tables) == 1 and _count(engine, tables, "batches") == 0


def test_randomised_runs_write_straight_in_without_waiting_for_each_other(store: Any, mint: Mint) -> None:
    """A randomised project's pseudonyms are new with every value: two open runs both write straight in, one row
    per value, neither waiting for the other."""
    engine, tables = store
    token = mint("random-r")
    writers = [EscrowWriter(token, tables, defer=True, direct_rows=1) for _ in range(2)]
    with engine.connect() as one, engine.connect() as two, one.begin(), two.begin():
        assert writers[0].write(one, _blocks(_engine(token), ["a", "a", "b"])) == 0
        assert writers[1].write(two, _blocks(_engine(token), ["a", "c"])) == 0
        assert [writer.flush(conn) for writer, conn in zip(writers, (one, two), strict=True)] == [3, 2]
    with engine.connect() as conn:
        for writer in writers:
            for batch_id, digest in writer.digests.items():
                assert digest == _stored_digest(conn, tables, batch_id)
        names = conn.execute(sa.select(tables.values.c.pseudonym)).scalars().all()
        revealed = reveal(conn, tables, mint("random-r", "reverse"), names,
                          lambda: {**writers[0].digests, **writers[1].digests})
    assert sorted(revealed.values.values()) == ["a", "a", "a", "b", "c"]


def test_blocks_in_pseudonym_order(mint: Mint) -> None:
    """The order the writer inserts in: by pseudonym bytes, the first occurrence of each when distinct."""
    token = mint("research-a")
    [block] = _blocks(_engine(token), ["c", "a", "b", "a", "c"])
    names = block.names().tolist()
    distinct = block.in_pseudonym_order(distinct=True)
    assert distinct.names().tolist() == sorted(set(names))
    every = block.in_pseudonym_order(distinct=False)
    assert every.names().tolist() == sorted(names) and every.repeats == block.repeats
    # each name keeps its own value: sealed and revealed above; here the canonical bytes follow their name
    pairs = dict(zip(names, (block.canonicals[int(a):int(b)] for a, b in zip(block.ends[:-1], block.ends[1:],
                                                                                   strict=True)), strict=False))
    moved = {n: distinct.canonicals[int(a):int(b)]
             for n, a, b in zip(distinct.names().tolist(), distinct.ends[:-1], distinct.ends[1:], strict=True)}
    assert moved == pairs and np.all(np.diff(distinct.ends.astype(np.int64)) > 0)
