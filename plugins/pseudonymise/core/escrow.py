"""Sealed escrow for reversible projects (DESIGN.md §5): seal, store, reveal with a reverse token, purge.

The pipeline holds only the escrow *public* key, so it can write escrow and never read it.
Per batch a fresh data key (``dek``) is sealed with HPKE (RFC 9180 base mode, DHKEM(X25519,
HKDF-SHA256), HKDF-SHA256, AES-256-GCM) to the project's escrow public key; per value, the type
tag and canonical bytes are encrypted with AES-256-GCM under ``dek`` with a counter nonce and
``project + NUL + pseudonym`` as associated data, so a ciphertext moved to another pseudonym
(or project) fails to open.

A batch is sealed column-wise (one AES-GCM call per value, no other object per value). On
PostgreSQL its rows are written with ``COPY``: straight into the escrow table for randomised
projects, and for deterministic projects into a temporary staging table first, from which one
``INSERT … SELECT … ON CONFLICT DO NOTHING`` keeps the first row of each pseudonym.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import numpy as np
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import Connection

from pseudonymise.core.canonical import TYPE_TAGS, from_canonical
from pseudonymise.core.copytext import _pg_text, build_rows, encode_column
from pseudonymise.core.db import UTCDateTime, insert_ignoring_duplicates
from pseudonymise.core.errors import EscrowError, EscrowIntegrityError, TokenKindError
from pseudonymise.core.pseudonymiser import EscrowBlock, EscrowItem, EscrowItems, _native
from pseudonymise.core.tokens import Token

HPKE_INFO = b"pseudonymise/v1/escrow"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_REVEAL_CHUNK = 500


def seal_key(dek: bytes, public_key: X25519PublicKey) -> bytes:
    """HPKE-seal a data key to the escrow public key (``enc || ciphertext``)."""
    return SUITE.encrypt(dek, public_key, info=HPKE_INFO)


def open_key(sealed: bytes, private_key: X25519PrivateKey) -> bytes:
    try:
        return SUITE.decrypt(sealed, private_key, info=HPKE_INFO)
    except Exception as exc:
        raise EscrowIntegrityError(
            "an escrow batch key does not open with this reverse token: it was sealed for another "
            "project's escrow key, or it was altered"
        ) from exc


_COUNTERS: tuple[list[bytes], list[str]] = ([], [])


def _counter_nonces(count: int) -> tuple[list[bytes], list[str]]:
    """Nonces 0 … count-1 (96-bit big-endian counters) and their COPY text; every batch has its own key,
    so every batch uses the same ones. Computed once per process."""
    global _COUNTERS
    raw, text = _COUNTERS
    if len(raw) < count:
        size = max(count, 2 * len(raw), 1024)
        raw = list(map(int.to_bytes, range(size), repeat(12), repeat("big")))
        text = list(map("\\\\x".__add__, map(bytes.hex, raw)))
        _COUNTERS = (raw, text)
    return raw[:count], text[:count]


def associated_data(project: str, pseudonym: str) -> bytes:
    return project.encode("utf-8") + b"\x00" + pseudonym.encode("utf-8")


_ESCROW_COLUMNS = ("project", "pseudonym", "batch_id", "nonce", "ciphertext", "retention_until")


@dataclass(frozen=True)
class EscrowTables:
    """The escrow tables: one row per sealed batch key, one per sealed value."""

    batches: sa.Table
    values: sa.Table

    @classmethod
    def define(cls, metadata: sa.MetaData, prefix: str = "pseudonymise", schema: str | None = None) -> EscrowTables:
        batches = sa.Table(
            f"{prefix}_escrow_batch",
            metadata,
            sa.Column("batch_id", sa.String(36), primary_key=True),
            sa.Column("project", sa.String(200), nullable=False),
            sa.Column("sealed_dek", sa.LargeBinary, nullable=False),
            sa.Column("created_at", UTCDateTime, nullable=False),
            sa.Column("retention_until", UTCDateTime, nullable=False),
            schema=schema,
        )
        values = sa.Table(
            f"{prefix}_escrow",
            metadata,
            sa.Column("project", sa.String(200), primary_key=True),
            sa.Column("pseudonym", sa.String(200), primary_key=True),
            sa.Column("batch_id", sa.String(36), nullable=False),
            sa.Column("nonce", sa.LargeBinary, nullable=False),
            sa.Column("ciphertext", sa.LargeBinary, nullable=False),
            sa.Column("retention_until", UTCDateTime, nullable=False),
            # For the retention purge. Every value row costs each index an insertion, the pipeline's
            # main cost on a reversible run: on PostgreSQL it is a BRIN index (rows arrive roughly in
            # retention order, and BRIN costs almost nothing to maintain); reveal goes by primary key.
            sa.Index(f"ix_{prefix}_escrow_retention_until", "retention_until", postgresql_using="brin"),
            schema=schema,
        )
        return cls(batches, values)


class EscrowWriter:
    """The pipeline's side: seals batches with the escrow public key of a pseudonymisation token."""

    def __init__(self, token: Token, tables: EscrowTables, *, defer: bool = False) -> None:
        """:param defer: on PostgreSQL, a deterministic project's rows wait in a staging table and go into
            the escrow table in one statement, in key order, at :meth:`flush` (call it before committing).
            Two runs sharing values then take their escrow rows' locks in one global order, so they cannot
            deadlock; and one sorted insert costs PostgreSQL less than one per batch."""
        if token.kind != "pseudonymisation" or token.escrow_public_key is None:
            raise TokenKindError(
                f"token {token.jti} carries no escrow public key; escrow needs a pseudonymisation token "
                "of a reversible project"
            )
        self._token = token
        self._tables = tables
        self._deterministic = token.treatment == "deterministic"
        self._defer = defer
        self._staged: str | None = None  # the staging table holding deferred rows

    def write(self, conn: Connection, items: Sequence[EscrowItem], now: datetime | None = None) -> int:
        """Seal ``items`` as one batch and insert them in the caller's transaction; return rows written."""
        if not items:
            return 0
        if isinstance(items, EscrowBlock):
            if conn.dialect.name == "postgresql" and _native is not None and b"\\" not in items.pseudonyms:
                return self._copy_block(conn, items, now)
            items = items.items()
        if isinstance(items, EscrowItems):
            pseudonyms, tags, canonicals = items.pseudonyms, items.type_tags, items.canonicals
        else:
            pseudonyms = [i.pseudonym for i in items]
            tags = [i.type_tag for i in items]
            canonicals = [i.canonical for i in items]
        if self._deterministic:
            # one row per (project, pseudonym): the first occurrence in the batch is enough
            first = dict(zip(reversed(pseudonyms), range(len(pseudonyms) - 1, -1, -1), strict=True))
            if len(first) < len(pseudonyms):
                keep = sorted(first.values())
                pseudonyms = [pseudonyms[i] for i in keep]
                tags = [tags[i] for i in keep]
                canonicals = [canonicals[i] for i in keep]
        count = len(pseudonyms)
        if count >= 2**64:
            raise EscrowError("an escrow batch is limited to 2**64 values; use a smaller batch size")
        project = self._token.project
        dek, batch_id = self._new_batch(conn, now)
        aead = AESGCM(dek)
        retention = self._token.retention_until
        nonces, nonces_text = _counter_nonces(count)
        if len(set(tags)) == 1:
            plaintexts = list(map((tags[0].encode("ascii") + b"\x00").__add__, canonicals))
        else:
            plaintexts = [t.encode("ascii") + b"\x00" + c for t, c in zip(tags, canonicals, strict=True)]
        ad_prefix = associated_data(project, "")
        ads = map(ad_prefix.__add__, map(str.encode, pseudonyms))
        ciphertexts = list(map(aead.encrypt, nonces, plaintexts, ads))
        if conn.dialect.name == "postgresql":
            return self._copy(conn, project, pseudonyms, batch_id, nonces_text, ciphertexts, retention)
        rows: list[dict[str, Any]] = [
            {"project": project, "pseudonym": p, "batch_id": batch_id, "nonce": n, "ciphertext": c,
             "retention_until": retention}
            for p, n, c in zip(pseudonyms, nonces, ciphertexts, strict=True)
        ]
        if self._deterministic:
            return insert_ignoring_duplicates(self._tables.values, ["project", "pseudonym"]).execute(conn, rows)
        conn.execute(self._tables.values.insert(), rows)
        return len(rows)

    def _new_batch(self, conn: Connection, now: datetime | None) -> tuple[bytes, str]:
        """A fresh data key, sealed to the escrow public key in a new batch row: (key, batch id)."""
        dek = AESGCM.generate_key(bit_length=256)
        batch_id = str(uuid.uuid4())
        conn.execute(self._tables.batches.insert(), {
            "batch_id": batch_id,
            "project": self._token.project,
            "sealed_dek": seal_key(dek, self._token.escrow_public_key),  # type: ignore[arg-type]
            "created_at": now or datetime.now(UTC),
            "retention_until": self._token.retention_until,
        })
        return dek, batch_id

    def _copy_block(self, conn: Connection, block: EscrowBlock, now: datetime | None) -> int:
        """An :class:`EscrowBlock` sealed and written by the C engine (OpenSSL's AES-256-GCM): the same rows
        as :meth:`_copy` writes, without an object per value."""
        if self._deterministic:  # one row per (project, pseudonym): the first occurrence in the batch
            names = np.frombuffer(block.pseudonyms, dtype=f"S{block.width}")
            _, first = np.unique(names, return_index=True)
            if len(first) < len(names):
                block = block.take(np.sort(first))
        if len(block) >= 2**64:
            raise EscrowError("an escrow batch is limited to 2**64 values; use a smaller batch size")
        project = self._token.project
        dek, batch_id = self._new_batch(conn, now)
        retention = self._token.retention_until.astimezone(UTC).isoformat()
        assert _native is not None
        rows = _native.seal_rows(dek, associated_data(project, ""), block.type_tag.encode("ascii") + b"\x00",
                                 block.pseudonyms, block.width, block.canonicals, block.ends.tobytes(),
                                 (_pg_text(project) + "\t").encode("utf-8"), f"\t{batch_id}\t".encode("ascii"),
                                 f"\t{retention}\n".encode("ascii"))
        return self._copy_rows(conn, rows, len(block))

    def _copy(self, conn: Connection, project: str, pseudonyms: list[str], batch_id: str, nonces: list[str],
              ciphertexts: list[bytes], retention: datetime) -> int:
        """COPY the sealed rows (deterministic: through a staging table, keeping existing pseudonyms)."""
        count = len(pseudonyms)
        columns = [encode_column([project]) * count, encode_column(pseudonyms), [batch_id] * count, nonces,
                   list(map("\\\\x".__add__, map(bytes.hex, ciphertexts))),
                   [retention.astimezone(UTC).isoformat()] * count]
        return self._copy_rows(conn, build_rows(columns), count)

    def _copy_rows(self, conn: Connection, rows: bytes, count: int) -> int:
        """COPY escrow rows (COPY text of ``_ESCROW_COLUMNS``); deterministic: through a staging table,
        keeping existing pseudonyms. Returns the rows written."""
        values = self._tables.values
        prep = conn.dialect.identifier_preparer
        table = prep.format_table(values)
        listed = ", ".join(_ESCROW_COLUMNS)
        into = table
        if self._deterministic:
            # Spelled out rather than LIKE, which needs SELECT on the escrow table: the pipeline's
            # role may only insert there (include/sql/least_privilege.sql).
            into = prep.quote(f"_pseudonymise_escrow_stage_{values.name}"[:63])
            spec = ", ".join(f"{n} {values.c[n].type.compile(conn.dialect)}" for n in _ESCROW_COLUMNS)
            conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {into} ({spec}) ON COMMIT DROP")
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.copy_expert(f"COPY {into} ({listed}) FROM STDIN", io.BytesIO(rows), size=1 << 20)
        finally:
            cursor.close()
        if not self._deterministic:
            return count
        self._staged = into
        return 0 if self._defer else self.flush(conn)

    def flush(self, conn: Connection) -> int:
        """Move staged rows into the escrow table, keeping pseudonyms it already holds; return rows written.
        Rows are inserted in key order: the primary key's index is then written page after page."""
        if self._staged is None:
            return 0
        table = conn.dialect.identifier_preparer.format_table(self._tables.values)
        listed = ", ".join(_ESCROW_COLUMNS)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM {self._staged} ORDER BY pseudonym "
                           "ON CONFLICT (project, pseudonym) DO NOTHING")
            written = cursor.rowcount
            cursor.execute(f"TRUNCATE {self._staged}")
        finally:
            cursor.close()
        self._staged = None
        return written


@dataclass(frozen=True)
class Revealed:
    """Result of a reversal: original values by pseudonym, and the pseudonyms escrow does not hold."""

    values: dict[str, Any]
    not_found: list[str]


def reveal(conn: Connection, tables: EscrowTables, token: Token, pseudonyms: Iterable[str],
           now: datetime | None = None) -> Revealed:
    """Open the escrow of ``pseudonyms`` with a verified reverse token.

    The caller must have verified the token and committed the audit ``started`` row first.
    Rows past their ``retention_until`` are never opened, even if not yet purged.
    """
    if token.kind != "reverse" or token.escrow_private_key is None:
        raise TokenKindError(f"token {token.jti} is a {token.kind!r} token; reversal needs a 'reverse' token")
    now = now or datetime.now(UTC)
    wanted = list(dict.fromkeys(p for p in pseudonyms if p is not None))
    v, b = tables.values, tables.batches
    deks: dict[str, AESGCM] = {}
    found: dict[str, Any] = {}
    for start in range(0, len(wanted), _REVEAL_CHUNK):
        chunk = wanted[start : start + _REVEAL_CHUNK]
        query = (
            sa.select(v.c.pseudonym, v.c.batch_id, v.c.nonce, v.c.ciphertext, b.c.sealed_dek)
            .join(b, b.c.batch_id == v.c.batch_id)
            .where(v.c.project == token.project, v.c.pseudonym.in_(chunk), v.c.retention_until > now)
        )
        for row in conn.execute(query):
            aead = deks.get(row.batch_id)
            if aead is None:
                aead = deks[row.batch_id] = AESGCM(open_key(bytes(row.sealed_dek), token.escrow_private_key))
            try:
                plaintext = aead.decrypt(bytes(row.nonce), bytes(row.ciphertext),
                                         associated_data(token.project, row.pseudonym))
            except InvalidTag as exc:
                raise EscrowIntegrityError(
                    f"the escrow row of a pseudonym in project {token.project!r} fails authentication: "
                    "it was altered or moved from another pseudonym; run the audit verifier and restore escrow from backup"
                ) from exc
            tag, _, data = plaintext.partition(b"\x00")
            if tag.decode("ascii", "replace") not in TYPE_TAGS:
                raise EscrowIntegrityError("an escrow row holds an unknown value type")
            found[row.pseudonym] = from_canonical(tag.decode("ascii"), data)
    return Revealed(found, [p for p in wanted if p not in found])


def purge(conn: Connection, tables: EscrowTables, project: str | None = None, now: datetime | None = None) -> int:
    """Delete escrow rows past ``retention_until`` (and batch keys no row needs); return value rows deleted."""
    now = now or datetime.now(UTC)
    v, b = tables.values, tables.batches
    cond = v.c.retention_until <= now
    bcond = b.c.retention_until <= now
    if project is not None:
        cond = sa.and_(cond, v.c.project == project)
        bcond = sa.and_(bcond, b.c.project == project)
    deleted = conn.execute(sa.delete(v).where(cond)).rowcount or 0
    conn.execute(sa.delete(b).where(bcond))
    return deleted


def new_escrow_keypair() -> tuple[X25519PrivateKey, X25519PublicKey]:
    private = X25519PrivateKey.generate()
    return private, private.public_key()


__all__ = ["EscrowTables", "EscrowWriter", "Revealed", "open_key", "purge", "reveal", "seal_key"]
