"""Sealed escrow for reversible projects (DESIGN.md §5): seal, store, reveal with a reverse token, purge.

The pipeline holds only the escrow *public* key, so it can write escrow and never read it.
Per batch a fresh data key (``dek``) is sealed with HPKE (RFC 9180 base mode, DHKEM(X25519,
HKDF-SHA256), HKDF-SHA256, AES-256-GCM) to the project's escrow public key; per value, the type
tag and canonical bytes are encrypted with AES-256-GCM under ``dek`` with a counter nonce and
``project + NUL + pseudonym`` as associated data, so a ciphertext moved to another pseudonym
(or project) fails to open.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from sqlalchemy.engine import Connection

from pseudonymise.core.canonical import TYPE_TAGS, from_canonical
from pseudonymise.core.db import UTCDateTime, insert_ignoring_duplicates
from pseudonymise.core.errors import EscrowError, EscrowIntegrityError, TokenKindError
from pseudonymise.core.pseudonymiser import EscrowItem
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
    except Exception as exc:  # noqa: BLE001 - the library raises several types for a bad seal
        raise EscrowIntegrityError(
            "an escrow batch key does not open with this reverse token: it was sealed for another "
            "project's escrow key, or it was altered"
        ) from exc


def associated_data(project: str, pseudonym: str) -> bytes:
    return project.encode("utf-8") + b"\x00" + pseudonym.encode("utf-8")


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
            sa.Column("batch_id", sa.String(36), nullable=False, index=True),
            sa.Column("nonce", sa.LargeBinary, nullable=False),
            sa.Column("ciphertext", sa.LargeBinary, nullable=False),
            sa.Column("retention_until", UTCDateTime, nullable=False, index=True),
            schema=schema,
        )
        return cls(batches, values)


class EscrowWriter:
    """The pipeline's side: seals batches with the escrow public key of a pseudonymisation token."""

    def __init__(self, token: Token, tables: EscrowTables) -> None:
        if token.kind != "pseudonymisation" or token.escrow_public_key is None:
            raise TokenKindError(
                f"token {token.jti} carries no escrow public key; escrow needs a pseudonymisation token "
                "of a reversible project"
            )
        self._token = token
        self._tables = tables
        self._deterministic = token.treatment == "deterministic"

    def write(self, conn: Connection, items: Sequence[EscrowItem], now: datetime | None = None) -> int:
        """Seal ``items`` as one batch and insert them in the caller's transaction; return rows written."""
        if not items:
            return 0
        if self._deterministic:
            # one row per (project, pseudonym): the first occurrence in the batch is enough
            unique: dict[str, EscrowItem] = {}
            for item in items:
                unique.setdefault(item.pseudonym, item)
            items = list(unique.values())
        if len(items) >= 2**64:
            raise EscrowError("an escrow batch is limited to 2**64 values; use a smaller batch size")
        project = self._token.project
        dek = AESGCM.generate_key(bit_length=256)
        aead = AESGCM(dek)
        batch_id = str(uuid.uuid4())
        now = now or datetime.now(timezone.utc)
        retention = self._token.retention_until
        rows: list[dict[str, Any]] = []
        for counter, item in enumerate(items):
            nonce = counter.to_bytes(12, "big")
            plaintext = item.type_tag.encode("ascii") + b"\x00" + item.canonical
            rows.append({
                "project": project,
                "pseudonym": item.pseudonym,
                "batch_id": batch_id,
                "nonce": nonce,
                "ciphertext": aead.encrypt(nonce, plaintext, associated_data(project, item.pseudonym)),
                "retention_until": retention,
            })
        conn.execute(self._tables.batches.insert(), {
            "batch_id": batch_id,
            "project": project,
            "sealed_dek": seal_key(dek, self._token.escrow_public_key),  # type: ignore[arg-type]
            "created_at": now,
            "retention_until": retention,
        })
        if self._deterministic:
            return insert_ignoring_duplicates(self._tables.values, ["project", "pseudonym"]).execute(conn, rows)
        conn.execute(self._tables.values.insert(), rows)
        return len(rows)


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
    now = now or datetime.now(timezone.utc)
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
    now = now or datetime.now(timezone.utc)
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


__all__ = ["EscrowTables", "EscrowWriter", "Revealed", "reveal", "purge", "seal_key", "open_key"]
