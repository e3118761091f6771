"""Escrow storage (docs/design.md §5) on SQLite and PostgreSQL: round trips, integrity, refusals and purge (sealing
itself: test_sealer.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import (
    EscrowIntegrityError,
    IssuerError,
    RetentionEndedError,
    TokenExpiredError,
    TokenKindError,
    TokenProjectError,
)
from pseudonymise.core.escrow import EscrowReader, EscrowTables, EscrowWriter, batch_digest, purge, reveal
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Batch, Pseudonymiser
from pseudonymise.core.sealer import EscrowItems
from pseudonymise.core.tokens import Token, verify_token
from sqlalchemy.engine import Engine

from tests.conftest import wait_for_lock_wait
from tests.core.conftest import Mint


@pytest.fixture
def db(db_url: str) -> Iterator[tuple[Engine, EscrowTables]]:
    engine = make_engine(db_url)
    metadata = sa.MetaData()
    tables = EscrowTables.define(metadata)
    metadata.create_all(engine)
    yield engine, tables
    engine.dispose()


def pseudonymise(token: Token, columns: dict[str, list[Any]]) -> tuple[Pseudonymiser, Batch]:
    engine = Pseudonymiser(token, ColumnPolicy.pseudonymise(*columns))
    return engine, engine.pseudonymise_batch(columns)


#: The batch digests the writes of a test's escrow tables produced, as a successful use's audit row lists
#: them (these tests have no audit table; tests/core/test_escrow_authenticity.py runs with the real one).
LISTED: dict[int, dict[str, str]] = {}


def write(db: tuple[Engine, EscrowTables], token: Token, batch: Batch) -> int:
    engine, tables = db
    writer = EscrowWriter(token, tables)
    with engine.begin() as conn:
        written = writer.write(conn, batch.escrow)
    LISTED.setdefault(id(tables), {}).update(writer.digests)
    return written


def open_escrow(db: tuple[Engine, EscrowTables], token: Token, pseudonyms: list[str],
                now: dt.datetime | None = None) -> Any:
    engine, tables = db
    with engine.connect() as conn:
        return reveal(conn, tables, token, pseudonyms, lambda: LISTED.get(id(tables), {}), now=now)


def count(db: tuple[Engine, EscrowTables], table: str = "values", **where: Any) -> int:
    engine, tables = db
    t = getattr(tables, table)
    query = sa.select(sa.func.count()).select_from(t)
    for name, value in where.items():
        query = query.where(t.c[name] == value)
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


VALUES: dict[str, list[Any]] = {
    "text": ["Zoë Ünïcödé", "日本語の名前", "P100000", "", "emoji 🙂 and\nnewline"],
    "number": [-42, 0, 10**25, -(10**25), 7],
    "flag": [True, False, True, False, True],
    "day": [dt.date(1942, 1, 31), dt.date(2026, 11, 1), dt.date(1, 1, 1), dt.date(9999, 12, 31), dt.date(2000, 2, 29)],
    "instant": [
        dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        dt.datetime(2026, 3, 1, 11, 30, 15, 123456, tzinfo=dt.UTC),
        dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.timezone(-dt.timedelta(hours=5, minutes=30))),
        dt.datetime(2026, 3, 1, 12, 30),
        dt.datetime(2026, 7, 4, tzinfo=dt.UTC),
    ],
    "uid": [uuid.UUID(int=0), uuid.UUID("A8098C1A-F86E-11DA-BD1A-00112444BE1E"), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()],
    "raw": [b"\x00\xff", b"binary\x00value", bytes(range(256)), b"\x80", b"x" * 5000],
}


def test_reverse_round_trip_of_every_type(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    _engine, batch = pseudonymise(token, VALUES)
    distinct = {p for column in batch.columns.values() for p in column}
    assert write(db, token, batch) == len(distinct) == 32  # 7 columns of 5, but flag has two distinct values
    revealed = open_escrow(db, mint("research-a", "reverse"), sorted(distinct))
    assert revealed.not_found == []
    for column, originals in VALUES.items():
        for pseudonym, original in zip(batch.columns[column], originals, strict=True):
            back = revealed.values[pseudonym]
            assert back == original and type(back) is type(original), column
            if isinstance(original, dt.datetime):
                assert back.utcoffset() == original.utcoffset()


def test_escrow_holds_no_plaintext(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["P100000SECRET", "P200000SECRET"]})
    write(db, token, batch)
    engine, tables = db
    with engine.connect() as conn:
        rows = conn.execute(sa.select(tables.values)).mappings().all()
        sealed = conn.execute(sa.select(tables.batches.c.sealed_dek)).scalars().all()
    assert len(rows) == 2 and len(sealed) == 1
    for row in rows:
        assert b"SECRET" not in bytes(row["ciphertext"])
        assert len(bytes(row["nonce"])) == 12
    assert len({bytes(r["nonce"]) for r in rows}) == 2  # counter nonces are unique within the batch
    assert {r["pseudonym"] for r in rows} == set(batch.columns["id"])
    assert all(r["project"] == "research-a" for r in rows)


def test_deterministic_keeps_one_row_per_pseudonym(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    engine = Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))
    first = engine.pseudonymise_batch({"id": ["a", "b", "a", "a"]})
    assert len(first.escrow) == 4
    assert write(db, token, first) == 2
    second = engine.pseudonymise_batch({"id": ["a", "c", "b"]})
    assert write(db, token, second) == 1  # only "c" is new
    # another run (another writer, another token of the project) adds nothing known
    third = Pseudonymiser(mint("research-a"), ColumnPolicy.pseudonymise("id")).pseudonymise_batch({"id": ["c", "a"]})
    assert write(db, token, third) == 0
    assert count(db) == 3
    revealed = open_escrow(db, mint("research-a", "reverse"), [*first.columns["id"], *second.columns["id"]])  # type: ignore[list-item]
    assert sorted(revealed.values.values()) == ["a", "b", "c"]


def test_randomised_keeps_one_row_per_occurrence(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("random-r")
    engine = Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))
    first = engine.pseudonymise_batch({"id": ["X"] * 5 + ["Y", None, "Y"]})
    assert write(db, token, first) == 7
    second = engine.pseudonymise_batch({"id": ["X"]})
    assert write(db, token, second) == 1
    assert count(db, project="random-r") == 8
    pseudonyms = [p for p in first.columns["id"] + second.columns["id"] if p is not None]
    revealed = open_escrow(db, mint("random-r", "reverse"), pseudonyms)
    assert [revealed.values[p] for p in pseudonyms] == ["X"] * 5 + ["Y", "Y", "X"]


def test_ciphertext_moved_to_another_pseudonym_fails(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["alice", "bob"]})
    write(db, token, batch)
    alice, bob = batch.columns["id"]
    engine, tables = db
    v = tables.values
    with engine.begin() as conn:
        bobs = conn.execute(sa.select(v.c.ciphertext, v.c.nonce, v.c.batch_id).where(v.c.pseudonym == bob)).one()
        conn.execute(sa.update(v).where(v.c.pseudonym == alice).values(
            ciphertext=bobs.ciphertext, nonce=bobs.nonce, batch_id=bobs.batch_id))
    reverse = mint("research-a", "reverse")
    # the batch no longer matches the digest its audited use listed: none of its rows is shown
    for wanted in ([alice], [bob]):
        with pytest.raises(EscrowIntegrityError) as info:
            open_escrow(db, reverse, wanted)  # type: ignore[arg-type]
        assert "bob" not in str(info.value) and "alice" not in str(info.value)
        assert "differ from the digest" in str(info.value)
    # Even someone who could also rewrite the audit's digest gains nothing: the moved ciphertext is bound
    # to bob's pseudonym by its associated data.
    with engine.connect() as conn:
        rows = conn.execute(sa.select(v.c.batch_id, v.c.pseudonym, v.c.nonce, v.c.ciphertext).order_by(v.c.nonce)).all()
    LISTED[id(tables)][bobs.batch_id] = batch_digest(
        (r.pseudonym, r.nonce, r.ciphertext) for r in rows if r.batch_id == bobs.batch_id)
    with pytest.raises(EscrowIntegrityError) as info:
        open_escrow(db, reverse, [alice])  # type: ignore[list-item]
    assert "fails authentication" in str(info.value)
    assert open_escrow(db, reverse, [bob]).values == {bob: "bob"}  # type: ignore[list-item]


def test_altered_ciphertext_fails(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["alice"]})
    write(db, token, batch)
    engine, tables = db
    v = tables.values
    with engine.begin() as conn:
        ciphertext = bytearray(conn.execute(sa.select(v.c.ciphertext)).scalar_one())
        ciphertext[0] ^= 0x80
        conn.execute(sa.update(v).values(ciphertext=bytes(ciphertext)))
    with pytest.raises(EscrowIntegrityError):
        open_escrow(db, mint("research-a", "reverse"), batch.columns["id"])  # type: ignore[arg-type]


def test_reveal_refused_after_retention(db: tuple[Engine, EscrowTables], issuer: Issuer, mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["alice", "bob"]})
    write(db, token, batch)
    raw = issuer.issue("research-a", "reverse")
    reverse = verify_token(raw, issuer.public_keys(), kind="reverse", project="research-a")
    end = reverse.retention_until
    with pytest.raises(RetentionEndedError):
        verify_token(raw, issuer.public_keys(), kind="reverse", project="research-a", now=end.timestamp() + 1)
    assert open_escrow(db, reverse, batch.columns["id"], now=end - timedelta(seconds=1)).not_found == []  # type: ignore[arg-type]
    # the database's clock past the end: refused before any row is read
    for now in (end, end + timedelta(seconds=1)):
        with pytest.raises(RetentionEndedError):
            open_escrow(db, reverse, batch.columns["id"], now=now)  # type: ignore[arg-type]


def test_reveal_refused_after_token_expiry(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "reverse", expires_in=timedelta(hours=1))
    token = verify_token(raw, issuer.public_keys(), kind="reverse")
    with pytest.raises(TokenExpiredError):
        verify_token(raw, issuer.public_keys(), kind="reverse", now=token.expires_at + 60)


def test_irreversible_project_has_no_escrow(db: tuple[Engine, EscrowTables], issuer: Issuer, mint: Mint) -> None:
    with pytest.raises(IssuerError):
        issuer.issue("research-b", "reverse")
    token = mint("research-b")
    assert token.escrow_public_key is None
    with pytest.raises(TokenKindError):
        EscrowWriter(token, db[1])
    _e, batch = pseudonymise(token, {"id": ["alice"]})
    assert batch.escrow == []  # nothing to seal is even collected


def test_another_projects_reverse_token(db: tuple[Engine, EscrowTables], issuer: Issuer, mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["alice", "bob"]})
    write(db, token, batch)
    other_raw = issuer.issue("random-r", "reverse")
    with pytest.raises(TokenProjectError):
        verify_token(other_raw, issuer.public_keys(), kind="reverse", project="research-a")
    other = verify_token(other_raw, issuer.public_keys(), kind="reverse")
    # without a project to check, the other project's token finds nothing of research-a ...
    found = open_escrow(db, other, batch.columns["id"])  # type: ignore[arg-type]
    assert found.values == {} and found.not_found == batch.columns["id"]
    # ... and rows relabelled to its project do not open: they are sealed to research-a's escrow key
    engine, tables = db
    with engine.begin() as conn:
        conn.execute(sa.update(tables.values).values(project="random-r"))
    with pytest.raises(EscrowIntegrityError):
        open_escrow(db, other, batch.columns["id"])  # type: ignore[arg-type]


def test_pseudonymisation_token_cannot_reveal(db: tuple[Engine, EscrowTables], issuer: Issuer, mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["alice"]})
    write(db, token, batch)
    with pytest.raises(TokenKindError):
        open_escrow(db, token, batch.columns["id"])  # type: ignore[arg-type]
    with pytest.raises(TokenKindError):
        verify_token(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys(), kind="reverse")
    with pytest.raises(TokenKindError):
        EscrowWriter(mint("research-a", "reverse"), db[1])


def test_reveal_reports_unknown_and_ignores_nulls(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    _e, batch = pseudonymise(token, {"id": ["alice"]})
    write(db, token, batch)
    alice = batch.columns["id"][0]
    revealed = open_escrow(db, mint("research-a", "reverse"), [alice, None, "unknown", alice])  # type: ignore[list-item]
    assert revealed.values == {alice: "alice"}
    assert revealed.not_found == ["unknown"]


def test_reveal_in_chunks(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("research-a")
    originals = [f"P{i:05d}" for i in range(1_234)]
    _e, batch = pseudonymise(token, {"id": originals})
    assert write(db, token, batch) == 1_234
    revealed = open_escrow(db, mint("research-a", "reverse"), batch.columns["id"])  # type: ignore[arg-type]
    assert [revealed.values[p] for p in batch.columns["id"]] == originals  # type: ignore[index]


def test_purge_deletes_rows_past_retention_only(db: tuple[Engine, EscrowTables], issuer: Issuer, mint: Mint) -> None:
    issuer.create_project("short", method="reversible", retention=timedelta(days=1))
    short, long = mint("short"), mint("research-a")
    _e, short_batch = pseudonymise(short, {"id": ["s1", "s2", "s3"]})
    _e, long_batch = pseudonymise(long, {"id": ["l1", "l2"]})
    write(db, short, short_batch)
    write(db, long, long_batch)
    engine, tables = db
    later = short.retention_until + timedelta(seconds=1)
    assert later < long.retention_until
    with engine.begin() as conn:
        assert purge(conn, tables, now=short.retention_until - timedelta(seconds=1)) == 0
        assert purge(conn, tables, project="research-a", now=later) == 0
        assert purge(conn, tables, now=later) == 3
    assert count(db, project="short") == 0
    assert count(db, "batches", project="short") == 0
    assert count(db, project="research-a") == 2
    assert count(db, "batches", project="research-a") == 1
    revealed = open_escrow(db, mint("research-a", "reverse"), long_batch.columns["id"])  # type: ignore[arg-type]
    assert sorted(revealed.values.values()) == ["l1", "l2"]
    # the severed link stays severed: the same pseudonyms are not found any more
    with engine.begin() as conn:
        assert purge(conn, tables, now=later) == 0


def _write_v1(db: tuple[Engine, EscrowTables], token: Token, pseudonym: str, value: str) -> None:
    """An escrow row as the releases before v1.1 wrote it: v1 associated data, no domain, key version,
    associated-data version or listed digest."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from pseudonymise.core.sealer import associated_data, seal_key

    engine, tables = db
    dek, batch_id, nonce = AESGCM.generate_key(bit_length=256), str(uuid.uuid4()), bytes(12)
    with engine.begin() as conn:
        conn.execute(tables.batches.insert(), {
            "batch_id": batch_id, "project": token.project, "sealed_dek": seal_key(dek, token.escrow_public_key),  # type: ignore[arg-type]
            "created_at": dt.datetime.now(dt.UTC), "retention_until": token.retention_until})
        conn.execute(tables.values.insert(), {
            "project": token.project, "pseudonym": pseudonym, "batch_id": batch_id, "nonce": nonce,
            "ciphertext": AESGCM(dek).encrypt(nonce, b"str\x00" + value.encode(), associated_data(token.project, pseudonym)),
            "retention_until": token.retention_until})


def test_v1_rows_of_deterministic_projects_are_proven_by_recomputing(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    """Escrow written before v1.1 keeps working where it can be proven: the opened value must give the
    pseudonym again with the reverse token's verify_keys (the domain, which v1 did not record, is given by
    the caller for columns that have one)."""
    token = mint("research-a")
    plain = Pseudonymiser(token, ColumnPolicy.pseudonymise("id")).pseudonymise_batch({"id": ["V1-A"]}).columns["id"][0]
    domained = Pseudonymiser(token, ColumnPolicy.from_mapping({"id": {"action": "pseudonymise", "domain": "visits"}})
                             ).pseudonymise_batch({"id": ["V1-B"]}).columns["id"][0]
    _write_v1(db, token, plain, "V1-A")  # type: ignore[arg-type]
    _write_v1(db, token, domained, "V1-B")  # type: ignore[arg-type]
    _write_v1(db, token, "forgedforgedforgedforged00", "V1-A")
    reverse = mint("research-a", "reverse")
    assert reverse.verify_keys
    assert open_escrow(db, reverse, [plain]).values == {plain: "V1-A"}  # type: ignore[list-item,dict-item]
    engine, tables = db
    with engine.connect() as conn:
        hinted = EscrowReader(conn, tables, reverse, dict).reveal([domained], domain_hint="visits")  # type: ignore[list-item]
    assert hinted.values == {domained: "V1-B"}
    with pytest.raises(EscrowIntegrityError, match="give this pseudonym again"):
        open_escrow(db, reverse, [domained])  # type: ignore[list-item]
    with pytest.raises(EscrowIntegrityError, match="give this pseudonym again"):
        open_escrow(db, reverse, ["forgedforgedforgedforged00"])


def test_v1_rows_of_randomised_projects_cannot_be_proven(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    token = mint("random-r")
    _write_v1(db, token, "r" * 26, "V1-R")
    with pytest.raises(EscrowIntegrityError, match=r"before escrow v1\.1"):
        open_escrow(db, mint("random-r", "reverse"), ["r" * 26])


def test_v1_batch_table_gains_its_new_columns(db_url: str, mint: Mint) -> None:
    """A batch table made before v1.1 is upgraded in place; its old rows read as v1."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE pseudonymise_escrow_batch (batch_id VARCHAR(36) PRIMARY KEY, "
                             "project VARCHAR(200) NOT NULL, sealed_dek BYTEA NOT NULL, created_at TIMESTAMP "
                             "WITH TIME ZONE NOT NULL, retention_until TIMESTAMP WITH TIME ZONE NOT NULL)"
                             .replace("BYTEA", "BLOB" if engine.dialect.name == "sqlite" else "BYTEA")))
    from pseudonymise.core.pipeline import Store

    Store(engine).create()
    columns = {c["name"] for c in sa.inspect(engine).get_columns("pseudonymise_escrow_batch")}
    assert {"domain", "key_version", "ad_version"} <= columns
    engine.dispose()


# --- PostgreSQL: the deferred flush ----------------------------------------------------------------
def _items(token: Token, values: list[str]) -> Any:
    """What escrow must seal for ``values``, from an engine of its own (so nothing is skipped as already sealed)."""
    return Pseudonymiser(token, ColumnPolicy.pseudonymise("id")).pseudonymise_batch({"id": values}).escrow


def _stored_digest(conn: sa.Connection, tables: EscrowTables, batch_id: str) -> str:
    """The digest of the rows escrow now holds for a batch, as docs/design-notes.md defines it (hashlib alone)."""
    v = tables.values
    outer = hashlib.sha256(b"pseudonymise/v1/escrow-batch\x00")
    for name, nonce, sealed in conn.execute(sa.select(v.c.pseudonym, v.c.nonce, v.c.ciphertext)
                                            .where(v.c.batch_id == batch_id).order_by(v.c.nonce)):
        p, c = name.encode("utf-8"), bytes(sealed)
        outer.update(hashlib.sha256(struct.pack(">I", len(p)) + p + bytes(nonce) + struct.pack(">I", len(c)) + c).digest())
    return outer.hexdigest()


@pytest.mark.postgres
def test_deferred_flush_stores_each_pseudonym_once_and_lists_what_each_batch_stored(pg_url: str, mint: Mint) -> None:
    """Staged rows whose pseudonym escrow already holds, or that another staged row repeats, are dropped before the
    insert; each batch's listed digest is that of the rows it stored, and a batch that stored nothing leaves
    neither a digest nor a batch row."""
    engine = make_engine(pg_url)
    metadata = sa.MetaData()
    tables = EscrowTables.define(metadata)
    metadata.create_all(engine)
    token = mint("research-a")
    earlier = EscrowWriter(token, tables)
    with engine.begin() as conn:
        assert earlier.write(conn, _items(token, ["e"])) == 1
    writer = EscrowWriter(token, tables, defer=True)
    with engine.begin() as conn:
        for values in (["a", "b", "c"], ["b", "d"], ["e", "f"], ["e"]):
            assert writer.write(conn, _items(token, values)) == 0  # staged only
        assert writer.flush(conn) == 5  # a b c d f
        assert writer.flush(conn) == 0
    assert len(writer.digests) == 3
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.batches)).scalar_one() == 1 + 3
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.values)).scalar_one() == 6
        for batch_id, digest in writer.digests.items():
            assert digest == _stored_digest(conn, tables, batch_id)
        names = [r[0] for r in conn.execute(sa.select(tables.values.c.pseudonym))]
        listed = {**earlier.digests, **writer.digests}
        revealed = reveal(conn, tables, mint("research-a", "reverse"), names, lambda: listed)
    assert sorted(revealed.values.values()) == ["a", "b", "c", "d", "e", "f"]
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("repeat", [False, True], ids=["distinct", "repeated"])
def test_first_flush_of_a_project_lists_what_each_batch_stored(pg_url: str, mint: Mint, repeat: bool) -> None:
    """A project escrow holds nothing of yet, every staged row distinct or two of one pseudonym in different
    batches (which one is kept is PostgreSQL's choice): either way each listed digest is that of the rows its
    batch stored, and a batch row is written for each batch that stored a row."""
    engine = make_engine(pg_url)
    metadata = sa.MetaData()
    tables = EscrowTables.define(metadata)
    metadata.create_all(engine)
    token = mint("research-a")
    staged = (["a", "b", "c"], ["d", "a"] if repeat else ["d"], ["e"])
    writer = EscrowWriter(token, tables, defer=True)
    with engine.begin() as conn:
        for values in staged:
            writer.write(conn, _items(token, values))
        assert writer.flush(conn) == 5
    with engine.connect() as conn:
        stored = {r.batch_id: r.n for r in conn.execute(sa.select(tables.values.c.batch_id, sa.func.count().label("n"))
                                                        .group_by(tables.values.c.batch_id))}
        assert sum(stored.values()) == 5 and set(writer.digests) == set(stored)
        for batch_id, digest in writer.digests.items():
            assert digest == _stored_digest(conn, tables, batch_id)
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.batches)).scalar_one() == len(stored)
        names = [r[0] for r in conn.execute(sa.select(tables.values.c.pseudonym))]
        revealed = reveal(conn, tables, mint("research-a", "reverse"), names, lambda: writer.digests)
    assert sorted(revealed.values.values()) == ["a", "b", "c", "d", "e"]
    engine.dispose()


@pytest.mark.postgres
def test_flush_starts_again_when_a_writer_without_the_lock_commits_a_key_first(pg_url: str, mint: Mint) -> None:
    """A writer that does not take the escrow lock (an older version of the plugin) inserts a pseudonym the run
    staged and commits while the run's insert waits for it: the run drops that row and inserts the rest."""
    engine = make_engine(pg_url)
    metadata = sa.MetaData()
    tables = EscrowTables.define(metadata)
    metadata.create_all(engine)
    token = mint("research-a")
    x_items = _items(token, ["x"])
    assert isinstance(x_items, EscrowItems)
    outcome: dict[str, Any] = {}
    writer = EscrowWriter(token, tables, defer=True)

    def run() -> None:
        try:
            with engine.begin() as conn:
                writer.write(conn, _items(token, ["x", "y"]))
                outcome["written"] = writer.flush(conn)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = repr(exc)

    with engine.connect() as other:
        other.begin()  # a plain INSERT, uncommitted, without the run's lock
        other.execute(tables.values.insert(), {"project": token.project, "pseudonym": x_items.pseudonyms[0],
                                               "batch_id": str(uuid.uuid4()), "nonce": bytes(12), "ciphertext": b"other",
                                               "retention_until": token.retention_until})
        thread = threading.Thread(target=run)
        thread.start()
        wait_for_lock_wait(engine)  # the run's insert waits for the other writer's key
        assert thread.is_alive(), outcome
        other.commit()
    thread.join(60)
    assert outcome == {"written": 1}
    [(batch_id, digest)] = writer.digests.items()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.values)).scalar_one() == 2
        assert [r[0] for r in conn.execute(sa.select(tables.values.c.pseudonym).where(tables.values.c.batch_id == batch_id))] \
            == list(_items(token, ["y"]).pseudonyms)
        assert digest == _stored_digest(conn, tables, batch_id)
    engine.dispose()


def test_a_batch_that_stores_nothing_leaves_no_batch_row(db: tuple[Engine, EscrowTables], mint: Mint) -> None:
    """Every value already had escrow: the batch's sealed key would seal nothing kept, so it is not written
    (and the batch is not listed)."""
    token = mint("research-a")
    assert write(db, token, pseudonymise(token, {"id": ["a", "b"]})[1]) == 2
    writer = EscrowWriter(token, db[1])
    with db[0].begin() as conn:
        assert writer.write(conn, _items(token, ["b", "a"])) == 0
    assert writer.digests == {}
    assert count(db, "batches") == 1
