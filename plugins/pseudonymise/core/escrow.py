"""Escrow storage for reversible projects (docs/design.md §5, §5.1): the tables, writing sealed batches, revealing
what can be proven, purging.

Values are sealed by ``sealer.py``; this module stores them and reads them back. On PostgreSQL a
batch's rows are written with ``COPY`` into a temporary staging table, from which one ``INSERT …
SELECT`` moves them into the escrow table (deterministic projects keep the first row of each
pseudonym) and returns what the batch digests are computed over.

The escrow table is writable by the pipeline, so a row proves nothing by itself (§5.1). Each batch
therefore has a digest over the rows it stored (:func:`batch_digest`), which the ``success`` audit
row of the use that wrote it lists; :class:`EscrowReader` reveals a row only when its batch is
listed by a chain that verifies with the same digest, and, for deterministic projects, when the
opened value recomputes the pseudonym with the reverse token's ``verify_keys``.

Rows written before v1.1 (batches without ``ad_version``) carry the v1 associated data
(``project NUL pseudonym``) and no listed digest: they are revealed only in deterministic projects,
where recomputing the pseudonym proves them; randomised v1 rows cannot be proven and are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pseudonymise.core.canonical import TYPE_TAGS, from_canonical
from pseudonymise.core.db import (
    UTCDateTime,
    advisory_lock,
    database_now,
    insert_ignoring_duplicates,
    try_advisory_lock,
)
from pseudonymise.core.errors import EscrowError, EscrowRefusedError, RetentionEndedError, TokenKindError
from pseudonymise.core.instants import utc_seconds
from pseudonymise.core.mac import pseudonym_mac
from pseudonymise.core.sealer import (
    AD_VERSION,
    BINARY_COPY_HEADER,
    BINARY_COPY_TRAILER,
    ROW_COLUMNS,
    BatchOpener,
    BatchSealer,
    EscrowBlock,
    EscrowBlocks,
    EscrowItem,
    EscrowItems,
    associated_data,
    row_hash,
)
from pseudonymise.core.tokens import Token

_REVEAL_CHUNK = 500
_DIGEST_LABEL = b"pseudonymise/v1/escrow-batch\x00"
#: Batch columns added in v1.1 (NULL in batches written before).
_BATCH_V11_COLUMNS = ("domain", "key_version", "ad_version")


def batch_digest(rows: Iterable[tuple[str, bytes, bytes]]) -> str:
    """The digest of an escrow batch: SHA-256 over its rows in nonce order, each row as
    ``SHA-256(len(p) || p || nonce || len(c) || c)`` (p the UTF-8 pseudonym, c the ciphertext, lengths as
    4-byte big-endian; :func:`~pseudonymise.core.sealer.row_hash`), prefixed by a label."""
    return _fold(b"".join(row_hash(p.encode("utf-8"), bytes(n), bytes(c)) for p, n, c in rows))


def _fold(row_hashes: bytes) -> str:
    """The batch digest of its rows' hashes (32 bytes each, in nonce order)."""
    return hashlib.sha256(_DIGEST_LABEL + row_hashes).hexdigest()


@dataclass(frozen=True)
class EscrowTables:
    """The escrow tables: one row per sealed batch key, one per sealed value."""

    batches: sa.Table
    values: sa.Table

    @classmethod
    def define(cls, metadata: sa.MetaData, prefix: str = "pseudonymise", schema: str | None = None) -> EscrowTables:
        """The tables, on any database (the key's collation is PostgreSQL's alone)."""
        batches = sa.Table(
            f"{prefix}_escrow_batch",
            metadata,
            sa.Column("batch_id", sa.String(36), primary_key=True),
            sa.Column("project", sa.String(200), nullable=False),
            sa.Column("sealed_dek", sa.LargeBinary, nullable=False),
            sa.Column("created_at", UTCDateTime, nullable=False),
            sa.Column("retention_until", UTCDateTime, nullable=False),
            sa.Column("domain", sa.Text),
            sa.Column("key_version", sa.Integer),
            sa.Column("ad_version", sa.SmallInteger),
            schema=schema,
        )
        # The key compares bytes on PostgreSQL whatever the database's collation: under a linguistic one (en-US,
        # ICU or libc) every comparison of the key's index costs a collation call, and escrow rows were 30-60 %
        # dearer to write. Pseudonyms and project names are only ever compared for equality, which is the same.
        key = sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql")
        values = sa.Table(
            f"{prefix}_escrow",
            metadata,
            sa.Column("project", key, primary_key=True),
            sa.Column("pseudonym", key, primary_key=True),
            sa.Column("batch_id", sa.String(36), nullable=False),
            sa.Column("nonce", sa.LargeBinary, nullable=False),
            sa.Column("ciphertext", sa.LargeBinary, nullable=False),
            sa.Column("retention_until", UTCDateTime, nullable=False),
            # No index but the primary key: each costs every escrow row an insertion, the largest part of a
            # reversible run's database work, and reveal and erasure go by the key. The purge, a daily job,
            # reads the table instead (see ``purge``).
            schema=schema,
        )
        return cls(batches, values)

    def missing_columns(self, conn: Connection) -> list[str]:
        """The v1.1 columns a batch table made before v1.1 lacks."""
        present = {c["name"] for c in sa.inspect(conn).get_columns(self.batches.name, schema=self.batches.schema)}
        return [name for name in _BATCH_V11_COLUMNS if name not in present]

    def upgrade(self, conn: Connection) -> None:
        """Give a batch table made before v1.1 its new columns (NULL in the old rows: v1 batches)."""
        quote = conn.dialect.identifier_preparer
        for name in self.missing_columns(conn):
            column = self.batches.c[name]
            conn.execute(sa.text(f"ALTER TABLE {quote.format_table(self.batches)} ADD COLUMN "
                                 f"{quote.format_column(column)} {column.type.compile(conn.dialect)}"))


@dataclass
class _StagedBatch:
    """A batch waiting in the staging table: its batch-table row (written only if the batch stores a row), how
    many rows it staged, where their hashes are in the writer's spool, and its digest if every row is stored."""

    row: dict[str, Any]
    count: int
    offset: int
    digest: str


#: Values a run writing straight into escrow gathers before it sorts and copies them (see ``EscrowWriter``).
DIRECT_ROWS = 65_536

#: Retries of a flush whose INSERT met a key another writer committed without the escrow lock (an older version).
_FLUSH_ATTEMPTS = 3


class EscrowWriter:
    """The pipeline's side: writes batches sealed with the escrow public key of a pseudonymisation token.

    After the last :meth:`write` (and :meth:`flush`), :attr:`digests` maps each batch that stored rows to
    its digest: list it in the use's ``success`` audit row (``details["escrow_batches"]``), or reversal
    will refuse the batch's rows. A batch that stored no row (every value already had escrow) leaves no
    batch row and no digest.
    """

    def __init__(self, token: Token, tables: EscrowTables, *, defer: bool = False,
                 direct_rows: int = DIRECT_ROWS) -> None:
        """:param defer: the writer serves one run and :meth:`flush` is called before its commit. On PostgreSQL
            its first block of values decides how the run writes (see :meth:`_direct`): straight into the
            escrow table, in key order, when the run can hold the project's escrow lock from then until it
            commits; otherwise (another run of the project holds it) rows wait in a staging table and go into
            the escrow table in one sorted statement at :meth:`flush`, under the lock. Without ``defer`` each
            write is stored at once, through the staging table.
        :param direct_rows: written straight in, blocks are gathered (per domain) until they hold this many
            values, then sorted and copied as one batch; the last are copied at :meth:`flush`. Larger chunks
            cost the primary key's index less (its pages are visited in order) and hold more in memory."""
        if token.kind != "pseudonymisation" or token.escrow_public_key is None:
            raise TokenKindError(
                f"token {token.jti} carries no escrow public key; escrow needs a pseudonymisation token "
                "of a reversible project"
            )
        self._token = token
        self._tables = tables
        self._deterministic = token.treatment == "deterministic"
        self._defer = defer
        self._staged: str | None = None  # the staging table (PostgreSQL)
        self._batches: dict[str, _StagedBatch] = {}  # batch id -> what it staged, until the flush
        self._hashes: Any = None  # the staged rows' hashes, 32 bytes each, in memory then on disk
        self._mode: str | None = None  # PostgreSQL with defer: "direct" or "staged", decided by the first block
        self._probe = True  # direct: look each block's pseudonyms up in escrow first (see _direct)
        self._direct_rows = max(1, direct_rows)
        self._pending: dict[tuple[str, str, int], list[EscrowBlock]] = {}  # direct: blocks gathered, by kind
        self._sealing: deque[tuple[_Sealing, dict[str, Any]]] = deque()  # direct: sealed or being sealed, in order
        self.digests: dict[str, str] = {}

    def write(self, conn: Connection, items: Sequence[EscrowItem] | EscrowBlocks, now: datetime | None = None) -> int:
        """Seal ``items`` (one batch per domain) and write them in the caller's transaction; return rows written
        (on PostgreSQL with ``defer``, 0: :meth:`flush` counts them)."""
        if isinstance(items, EscrowBlocks):
            return sum(self._write_block(conn, block, now) for block in items)
        if isinstance(items, EscrowBlock):
            return self._write_block(conn, items, now) if len(items) else 0
        if not items:
            return 0
        if isinstance(items, EscrowItems):
            pseudonyms, tags, canonicals, domains = items.pseudonyms, items.type_tags, items.canonicals, items.domains
        else:
            pseudonyms = [i.pseudonym for i in items]
            tags = [i.type_tag for i in items]
            canonicals = [i.canonical for i in items]
            domains = [i.domain for i in items]
        groups: dict[str, list[int]] = {}
        for index, domain in enumerate(domains):
            groups.setdefault(domain, []).append(index)
        if len(groups) == 1:
            return self._write_values(conn, domains[0], pseudonyms, tags, canonicals, now)
        return sum(self._write_values(conn, domain, [pseudonyms[i] for i in keep], [tags[i] for i in keep],
                                      [canonicals[i] for i in keep], now) for domain, keep in groups.items())

    def _write_block(self, conn: Connection, block: EscrowBlock, now: datetime | None) -> int:
        if conn.dialect.name != "postgresql":
            items = block.items()
            return self._write_values(conn, block.domain, items.pseudonyms, items.type_tags, items.canonicals, now)
        if self._defer and self._direct(conn):
            kind = (block.domain, block.type_tag, block.width)
            pending = self._pending.setdefault(kind, [])
            pending.append(block)
            if sum(map(len, pending)) < self._direct_rows:
                return 0
            del self._pending[kind]
            return self._copy_block(conn, EscrowBlock.concat(pending), now)
        if self._deterministic:  # one row per (project, pseudonym): the first occurrence in the batch
            block = block.first_occurrences()
        sealer, batch = self._new_batch(conn, block.domain, now)
        return self._stage(conn, sealer.copy_block_rows(batch["batch_id"], block), batch, sealer.row_hashes)

    def _write_values(self, conn: Connection, domain: str, pseudonyms: list[str], tags: list[str],
                      canonicals: list[bytes], now: datetime | None) -> int:
        if self._deterministic:
            # one row per (project, pseudonym): the first occurrence in the batch is enough
            first = dict(zip(reversed(pseudonyms), range(len(pseudonyms) - 1, -1, -1), strict=True))
            if len(first) < len(pseudonyms):
                keep = sorted(first.values())
                pseudonyms = [pseudonyms[i] for i in keep]
                tags = [tags[i] for i in keep]
                canonicals = [canonicals[i] for i in keep]
        sealer, batch = self._new_batch(conn, domain, now)
        batch_id = batch["batch_id"]
        if conn.dialect.name == "postgresql":
            return self._stage(conn, sealer.copy_rows(batch_id, pseudonyms, tags, canonicals), batch, sealer.row_hashes)
        nonces, ciphertexts = sealer.seal(pseudonyms, tags, canonicals)
        project, retention = self._token.project, self._token.retention_until
        rows: list[dict[str, Any]] = [
            {"project": project, "pseudonym": p, "batch_id": batch_id, "nonce": n, "ciphertext": c,
             "retention_until": retention}
            for p, n, c in zip(pseudonyms, nonces, ciphertexts, strict=True)
        ]
        if self._deterministic:
            written = insert_ignoring_duplicates(self._tables.values, ["project", "pseudonym"]).execute(conn, rows)
        else:
            conn.execute(self._tables.values.insert(), rows)
            written = len(rows)
        if written:
            conn.execute(self._tables.batches.insert(), batch)
            # Outside PostgreSQL the writer may read escrow (SQLite: the file's owner is trusted anyway).
            v = self._tables.values
            stored = conn.execute(sa.select(v.c.pseudonym, v.c.nonce, v.c.ciphertext)
                                  .where(v.c.batch_id == batch_id).order_by(v.c.nonce)).all()
            self.digests[batch_id] = batch_digest((r.pseudonym, bytes(r.nonce), bytes(r.ciphertext)) for r in stored)
        return written

    def _table(self, conn: Connection) -> str:
        """The escrow value table's name as SQL (quoted, with its schema)."""
        return conn.dialect.identifier_preparer.format_table(self._tables.values)

    def _lock_name(self, conn: Connection) -> str:
        return f"pseudonymise-escrow:{self._table(conn)}:{self._token.project}"

    def _holds_project(self, conn: Connection) -> bool:
        """Whether the escrow table holds any row of the run's project (the key's index answers)."""
        return bool(conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {self._table(conn)} WHERE project = %(project)s)",
                                         {"project": self._token.project}).scalar_one())

    def _direct(self, conn: Connection) -> bool:
        """Whether this run writes its blocks straight into the escrow table (decided once, at its first block).

        A randomised project's pseudonyms are new with every value: nothing to leave out, nothing to lock. A
        deterministic project keeps one row per (project, pseudonym), so two runs must not insert one pseudonym
        each: the run tries the project's escrow lock (a transaction lock, held until it commits or rolls back)
        and, when it has it, no other run inserts the project's keys meanwhile, so a block whose pseudonyms are
        not in escrow yet goes in with a plain ``COPY``. Which are not: none, when the project had no escrow when
        the lock was taken and the engine says the block holds nothing handed to escrow before in the run
        (``EscrowBlock.repeats``); otherwise a look-up of the block's pseudonyms. When another run holds the
        lock, this one stages its rows and waits for the lock at :meth:`flush` (the rows then leave out what
        that run stored), so concurrent runs of one project stream side by side."""
        if self._mode is None:
            if not self._deterministic:
                self._mode, self._probe = "direct", False
            elif try_advisory_lock(conn, self._lock_name(conn)):
                self._mode, self._probe = "direct", self._holds_project(conn)
            else:
                self._mode = "staged"
        return self._mode == "direct"

    def _copy_block(self, conn: Connection, block: EscrowBlock, now: datetime | None) -> int:
        """Seal ``block`` as one batch, in pseudonym order, to be copied into the escrow table (see :meth:`_direct`);
        return the rows copied by this call. Every row sealed is stored, so the batch's digest is that of all its
        rows.

        The sealing runs on a thread of its own while this connection copies the batch before (the backend then
        never waits for the worker to seal): at most one batch is being sealed, and a look-up in escrow first
        copies everything sealed, so that it sees this run's rows."""
        block = block.in_pseudonym_order(distinct=self._deterministic)
        copied = 0
        if self._deterministic and (self._probe or block.repeats):
            copied = self._copy_sealed(conn, keep=0)
            held = self._held(conn, block)
            if held.any():
                block = block.take(np.flatnonzero(~held))
        if not len(block):
            return copied
        sealer, batch = self._new_batch(conn, block.domain, now)
        self._sealing.append((_Sealing(sealer, batch["batch_id"], block), batch))
        return copied + self._copy_sealed(conn, keep=1)

    def _copy_sealed(self, conn: Connection, keep: int) -> int:
        """``COPY`` the batches sealed (or being sealed) but the last ``keep``, in order; return the rows copied."""
        copied = 0
        table = self._table(conn)
        while len(self._sealing) > keep:
            sealing, batch = self._sealing.popleft()
            rows = sealing.rows()
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.copy_expert(f"COPY {table} ({', '.join(ROW_COLUMNS)}) FROM STDIN (FORMAT binary)",
                                   _Parts(BINARY_COPY_HEADER, rows, BINARY_COPY_TRAILER), size=1 << 20)
            except Exception as exc:
                if getattr(exc, "pgcode", None) == "23505":  # only a writer that takes no lock can have put it there
                    raise EscrowError(
                        f"another writer stored a pseudonym of project {self._token.project!r} in escrow while this "
                        "run held the project's escrow lock (a version of this plugin from before the lock, or a "
                        "hand-written insert); nothing of this run was committed: run it again once that writer "
                        "has finished"
                    ) from None
                raise
            finally:
                cursor.close()
            conn.execute(self._tables.batches.insert(), batch)
            self.digests[batch["batch_id"]] = _fold(sealing.row_hashes)
            copied += sealing.count
        return copied

    def _held(self, conn: Connection, block: EscrowBlock) -> np.ndarray:
        """Which of the block's pseudonyms escrow holds for the project (a mask), this run's own rows included: one
        text array in (no parameter per value), one character per value out, looked up in the block's order."""
        if not len(block):
            return np.zeros(0, dtype=bool)
        table = self._table(conn)
        names = block.names().tolist()
        if b"\\" in block.pseudonyms or b'"' in block.pseudonyms:
            names = [n.replace(b"\\", b"\\\\").replace(b'"', b'\\"') for n in names]
        listed = (b'{"' + b'","'.join(names) + b'"}').decode("utf-8")
        found = conn.exec_driver_sql(
            "SELECT string_agg(CASE WHEN EXISTS (SELECT FROM " + table + " e WHERE e.project = %(project)s "
            "AND e.pseudonym = u.p) THEN '1' ELSE '0' END, '' ORDER BY u.i) "
            "FROM unnest(CAST(%(names)s AS text[])) WITH ORDINALITY AS u(p, i)",
            {"project": self._token.project, "names": listed},
        ).scalar_one()
        return np.frombuffer(found.encode("ascii"), dtype=np.uint8) == ord("1")

    def _new_batch(self, conn: Connection, domain: str, now: datetime | None) -> tuple[BatchSealer, dict[str, Any]]:
        """A new batch, its data key sealed to the escrow public key: its sealer, and its row for the batch
        table (written once the batch has stored a value)."""
        sealer = BatchSealer(self._token, domain)
        return sealer, {
            "batch_id": str(uuid.uuid4()),
            "project": self._token.project,
            "sealed_dek": sealer.sealed_dek,
            "created_at": now or database_now(conn),
            "retention_until": self._token.retention_until,
            "domain": domain,
            "key_version": self._token.key_version,
            "ad_version": AD_VERSION,
        }

    def _stage(self, conn: Connection, rows: bytes, batch: dict[str, Any], hashes: bytes) -> int:
        """COPY escrow rows (COPY text of ``ROW_COLUMNS``) into the run's staging table, keeping their hashes
        (``hashes``: the sealer's) for the digests; unless deferred, move them into the escrow table at once.
        Returns the rows written to the escrow table."""
        values = self._tables.values
        prep = conn.dialect.identifier_preparer
        listed = ", ".join(ROW_COLUMNS)
        # Spelled out rather than LIKE, which needs SELECT on the escrow table: the pipeline's role may
        # only insert there (include/sql/least_privilege.sql).
        into = prep.quote(f"_pseudonymise_escrow_stage_{values.name}"[:63])
        if self._staged is None:
            types = {n: values.c[n].type.compile(conn.dialect) for n in ROW_COLUMNS}
            # project and retention end are the writer's own (the flush takes them from the token, once), and
            # text costs COPY nothing to read: a timestamptz parsed per row was a fifth of the staging's cost
            # The pseudonym takes the database's collation, so that comparing it with the escrow table's key uses
            # the key's own (bytes in a table made now, the database's in one an earlier version made): the key's
            # index serves the look-up either way.
            types.update(project="text", pseudonym="text", batch_id="text", retention_until="text")
            spec = ", ".join(f"{n} {types[n]}" for n in ROW_COLUMNS)
            conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {into} ({spec}) ON COMMIT DROP")
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.copy_expert(f"COPY {into} ({listed}) FROM STDIN", io.BytesIO(rows), size=1 << 20)
        finally:
            cursor.close()
        self._staged = into
        if self._hashes is None:  # flat memory: 32 bytes a row, on disk past 8 MiB
            self._hashes = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 (closed by flush)
        offset = self._hashes.tell()
        self._hashes.write(hashes)
        self._batches[batch["batch_id"]] = _StagedBatch(batch, len(hashes) // 32, offset, _fold(hashes))
        return 0 if self._defer else self.flush(conn)

    def flush(self, conn: Connection) -> int:
        """Store what waits, and list the digest of what each batch stored; return the rows written.

        The blocks a run writing straight in has gathered are copied (see :meth:`_direct`). Staged rows go in with
        one ``INSERT … SELECT`` in key order (the primary key's index is then written page after page), with no
        ``ON CONFLICT``: deterministic projects keep one row per (project, pseudonym), so under a transaction lock
        on the project's escrow (no other run inserts its keys meanwhile: there is no conflict to wait for or
        to check row by row) it leaves out the staged rows whose pseudonym escrow already holds and keeps one
        staged row per pseudonym. ``RETURNING`` gives each batch's stored nonces (never a ciphertext: the
        pipeline's role reads none), and the digests come from the rows' hashes the sealer gave."""
        pending, self._pending = self._pending, {}
        copied = sum(self._copy_block(conn, EscrowBlock.concat(blocks), None) for blocks in pending.values())
        copied += self._copy_sealed(conn, keep=0)
        if self._staged is None or not self._batches:
            return copied
        table = self._table(conn)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            if self._deterministic:
                advisory_lock(conn, self._lock_name(conn))
            for attempt in range(_FLUSH_ATTEMPTS):
                cursor.execute("SAVEPOINT pseudonymise_escrow_flush")
                try:
                    stored = self._insert(cursor, table, self._deterministic and self._holds_project(conn))
                except Exception as exc:
                    # a key committed by a writer that does not take the lock (an older version): start again
                    if getattr(exc, "pgcode", None) != "23505" or attempt == _FLUSH_ATTEMPTS - 1:
                        raise
                    cursor.execute("ROLLBACK TO SAVEPOINT pseudonymise_escrow_flush")
                    continue
                cursor.execute("RELEASE SAVEPOINT pseudonymise_escrow_flush")
                break
            cursor.execute(f"TRUNCATE {self._staged}")
        finally:
            cursor.close()
        written = copied + sum(map(len, stored.values()))
        if written:
            conn.execute(self._tables.batches.insert(), [self._batches[b].row for b in stored])
        self._batches.clear()
        self._hashes.close()
        self._hashes = None
        return written

    def _insert(self, cursor: Any, table: str, held: bool) -> dict[str, np.ndarray]:
        """Insert the staged rows escrow must store (``held``: the project has rows there, which a deterministic
        insert leaves out); return the counters (nonces) each batch stored, and record those batches' digests."""
        stage, listed = self._staged, ", ".join(ROW_COLUMNS)
        params = {"project": self._token.project, "retention": self._token.retention_until}
        taken = "%(project)s, pseudonym, batch_id, nonce, ciphertext, %(retention)s"
        select = f"SELECT {taken} FROM {stage} s"
        if self._deterministic:
            left_out = (f" WHERE NOT EXISTS (SELECT FROM {table} e WHERE e.project = %(project)s "
                        "AND e.pseudonym = s.pseudonym)" if held else "")
            select = f'SELECT DISTINCT ON (pseudonym COLLATE "C") {taken} FROM {stage} s{left_out}'
        # in the key's byte order (its index's pages in turn), whatever the database's collation
        cursor.execute(f'WITH ins AS (INSERT INTO {table} ({listed}) {select} ORDER BY pseudonym COLLATE "C" '
                       "RETURNING batch_id, nonce) SELECT batch_id, string_agg(nonce, ''::bytea) FROM ins GROUP BY batch_id", params)
        stored = {batch_id: np.frombuffer(bytes(nonces), dtype=np.uint8).reshape(-1, 12)
                  for batch_id, nonces in cursor.fetchall()}
        for batch_id, nonces in stored.items():
            self.digests[batch_id] = self._digest(self._batches[batch_id], nonces)
        return stored

    def _digest(self, batch: _StagedBatch, nonces: np.ndarray) -> str:
        """The digest of the rows of ``batch`` with these nonces (12 bytes each): the whole batch's when it
        stored every row, else folded again from the stored rows' hashes."""
        if len(nonces) == batch.count:
            return batch.digest
        # a nonce is the row's counter, 96-bit big-endian; a batch has far fewer than 2**64 rows
        counters = nonces[:, 4:].copy().view(">u8").ravel()
        keep = np.zeros(batch.count, dtype=bool)
        keep[counters] = True
        self._hashes.seek(batch.offset)
        hashes = np.frombuffer(self._hashes.read(32 * batch.count), dtype="S32")
        return _fold(hashes[keep].tobytes())


class _Sealing:
    """One batch's values being sealed into binary escrow rows on a thread of its own (the C engine lets go of the
    GIL); :meth:`rows` waits for them and raises what the sealing raised. The thread ends by itself (a daemon, for
    a run that fails before its rows are asked for)."""

    def __init__(self, sealer: BatchSealer, batch_id: str, block: EscrowBlock) -> None:
        self.count = len(block)
        self._sealer = sealer
        self._rows: bytes | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._seal, args=(batch_id, block), name="pseudonymise-escrow-seal",
                                        daemon=True)
        self._thread.start()

    def _seal(self, batch_id: str, block: EscrowBlock) -> None:
        try:
            self._rows = self._sealer.binary_block_rows(batch_id, block)
        except BaseException as exc:  # raised by rows(), in the writer's thread
            self._error = exc

    def rows(self) -> bytes:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._rows is not None
        return self._rows

    @property
    def row_hashes(self) -> bytes:
        """The rows' hashes in the batch digest (once :meth:`rows` has returned)."""
        return self._sealer.row_hashes


class _Parts:
    """Bytes objects read one after the other, as a file (``read``) for ``COPY``, without joining them first."""

    def __init__(self, *parts: bytes) -> None:
        self._parts = [memoryview(p) for p in parts if p]

    def read(self, size: int = -1) -> bytes:
        if not self._parts:
            return b""
        head = self._parts[0]
        chunk = head if size < 0 else head[:size]
        if len(chunk) == len(head):
            self._parts.pop(0)
        else:
            self._parts[0] = head[len(chunk):]
        return bytes(chunk)


@dataclass(frozen=True)
class Revealed:
    """Result of a reversal: original values by pseudonym, and the pseudonyms escrow does not hold."""

    values: dict[str, Any]
    not_found: list[str]


class EscrowReader:
    """Opens escrow with a verified reverse token, revealing only what it can prove (docs/design.md §5.1).

    A row is revealed when its batch's digest is listed by a ``success`` row of an audit chain that
    verifies and equals the digest of the batch's rows now, when it opens under its associated data, and,
    in deterministic projects, when the opened value recomputes its pseudonym with the token's
    ``verify_keys``. Any other row is refused: :class:`EscrowIntegrityError` names its pseudonym (never
    a value) and nothing of the call is revealed. Retention is checked on the escrow database's clock.
    """

    def __init__(self, conn: Connection, tables: EscrowTables, token: Token,
                 listed_batches: Callable[[], Mapping[str, str]], now: datetime | None = None) -> None:
        """:param listed_batches: returns ``{batch id: digest}`` listed by the ``success`` rows of the
            verified audit chain (called once, when a v1.1 row is first met)."""
        if token.kind != "reverse" or token.escrow_private_key is None:
            raise TokenKindError(f"token {token.jti} is a {token.kind!r} token; reversal needs a 'reverse' token")
        self._conn = conn
        self._tables = tables
        self._token = token
        self.now = now or database_now(conn)
        if self.now >= token.retention_until:
            raise RetentionEndedError(
                f"project {token.project!r}'s retention ended at {utc_seconds(token.retention_until)} by the escrow "
                "database's clock; reversal is impossible for ever"
            )
        self._listed_source = listed_batches
        self._listed: Mapping[str, str] | None = None
        self._deterministic = token.treatment == "deterministic"
        self._batches: dict[str, tuple[BatchOpener | None, str | None]] = {}  # batch id -> (opener, refusal)

    def _listed_digests(self) -> Mapping[str, str]:
        if self._listed is None:
            self._listed = self._listed_source()
        return self._listed

    def _batch(self, row: Any) -> tuple[BatchOpener | None, str | None]:
        """The opened data key of the row's batch, or the reason the batch's rows are refused."""
        known = self._batches.get(row.batch_id)
        if known is not None:
            return known
        refusal: str | None = None
        if row.ad_version is None:
            if not self._deterministic or not self._token.verify_keys:
                refusal = ("it was written before escrow v1.1 in a project whose pseudonyms cannot be recomputed "
                           "(randomised, or no verify_keys in the reverse token), so it cannot be proven")
        elif row.ad_version != AD_VERSION:
            refusal = f"its batch has an unknown associated-data version {row.ad_version}"
        else:
            listed = self._listed_digests().get(row.batch_id)
            if listed is None:
                refusal = "its batch is not listed by a successful use in the verified audit chain (inserted outside a run)"
            elif listed != self._stored_digest(row.batch_id):
                refusal = "its batch's rows differ from the digest the audit lists (rows added, removed or altered)"
        cipher = None
        if refusal is None:
            cipher = BatchOpener(bytes(row.sealed_dek), self._token.escrow_private_key)  # type: ignore[arg-type]
        self._batches[row.batch_id] = (cipher, refusal)
        return cipher, refusal

    def _stored_digest(self, batch_id: str) -> str:
        v = self._tables.values
        rows = self._conn.execute(sa.select(v.c.pseudonym, v.c.nonce, v.c.ciphertext)
                                  .where(v.c.batch_id == batch_id).order_by(v.c.nonce))
        return batch_digest((r.pseudonym, bytes(r.nonce), bytes(r.ciphertext)) for r in rows)

    def _recomputes(self, pseudonym: str, domain: str, key_version: int | None, tag: str, data: bytes,
                    domain_hint: str) -> bool:
        """Whether the opened value gives ``pseudonym`` again (deterministic projects with verify_keys)."""
        keys = self._token.verify_keys or {}
        fmt = self._token.format
        if key_version is not None:
            candidates = [(keys.get(key_version), domain)]
        else:  # v1: neither key version nor domain were recorded
            candidates = [(k, d) for k in keys.values() for d in dict.fromkeys((domain_hint, ""))]
        for key, dom in candidates:
            if key is None:
                continue
            mac = pseudonym_mac(key, dom, data)
            if hmac.compare_digest(fmt.encode(mac).encode("utf-8"), pseudonym.encode("utf-8")):
                return True
        return False

    def reveal(self, pseudonyms: Iterable[str], domain_hint: str = "") -> Revealed:
        """The originals of ``pseudonyms`` (rows past retention are never opened, even if not yet purged).

        :param domain_hint: the pseudonymisation domain of the column, used only to recompute v1 rows
            (which did not record it)."""
        wanted = list(dict.fromkeys(p for p in pseudonyms if p is not None))
        found, refused = self.check(wanted, domain_hint)
        if refused:
            raise EscrowRefusedError(self._token.project, refused)
        return Revealed(found, [p for p in wanted if p not in found])

    def check(self, pseudonyms: Iterable[str], domain_hint: str = "") -> tuple[dict[str, Any], dict[str, str]]:
        """``(values, refused)``: the originals that can be proven, and why each other row is refused.
        Only :meth:`reveal` hands values out; the verifier uses the refusals."""
        token = self._token
        wanted = list(dict.fromkeys(p for p in pseudonyms if p is not None))
        v, b = self._tables.values, self._tables.batches
        found: dict[str, Any] = {}
        refused: dict[str, str] = {}
        for start in range(0, len(wanted), _REVEAL_CHUNK):
            chunk = wanted[start : start + _REVEAL_CHUNK]
            query = (
                sa.select(v.c.pseudonym, v.c.batch_id, v.c.nonce, v.c.ciphertext, v.c.retention_until,
                          b.c.sealed_dek, b.c.domain, b.c.key_version, b.c.ad_version)
                .join(b, b.c.batch_id == v.c.batch_id)
                .where(v.c.project == token.project, v.c.pseudonym.in_(chunk), v.c.retention_until > self.now)
            )
            for row in self._conn.execute(query):
                cipher, refusal = self._batch(row)
                if cipher is None:
                    refused[row.pseudonym] = refusal or "refused"
                    continue
                v11 = row.ad_version is not None
                ad = associated_data(token.project, row.pseudonym, row.domain if v11 else None,
                                     row.key_version, row.retention_until)
                plaintext = cipher.open(bytes(row.nonce), bytes(row.ciphertext), ad)
                if plaintext is None:
                    refused[row.pseudonym] = ("it fails authentication: altered, or moved from another pseudonym, "
                                              "domain, key version or retention end")
                    continue
                tag, _, data = plaintext.partition(b"\x00")
                tag_text = tag.decode("ascii", "replace")
                if tag_text not in TYPE_TAGS:
                    refused[row.pseudonym] = "it holds an unknown value type"
                    continue
                if self._deterministic and (token.verify_keys or not v11) and not self._recomputes(
                        row.pseudonym, row.domain or "", row.key_version if v11 else None, tag_text, data, domain_hint):
                    refused[row.pseudonym] = "its value does not give this pseudonym again (a forged row)"
                    continue
                found[row.pseudonym] = from_canonical(tag_text, data)
        return found, refused


def reveal(conn: Connection, tables: EscrowTables, token: Token, pseudonyms: Iterable[str],
           listed_batches: Callable[[], Mapping[str, str]], now: datetime | None = None) -> Revealed:
    """Open the escrow of ``pseudonyms`` with a verified reverse token (one :class:`EscrowReader` call)."""
    return EscrowReader(conn, tables, token, listed_batches, now).reveal(pseudonyms)


@dataclass(frozen=True)
class UnprovenRow:
    """An escrow row that reversal would refuse, for an auditor (no value: it is not opened)."""

    project: str
    pseudonym: str
    batch_id: str
    reason: str


def unproven_rows(conn: Connection, tables: EscrowTables, listed_batches: Mapping[str, str],
                  project: str | None = None, token: Token | None = None) -> list[UnprovenRow]:
    """The escrow rows reversal would refuse, for an auditor.

    Without a token: rows whose batch is not listed by the verified audit, or whose batch's rows no longer
    match the listed digest (v1 rows are named too: only a deterministic project's reverse token can prove
    them). With a verified reverse token: every row of its project goes through the checks reversal makes
    (digest, associated data, recomputing the pseudonym), without any value leaving this function.
    """
    if token is not None:
        return _unproven_with_token(conn, tables, listed_batches, token)
    v, b = tables.values, tables.batches
    out: list[UnprovenRow] = []
    batches = sa.select(b.c.batch_id, b.c.project, b.c.ad_version)
    if project is not None:
        batches = batches.where(b.c.project == project)
    bad: dict[str, str] = {}
    for batch in conn.execute(batches):
        if batch.ad_version is None:
            bad[batch.batch_id] = "written before escrow v1.1: provable only by recomputing with verify_keys"
            continue
        listed = listed_batches.get(batch.batch_id)
        if listed is None:
            bad[batch.batch_id] = "its batch is not listed by a successful use in the verified audit chain"
            continue
        rows = conn.execute(sa.select(v.c.pseudonym, v.c.nonce, v.c.ciphertext)
                            .where(v.c.batch_id == batch.batch_id).order_by(v.c.nonce))
        if batch_digest((r.pseudonym, bytes(r.nonce), bytes(r.ciphertext)) for r in rows) != listed:
            bad[batch.batch_id] = "its batch's rows differ from the digest the audit lists"
    orphan = sa.select(v.c.project, v.c.pseudonym, v.c.batch_id).where(v.c.batch_id.not_in(sa.select(b.c.batch_id)))
    if project is not None:
        orphan = orphan.where(v.c.project == project)
    for row in conn.execute(orphan):
        out.append(UnprovenRow(row.project, row.pseudonym, row.batch_id, "its batch key row does not exist"))
    if bad:
        ids = list(bad)
        for start in range(0, len(ids), _REVEAL_CHUNK):
            query = sa.select(v.c.project, v.c.pseudonym, v.c.batch_id).where(v.c.batch_id.in_(ids[start:start + _REVEAL_CHUNK]))
            for row in conn.execute(query.order_by(v.c.project, v.c.pseudonym)):
                out.append(UnprovenRow(row.project, row.pseudonym, row.batch_id, bad[row.batch_id]))
    return out


def _unproven_with_token(conn: Connection, tables: EscrowTables, listed_batches: Mapping[str, str],
                         token: Token) -> list[UnprovenRow]:
    reader = EscrowReader(conn, tables, token, lambda: listed_batches)
    v = tables.values
    names = conn.execute(sa.select(v.c.pseudonym, v.c.batch_id).where(v.c.project == token.project)
                         .order_by(v.c.pseudonym)).all()
    batch_of = {r.pseudonym: r.batch_id for r in names}
    out: list[UnprovenRow] = []
    for start in range(0, len(names), _REVEAL_CHUNK):
        _values, refused = reader.check([r.pseudonym for r in names[start:start + _REVEAL_CHUNK]])
        out += [UnprovenRow(token.project, p, batch_of[p], why) for p, why in refused.items()]
    return out


def purge(conn: Connection, tables: EscrowTables, project: str | None = None, now: datetime | None = None) -> int:
    """Delete escrow rows past ``retention_until`` by the database's clock (and batch keys no row needs);
    return value rows deleted."""
    now = now or database_now(conn)
    v, b = tables.values, tables.batches
    cond = v.c.retention_until <= now
    bcond = b.c.retention_until <= now
    if project is not None:
        cond = sa.and_(cond, v.c.project == project)
        bcond = sa.and_(bcond, b.c.project == project)
    deleted = conn.execute(sa.delete(v).where(cond)).rowcount or 0
    conn.execute(sa.delete(b).where(bcond))
    return deleted


__all__ = ["EscrowReader", "EscrowTables", "EscrowWriter", "Revealed", "UnprovenRow",
           "batch_digest", "purge", "reveal", "unproven_rows"]
