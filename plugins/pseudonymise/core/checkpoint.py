"""Signed checkpoints of the audit chain's head, kept beside the audit and by witnesses outside its database.

docs/design.md §6.1. A hash chain alone does not stop whoever can write the audit table from cutting off
its end or rewriting it and its head. A *checkpoint* is the statement ``{audit_id, seq, row_hash,
time}`` (canonical JSON) signed with Ed25519 by an audit signing key that the audit database never
holds: a local private key (an OKP JWK, see :class:`LocalSigner`) or a Vault Transit ``ed25519``
key (:class:`TransitSigner`: Vault computes the signature, the key never leaves it).

Checkpoints are written after each use (``TokenUse(on_finished=checkpoint_after_use(...))``) and by
a scheduled task, into the ``<audit table>_checkpoint`` table of the audit's database (on
PostgreSQL only through a ``SECURITY DEFINER`` function that checks the checkpoint against the audit
row it names) and to *witnesses* outside that database: an append-only JSON-lines file
(:class:`FileWitness`) and the latest checkpoint per audit in Vault KV v2, written with
check-and-set (:class:`VaultKVWitness`). Before signing, the :class:`Checkpointer` checks that the
chain extends the latest checkpoint it can trust, so a signer never vouches for a rewritten history.

:func:`verify_against_witness` runs the chain verification and then names every witnessed
checkpoint the current chain contradicts: rows cut off below it, a different ``row_hash`` at its
``seq`` (a rewritten history), or a bad signature (a forged checkpoint).

Signed form (one JSON object; the witness file holds one per line)::

    {"kid": "<key id>", "signature": "<base64url Ed25519 signature of the statement's UTF-8 bytes>",
     "statement": "{\\"audit_id\\":…,\\"row_hash\\":…,\\"seq\\":…,\\"time\\":…,\\"typ\\":\\"pseudonymise-audit-checkpoint/v1\\"}"}
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateTable

from pseudonymise.core.audit import GENESIS, AuditLog, VerifyResult
from pseudonymise.core.audit import row_hash as compute_row_hash
from pseudonymise.core.db import UTCDateTime, advisory_lock, insert_ignoring_duplicates, joined
from pseudonymise.core.errors import (
    CheckpointContradictionError,
    CheckpointError,
    CheckpointFormatError,
    PseudonymiseError,
    ServiceUnavailableError,
    SigningUnavailableError,
    SigningUnreachableError,
    WitnessError,
    WitnessUnreachableError,
)
from pseudonymise.core.instants import utc_micros
from pseudonymise.core.tokens import b64url_decode, b64url_encode, jwk_thumbprint
from pseudonymise.core.vault import VaultCallError, VaultClient

STATEMENT_TYPE = "pseudonymise-audit-checkpoint/v1"
_HASH = re.compile(r"[0-9a-f]{64}\Z")
_KV_SEGMENT = re.compile(r"[^A-Za-z0-9._-]")
_log = logging.getLogger(__name__)


def _parse_instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _canonical_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- statements and signed checkpoints ----------------------------------------------------------
@dataclass(frozen=True)
class Statement:
    """What a checkpoint says: the audit ``audit_id`` had row ``seq`` with ``row_hash`` at ``time``."""

    audit_id: str
    seq: int
    row_hash: str
    time: str  # ISO 8601 UTC, to the microsecond, of the signer's clock

    def canonical(self) -> str:
        return _canonical_json({"audit_id": self.audit_id, "row_hash": self.row_hash, "seq": self.seq,
                                "time": self.time, "typ": STATEMENT_TYPE})

    @classmethod
    def parse(cls, text: str) -> Statement:
        """The statement of ``text``; refused unless ``text`` is exactly its canonical form."""
        try:
            doc = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError("the checkpoint statement is not JSON") from exc
        if not isinstance(doc, dict) or doc.get("typ") != STATEMENT_TYPE:
            raise CheckpointFormatError(f"the checkpoint statement is not of type {STATEMENT_TYPE!r}")
        audit_id, seq, row_hash, when = doc.get("audit_id"), doc.get("seq"), doc.get("row_hash"), doc.get("time")
        if (not isinstance(audit_id, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 1
                or not isinstance(row_hash, str) or not _HASH.match(row_hash) or not isinstance(when, str)):
            raise CheckpointFormatError("the checkpoint statement lacks a valid audit_id, seq, row_hash or time")
        try:
            _parse_instant(when)
        except ValueError as exc:
            raise CheckpointFormatError("the checkpoint statement's time is not an ISO 8601 instant") from exc
        statement = cls(audit_id, seq, row_hash, when)
        if statement.canonical() != text or set(doc) != {"audit_id", "row_hash", "seq", "time", "typ"}:
            raise CheckpointFormatError("the checkpoint statement is not in canonical form (sorted keys, no spaces)")
        return statement


@dataclass(frozen=True)
class SignedCheckpoint:
    """A statement, its exact signed text, the Ed25519 signature (base64url) and the signing key's id."""

    statement: Statement
    text: str
    signature: str
    kid: str

    @property
    def seq(self) -> int:
        return self.statement.seq

    @property
    def row_hash(self) -> str:
        return self.statement.row_hash

    @property
    def time(self) -> str:
        return self.statement.time

    @property
    def audit_id(self) -> str:
        return self.statement.audit_id

    def describe(self) -> str:
        """``checkpoint of 2026-11-30T06:23:36Z``: how errors and results name it (with its row)."""
        return f"checkpoint of {self.time[:19]}Z"

    def to_dict(self) -> dict[str, str]:
        return {"statement": self.text, "signature": self.signature, "kid": self.kid}

    def to_json(self) -> str:
        return _canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Any) -> SignedCheckpoint:
        if not isinstance(doc, Mapping) or not all(isinstance(doc.get(k), str) for k in ("statement", "signature", "kid")):
            raise CheckpointFormatError("not a signed checkpoint: expected an object with statement, signature and kid")
        return cls(Statement.parse(doc["statement"]), doc["statement"], doc["signature"], doc["kid"])

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedCheckpoint:
        try:
            doc = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError("not a signed checkpoint: the entry is not JSON") from exc
        return cls.from_dict(doc)


# --- keys ---------------------------------------------------------------------------------------
def _public_jwk(public: Ed25519PublicKey, kid: str | None = None) -> dict[str, str]:
    x = b64url_encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw))
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid or jwk_thumbprint(x), "alg": "EdDSA", "use": "sig"}


class PublicKeys:
    """The audit signing public keys a verifier trusts, by key id (a JWKS)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})

    @classmethod
    def from_jwks(cls, jwks: str | Mapping[str, Any] | Sequence[Any]) -> PublicKeys:
        """A JWKS (``{"keys": [...]}``), a list of JWKs or one JWK, or their JSON text; ``kid`` defaults
        to the key's RFC 7638 thumbprint."""
        if isinstance(jwks, str):
            try:
                jwks = json.loads(jwks)
            except ValueError as exc:
                raise CheckpointFormatError("the audit public keys are not JSON: pass the JWKS printed by "
                                            "`pseudonymise audit keygen`") from exc
        items = jwks.get("keys", [jwks]) if isinstance(jwks, Mapping) else jwks
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise CheckpointFormatError('the audit public keys must be a JWKS ({"keys": [...]})')
        keys: dict[str, Ed25519PublicKey] = {}
        for jwk in items:
            if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "x" not in jwk:
                raise CheckpointFormatError('an audit public key is not an Ed25519 JWK {"kty": "OKP", "crv": "Ed25519", '
                                            '"x": ...}')
            try:
                public = Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
            except ValueError as exc:
                raise CheckpointFormatError(f"audit public key {jwk.get('kid')!r} has an invalid 'x' (expected 32 bytes "
                                            "base64url)") from exc
            keys[str(jwk.get("kid") or jwk_thumbprint(jwk["x"]))] = public
        return cls(keys)

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [_public_jwk(k, kid) for kid, k in self._keys.items()]}

    def merge(self, other: PublicKeys | None) -> PublicKeys:
        return PublicKeys({**self._keys, **(other._keys if other else {})})

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def problem(self, checkpoint: SignedCheckpoint) -> str | None:
        """Why ``checkpoint``'s signature is not good, or ``None`` when it verifies."""
        key = self._keys.get(checkpoint.kid)
        if key is None:
            return (f"is signed by key {checkpoint.kid[:16]!r}, which is not among the trusted audit public keys "
                    f"({len(self._keys)} given)")
        try:
            key.verify(b64url_decode(checkpoint.signature), checkpoint.text.encode("utf-8"))
        except (ValueError, InvalidSignature):
            return f"has a bad signature (key {checkpoint.kid[:16]!r}): it was forged or altered"
        return None

    def trusts(self, checkpoint: SignedCheckpoint) -> bool:
        return self.problem(checkpoint) is None


class CheckpointSigner(Protocol):
    """An audit signing key: signs statements and publishes its public key(s)."""

    description: str

    def sign(self, message: bytes) -> tuple[str, bytes]:
        """(key id, Ed25519 signature) of ``message``."""
        ...

    def public_keys(self) -> PublicKeys: ...


class LocalSigner:
    """An Ed25519 private key held by the signer (a connection secret, a file, an environment variable).

    Its form is a private OKP JWK (RFC 8037): ``{"kty": "OKP", "crv": "Ed25519", "d": <base64url
    32-byte seed>, "x": <base64url public key>, "kid": <id>}``; ``x`` is checked against ``d`` when
    given, ``kid`` defaults to the RFC 7638 thumbprint. ``pseudonymise audit keygen`` makes one.
    """

    def __init__(self, private: Ed25519PrivateKey, kid: str | None = None) -> None:
        self._private = private
        self.kid = kid or _public_jwk(private.public_key())["kid"]
        self.description = f"local key {self.kid[:16]}"

    @classmethod
    def generate(cls) -> LocalSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_jwk(cls, jwk: str | Mapping[str, Any]) -> LocalSigner:
        """The key of a private JWK (or its JSON text); errors never quote the key."""
        if isinstance(jwk, str):
            try:
                jwk = json.loads(jwk)
            except ValueError as exc:
                raise CheckpointFormatError("the audit signing key is not JSON: it must be the private JWK written by "
                                            "`pseudonymise audit keygen`") from exc
        if (not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519"
                or not isinstance(jwk.get("d"), str)):
            raise CheckpointFormatError('the audit signing key is not a private Ed25519 JWK {"kty": "OKP", "crv": '
                                        '"Ed25519", "d": ..., "x": ...}; make one with `pseudonymise audit keygen`')
        try:
            seed = b64url_decode(jwk["d"])
            private = Ed25519PrivateKey.from_private_bytes(seed)
        except ValueError as exc:
            raise CheckpointFormatError("the audit signing key's 'd' is not a 32-byte base64url Ed25519 seed") from exc
        signer = cls(private, str(jwk["kid"]) if jwk.get("kid") else None)
        if "x" in jwk and jwk["x"] != _public_jwk(private.public_key())["x"]:
            raise CheckpointFormatError("the audit signing key's 'x' does not belong to its 'd': the JWK was altered")
        return signer

    def private_jwk(self) -> dict[str, str]:
        """The private JWK (secret: write it only where the key belongs, mode 0600)."""
        seed = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return {**_public_jwk(self._private.public_key(), self.kid), "d": b64url_encode(seed)}

    def sign(self, message: bytes) -> tuple[str, bytes]:
        return self.kid, self._private.sign(message)

    def public_keys(self) -> PublicKeys:
        return PublicKeys({self.kid: self._private.public_key()})

    def __repr__(self) -> str:
        return f"LocalSigner(kid={self.kid!r})"


def _transit_error(action: str, name: str, mount: str, exc: VaultCallError) -> SigningUnavailableError:
    cls = SigningUnreachableError if exc.unreachable else SigningUnavailableError
    return cls(f"Vault Transit could not {action} with key {name!r} on mount {mount!r} ({exc.cause}); "
               f"check that Vault is reachable and the policy allows {mount}/sign/{name} and reading {mount}/keys/{name}")


class TransitSigner:
    """An ``ed25519`` key in Vault Transit: Vault signs, the key never leaves it.

    ``client`` is the plugin's :class:`~pseudonymise.core.vault.VaultClient` (or an ``hvac.Client``; the
    CLI makes it from VAULT_ADDR and VAULT_TOKEN, the Airflow layer from a Vault connection's
    ``VaultHook``, as for Transit HMAC custody). Every key version
    has its own public key and key id (the thumbprint of its JWK), so rotating the Transit key keeps
    older checkpoints verifiable with :meth:`public_keys`.
    """

    def __init__(self, client: Any, mount: str, name: str) -> None:
        self.client, self.mount, self.name = VaultClient.of(client), mount, name
        self.description = f"Vault Transit key {mount}/{name}"
        self._versions: dict[int, Ed25519PublicKey] = {}

    @classmethod
    def create(cls, client: Any, mount: str, name: str) -> TransitSigner:
        """The Transit key ``mount/name``, created as ``ed25519`` if it does not exist yet."""
        vault = VaultClient.of(client)
        try:
            vault.transit_key(mount, name)
        except VaultCallError as exc:
            if not exc.missing:
                raise _transit_error("read the key", name, mount, exc) from exc
            try:
                vault.transit_create_key(mount, name, "ed25519")
            except VaultCallError as exc2:
                raise _transit_error("create an ed25519 key", name, mount, exc2) from exc2
        signer = cls(vault, mount, name)
        signer.public_keys()  # refuses a key of another type
        return signer

    def _load(self) -> dict[int, Ed25519PublicKey]:
        try:
            data = self.client.transit_key(self.mount, self.name)
        except VaultCallError as exc:
            raise _transit_error("read the public key", self.name, self.mount, exc) from exc
        if data.get("type") != "ed25519":
            raise SigningUnavailableError(
                f"Vault Transit key {self.mount}/{self.name} is of type {data.get('type')!r}; audit checkpoints need an "
                f"ed25519 key: create one with `pseudonymise audit keygen --transit {self.mount}/<new name>`")
        versions = {}
        for version, info in (data.get("keys") or {}).items():
            versions[int(version)] = Ed25519PublicKey.from_public_bytes(base64.b64decode(info["public_key"]))
        self._versions = versions
        return versions

    def _kid(self, version: int) -> str:
        if version not in self._versions:
            self._load()
        if version not in self._versions:
            raise SigningUnavailableError(f"Vault Transit key {self.mount}/{self.name} has no version {version}")
        return _public_jwk(self._versions[version])["kid"]

    def sign(self, message: bytes) -> tuple[str, bytes]:
        try:
            signed = self.client.transit_sign(self.mount, self.name, message)
        except VaultCallError as exc:
            raise _transit_error("sign", self.name, self.mount, exc) from exc
        try:
            _prefix, version, encoded = signed.split(":", 2)
            signature, number = base64.b64decode(encoded), int(version.removeprefix("v"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SigningUnavailableError(f"Vault Transit key {self.mount}/{self.name} returned a signature in an "
                                          "unknown form") from exc
        kid = self._kid(number)
        try:  # never store a signature that would not verify (a key of another type, a proxy in between)
            self._versions[number].verify(signature, message)
        except InvalidSignature as exc:
            raise SigningUnavailableError(f"the signature of Vault Transit key {self.mount}/{self.name} does not verify "
                                          "with its own public key; check the key's type (ed25519)") from exc
        return kid, signature

    def public_keys(self) -> PublicKeys:
        return PublicKeys({_public_jwk(k)["kid"]: k for k in self._load().values()})

    def __repr__(self) -> str:
        return f"TransitSigner({self.mount!r}, {self.name!r})"


def sign_statement(statement: Statement, signer: CheckpointSigner) -> SignedCheckpoint:
    text = statement.canonical()
    kid, signature = signer.sign(text.encode("utf-8"))
    return SignedCheckpoint(statement, text, b64url_encode(signature), kid)


def audit_id_of(audit: AuditLog) -> str:
    """A stable name of the audit table, the same from every machine that reaches it:
    ``<dialect>/<database>/<schema>/<table>`` (for SQLite the database file's name, not its path)."""
    url = audit.engine.url
    backend = url.get_backend_name()
    database = url.database or "-"
    if backend == "sqlite":
        database = Path(database).name or "-"
    return "/".join((backend, database, audit.table.schema or "-", audit.table.name))


def _head_problem(seq: int | None) -> NoReturn:
    if seq is None:
        raise CheckpointError("the audit head row is missing: the audit was altered; nothing was signed. Run "
                              "`pseudonymise audit verify`")
    raise CheckpointError(f"the audit head names row {seq}, but that row is missing or has another row_hash; nothing "
                          "was signed. Run `pseudonymise audit verify`")


def _contradiction(problem: str, which: str, anchor_seq: int, head_seq: int) -> NoReturn:
    """Raise the error for a chain that does not extend the checkpoint ``which`` of row ``anchor_seq``."""
    fix = "nothing was signed. Run `pseudonymise audit verify --witness …`"
    if problem == "truncated":
        message = (f"the chain ends at row {head_seq} but the {which} witnessed row {anchor_seq}: rows were cut off; "
                   f"{fix}")
    elif problem == "rewritten":
        message = (f"row {anchor_seq} does not have the row_hash that the {which} witnessed for it: the history was "
                   f"rewritten; {fix}")
    else:
        message = (f"the rows from row {anchor_seq} of the {which} to the head (row {head_seq}) do not link up "
                   f"(missing, edited or re-linked rows); {fix}")
    raise CheckpointContradictionError(message)


# --- the table beside the audit -----------------------------------------------------------------
class CheckpointTable:
    """``<audit table>_checkpoint`` in the audit's database: every checkpoint signed of that audit.

    On PostgreSQL two ``SECURITY DEFINER`` functions, owned by the table's owner, are all a
    checkpointing role needs (EXECUTE; no SELECT, INSERT, UPDATE or DELETE on the audit, its head or
    this table): ``<audit table>_checkpoint_head(anchor seq, anchor row_hash)`` returns the head after
    checking that the chain extends the anchor and the latest checkpoint of this table (the row at
    that seq still has that row_hash, and every row after it links to the one before), and
    ``<audit table>_checkpoint_add(…)`` records a checkpoint only if its ``seq`` and ``row_hash`` are
    those of the audit row at that ``seq`` (and those its statement says). SQLite does the same
    in-process, and also recomputes each row's hash.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.engine = audit.engine
        name = f"{audit.table.name}_checkpoint"
        self.table = sa.Table(
            name, sa.MetaData(),
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
            sa.Column("key_id", sa.String(100), primary_key=True),
            sa.Column("row_hash", sa.String(64), nullable=False),
            sa.Column("signed_at", UTCDateTime, nullable=False),
            sa.Column("statement", sa.Text, nullable=False),
            sa.Column("signature", sa.String(200), nullable=False),
            sa.Column("witnessed_by", sa.Text),
            schema=audit.table.schema,
        )
        self.function_name = f"{name}_add"[:63]
        self.head_function_name = f"{name}_head"[:63]
        self._created = False

    # --- PostgreSQL function --------------------------------------------------------------------
    def _schema(self, conn: Connection) -> str:
        """The schema of the tables: named, or the connection's current one (the function's own search
        path is only ``pg_catalog``, so every name in it is qualified)."""
        return self.table.schema or str(conn.execute(sa.text("SELECT current_schema()")).scalar())

    def _qualified(self, conn: Connection, name: str) -> str:
        quote = conn.dialect.identifier_preparer.quote
        return f"{quote(self._schema(conn))}.{quote(name)}"

    def function_signature(self, conn: Connection) -> str:
        """``schema.name(bigint, text, …)`` of the add function, as GRANT EXECUTE names it."""
        return f"{self._qualified(conn, self.function_name)}(bigint, text, timestamptz, text, text, text, text)"

    def head_function_signature(self, conn: Connection) -> str:
        return f"{self._qualified(conn, self.head_function_name)}(bigint, text)"

    def _functions_sql(self, conn: Connection) -> list[str]:
        audit, checkpoint = self._qualified(conn, self.audit.table.name), self._qualified(conn, self.table.name)
        head = self._qualified(conn, self.audit.head.name)
        header = "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
        add = f"""CREATE OR REPLACE FUNCTION {self._qualified(conn, self.function_name)}(p_seq bigint, p_row_hash text,
    p_signed_at timestamptz, p_statement text, p_signature text, p_key_id text, p_witnessed_by text) RETURNS boolean
{header} AS $fn$
DECLARE
  doc jsonb;
BEGIN
  BEGIN
    doc := p_statement::jsonb;
  EXCEPTION WHEN others THEN
    RAISE EXCEPTION 'the checkpoint statement is not JSON' USING ERRCODE = '22023';
  END;
  IF jsonb_typeof(doc) IS DISTINCT FROM 'object' OR doc->>'seq' IS DISTINCT FROM p_seq::text
     OR doc->>'row_hash' IS DISTINCT FROM p_row_hash OR doc->>'typ' IS DISTINCT FROM '{STATEMENT_TYPE}' THEN
    RAISE EXCEPTION 'the checkpoint statement does not state row % with the given row_hash', p_seq
      USING ERRCODE = '22023';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM {audit} WHERE seq = p_seq AND row_hash = p_row_hash) THEN
    RAISE EXCEPTION 'audit row % does not have the row_hash of this checkpoint', p_seq USING ERRCODE = '23514';
  END IF;
  INSERT INTO {checkpoint} (seq, key_id, row_hash, signed_at, statement, signature, witnessed_by)
  VALUES (p_seq, p_key_id, p_row_hash, p_signed_at, p_statement, p_signature, p_witnessed_by)
  ON CONFLICT DO NOTHING;
  RETURN FOUND;
END
$fn$"""
        check = f"""CREATE OR REPLACE FUNCTION {self._qualified(conn, self.head_function_name)}(p_anchor_seq bigint,
    p_anchor_hash text) RETURNS jsonb
{header} AS $fn$
DECLARE
  h record;
  a record;
  found_hash text;
  n bigint;
  linked boolean;
  problem text;
BEGIN
  SELECT seq, row_hash INTO h FROM {head} WHERE id = 1;
  IF NOT FOUND THEN
    RETURN jsonb_build_object('problem', 'no-head');
  END IF;
  IF h.seq = 0 THEN
    RETURN jsonb_build_object('seq', 0, 'row_hash', h.row_hash);
  END IF;
  SELECT row_hash INTO found_hash FROM {audit} WHERE seq = h.seq;
  IF found_hash IS DISTINCT FROM h.row_hash THEN
    RETURN jsonb_build_object('seq', h.seq, 'row_hash', h.row_hash, 'problem', 'head');
  END IF;
  FOR a IN
    SELECT p_anchor_seq AS seq, p_anchor_hash AS row_hash, NULL::timestamptz AS signed_at, 'witness' AS source
     WHERE p_anchor_seq IS NOT NULL
    UNION ALL
    (SELECT seq, row_hash, signed_at, 'table' FROM {checkpoint} ORDER BY seq DESC, signed_at DESC LIMIT 1)
  LOOP
    problem := NULL;
    IF a.seq > h.seq THEN
      problem := 'truncated';
    ELSE
      SELECT row_hash INTO found_hash FROM {audit} WHERE seq = a.seq;
      IF found_hash IS DISTINCT FROM a.row_hash THEN
        problem := 'rewritten';
      ELSE
        SELECT count(*), coalesce(bool_and(coalesce(r.prev_hash = p.row_hash, false)), true) INTO n, linked
          FROM {audit} r LEFT JOIN {audit} p ON p.seq = r.seq - 1
         WHERE r.seq > a.seq AND r.seq <= h.seq;
        IF n <> h.seq - a.seq OR NOT linked THEN
          problem := 'unlinked';
        END IF;
      END IF;
    END IF;
    IF problem IS NOT NULL THEN
      RETURN jsonb_build_object('seq', h.seq, 'row_hash', h.row_hash, 'problem', problem, 'anchor_seq', a.seq,
                                'anchor_source', a.source, 'anchor_time', a.signed_at);
    END IF;
  END LOOP;
  RETURN jsonb_build_object('seq', h.seq, 'row_hash', h.row_hash);
END
$fn$"""
        return [add, check]

    def grants_sql(self, role: str) -> list[str]:
        """The least-privilege grants of a PostgreSQL role that checkpoints (pipeline, scheduled task): EXECUTE
        on the two functions, nothing on the tables."""
        with self.engine.connect() as conn:
            who = conn.dialect.identifier_preparer.quote(role)
            return [f"GRANT EXECUTE ON FUNCTION {self.head_function_signature(conn)} TO {who}",
                    f"GRANT EXECUTE ON FUNCTION {self.function_signature(conn)} TO {who}"]

    def _has_functions(self, conn: Connection) -> bool:
        return all(conn.execute(sa.text("SELECT to_regprocedure(:f)"), {"f": f}).scalar() is not None
                   for f in (self.function_signature(conn), self.head_function_signature(conn)))

    def create(self, within: Connection | None = None) -> None:
        """Create the table (and on PostgreSQL its functions, EXECUTE revoked from PUBLIC) if absent.

        Looks first (in the catalogue, which every role may read), so a least-privilege role whose
        owner created everything runs no DDL. ``within``: a connection whose transaction the statements
        join (the caller commits), instead of a transaction of their own."""
        if self._created:
            return
        try:
            with joined(within) if within is not None else self.engine.begin() as conn:
                postgres = conn.dialect.name == "postgresql"
                present = sa.inspect(conn).has_table(self.table.name, schema=self.table.schema)
                if not present or (postgres and not self._has_functions(conn)):
                    advisory_lock(conn, f"pseudonymise-checkpoint:{self.table.fullname}")
                    if postgres:
                        self.table.create(conn, checkfirst=True)
                        for statement in self._functions_sql(conn):
                            conn.execute(sa.text(statement))
                        for signature in (self.function_signature(conn), self.head_function_signature(conn)):
                            conn.execute(sa.text(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC"))
                    else:
                        conn.execute(CreateTable(self.table, if_not_exists=True))
        except SQLAlchemyError as exc:
            raise CheckpointError(
                f"cannot create the checkpoint table {self.table.fullname!r} ({exc.__class__.__name__}); create it once "
                "as the owner of the audit table (`pseudonymise audit checkpoint --db …`), then grant as "
                "include/sql/least_privilege.sql says"
            ) from exc
        self._created = True

    def exists(self) -> bool:
        with self.engine.connect() as conn:
            return sa.inspect(conn).has_table(self.table.name, schema=self.table.schema)

    # --- writing and reading --------------------------------------------------------------------
    def add(self, checkpoint: SignedCheckpoint, witnessed_by: Sequence[str] = ()) -> bool:
        """Record ``checkpoint`` (False if the same seq and key were recorded already)."""
        self.create()
        record = {"seq": checkpoint.seq, "key_id": checkpoint.kid, "row_hash": checkpoint.row_hash,
                  "signed_at": _parse_instant(checkpoint.time), "statement": checkpoint.text,
                  "signature": checkpoint.signature, "witnessed_by": ", ".join(witnessed_by) or None}
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    call = sa.text(f"SELECT {self._qualified(conn, self.function_name)}(:seq, :row_hash, :signed_at, "
                                   ":statement, :signature, :key_id, :witnessed_by)")
                    return bool(conn.execute(call, record).scalar())
                t = self.audit.table
                found = conn.execute(sa.select(t.c.row_hash).where(t.c.seq == checkpoint.seq)).scalar()
                if found != checkpoint.row_hash:
                    raise CheckpointContradictionError(
                        f"audit row {checkpoint.seq} does not have the row_hash that the {checkpoint.describe()} states; "
                        "run `pseudonymise audit verify`")
                return insert_ignoring_duplicates(self.table, ["seq", "key_id"]).execute(conn, [record]) == 1
        except SQLAlchemyError as exc:
            state = getattr(getattr(exc, "orig", None), "pgcode", None)
            raise CheckpointError(
                f"cannot record the {checkpoint.describe()} of row {checkpoint.seq} in {self.table.fullname!r} ({exc.__class__.__name__}"
                f"{', SQLSTATE ' + state if state else ''}); SQLSTATE 23514 means the audit row at that seq has "
                "another row_hash (run `pseudonymise audit verify`), 42501 that the role lacks EXECUTE on "
                f"{self.function_name}"
            ) from exc

    def checked_head(self, anchors: Sequence[SignedCheckpoint], audit_id: str,
                     trusted: Callable[[SignedCheckpoint], bool]) -> tuple[int, str]:
        """The audit head (seq, row_hash), once the chain is known to extend each of ``anchors`` and the
        latest checkpoint of this table; :class:`CheckpointContradictionError` naming the one it does not."""
        self.create()
        try:
            if self.engine.dialect.name == "postgresql":
                head: tuple[int, str] = (0, GENESIS)
                for anchor in sorted(anchors, key=lambda a: a.seq) or [None]:
                    head = self._checked_head_on_server(anchor)
                return head
            return self._checked_head_here(anchors, audit_id, trusted)
        except SQLAlchemyError as exc:
            state = getattr(getattr(exc, "orig", None), "pgcode", None)
            raise CheckpointError(
                f"cannot read the audit head ({exc.__class__.__name__}{', SQLSTATE ' + state if state else ''}); "
                f"on PostgreSQL the role needs EXECUTE on {self.head_function_name} (include/sql/least_privilege.sql)"
            ) from exc

    def _checked_head_on_server(self, anchor: SignedCheckpoint | None) -> tuple[int, str]:
        with self.engine.begin() as conn:
            doc = conn.execute(sa.text(f"SELECT {self._qualified(conn, self.head_function_name)}(:seq, :hash)"),
                               {"seq": anchor.seq if anchor else None,
                                "hash": anchor.row_hash if anchor else None}).scalar_one()
        if isinstance(doc, str):
            doc = json.loads(doc)
        problem = doc.get("problem")
        if problem is None:
            return int(doc["seq"]), str(doc["row_hash"])
        if problem in ("no-head", "head"):
            _head_problem(doc.get("seq"))
        if doc.get("anchor_source") == "witness" and anchor is not None:
            which = anchor.describe()
        else:
            when = str(doc.get("anchor_time") or "")[:19].replace(" ", "T")
            which = f"checkpoint of {when}Z recorded in {self.table.name}"
        _contradiction(problem, which, int(doc["anchor_seq"]), int(doc["seq"]))
        raise AssertionError("unreachable")  # pragma: no cover

    def _checked_head_here(self, anchors: Sequence[SignedCheckpoint], audit_id: str,
                           trusted: Callable[[SignedCheckpoint], bool]) -> tuple[int, str]:
        """SQLite (and any other database): the same checks in-process, recomputing every row's hash too."""
        mine = self.latest_trusted(audit_id, trusted)
        named = [(a, a.describe()) for a in anchors]
        if mine is not None:
            named.append((mine, f"{mine.describe()} recorded in {self.table.name}"))
        t, h = self.audit.table, self.audit.head
        with self.engine.connect() as conn:
            head = conn.execute(sa.select(h.c.seq, h.c.row_hash).where(h.c.id == 1)).first()
            if head is None:
                _head_problem(None)
            if head.seq == 0:
                return 0, head.row_hash
            if conn.execute(sa.select(t.c.row_hash).where(t.c.seq == head.seq)).scalar() != head.row_hash:
                _head_problem(head.seq)
            for anchor, which in sorted(named, key=lambda n: n[0].seq):
                if anchor.seq > head.seq:
                    _contradiction("truncated", which, anchor.seq, head.seq)
                previous: Mapping[str, Any] | None = None
                last = anchor.seq - 1
                while last < head.seq:
                    rows = conn.execute(sa.select(t).where(t.c.seq > last, t.c.seq <= head.seq)
                                        .order_by(t.c.seq).limit(1000)).mappings().all()
                    if not rows:
                        break
                    for row in rows:
                        if previous is None:
                            if row["seq"] != anchor.seq or row["row_hash"] != anchor.row_hash:
                                _contradiction("rewritten", which, anchor.seq, head.seq)
                        elif (row["seq"] != previous["seq"] + 1 or row["prev_hash"] != previous["row_hash"]
                              or compute_row_hash(row["prev_hash"], row) != row["row_hash"]):
                            _contradiction("unlinked", which, anchor.seq, head.seq)
                        previous = row
                    last = rows[-1]["seq"]
                if previous is None or previous["seq"] != head.seq:
                    _contradiction("rewritten" if previous is None else "unlinked", which, anchor.seq, head.seq)
            return int(head.seq), str(head.row_hash)

    def latest(self, witnessed: bool = False) -> dict[str, Any] | None:
        """The checkpoint of the highest row (``witnessed``: of those a witness accepted), or ``None``."""
        if not self.exists():
            return None
        t = self.table
        query = sa.select(t).order_by(t.c.seq.desc(), t.c.signed_at.desc()).limit(1)
        if witnessed:
            query = query.where(t.c.witnessed_by.is_not(None))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

    def _signed(self, row: Mapping[str, Any]) -> SignedCheckpoint:
        return SignedCheckpoint.from_dict({"statement": row["statement"], "signature": row["signature"],
                                           "kid": row["key_id"]})

    # the reading side of a witness, so the table can anchor the checkpointer like any witness
    name = "table"

    def entries(self, audit_id: str | None = None) -> list[WitnessEntry]:
        if not self.exists():
            return []
        out = []
        with self.engine.connect() as conn:
            for row in conn.execute(sa.select(self.table).order_by(self.table.c.seq)).mappings():
                _collect(out, f"table {self.table.fullname} row {row['seq']}", lambda r=row: self._signed(r), audit_id)
        return out

    def latest_trusted(self, audit_id: str, trusted: Callable[[SignedCheckpoint], bool]) -> SignedCheckpoint | None:
        if not self.exists():
            return None
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.seq.desc()).limit(50)).mappings().all()
        for row in rows:
            try:
                cp = self._signed(row)
            except CheckpointFormatError:
                continue
            if cp.audit_id == audit_id and trusted(cp):
                return cp
        return None


# --- witnesses ----------------------------------------------------------------------------------
def _collect(out: list[Any], where: str, parse: Callable[[], SignedCheckpoint], audit_id: str | None) -> None:
    """Append the checkpoint ``parse`` reads at ``where`` (or why it is not one) when it is of ``audit_id``."""
    try:
        checkpoint = parse()
    except CheckpointFormatError as exc:
        out.append(WitnessEntry(where, None, str(exc)))
        return
    if audit_id is None or checkpoint.audit_id == audit_id:
        out.append(WitnessEntry(where, checkpoint))


@dataclass(frozen=True)
class WitnessEntry:
    """One entry of a witness: a checkpoint, or why the entry is not one."""

    where: str
    checkpoint: SignedCheckpoint | None
    problem: str | None = None


class Witness(Protocol):
    """Somewhere outside the audit database that keeps signed checkpoints."""

    name: str

    def record(self, checkpoint: SignedCheckpoint, trusted: Callable[[SignedCheckpoint], bool]) -> bool:
        """Keep ``checkpoint``; False when the witness already holds a later (trusted) one."""
        ...

    def latest_trusted(self, audit_id: str, trusted: Callable[[SignedCheckpoint], bool]) -> SignedCheckpoint | None: ...

    def entries(self, audit_id: str | None = None) -> list[WitnessEntry]:
        """Every checkpoint it holds of ``audit_id`` (all audits when ``None``), and every unreadable entry."""
        ...


class FileWitness:
    """An append-only JSON-lines file, one signed checkpoint per line (a local or mounted path).

    Each checkpoint is one ``write`` to a file opened with ``O_APPEND`` (atomic for concurrent
    writers on a local file system), then ``fsync``. Make the file append-only for the writers
    (``chattr +a``, a WORM mount, or a path only the signer's account can write) so the audit's
    owner cannot edit it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path}"

    def record(self, checkpoint: SignedCheckpoint, trusted: Callable[[SignedCheckpoint], bool] | None = None) -> bool:
        line = (checkpoint.to_json() + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(0, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise WitnessError(f"cannot append the checkpoint of row {checkpoint.seq} to the witness file {str(self.path)!r} "
                               f"({exc.strerror or exc.__class__.__name__}); check that its folder exists and the "
                               "file is writable by this account") from exc
        return True

    def _lines_from_end(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            position, rest = fh.tell(), b""
            while position > 0:
                step = min(1 << 16, position)
                position -= step
                fh.seek(position)
                parts = (fh.read(step) + rest).split(b"\n")
                rest = parts[0]
                yield from reversed(parts[1:])
            yield rest

    def latest_trusted(self, audit_id: str, trusted: Callable[[SignedCheckpoint], bool],
                       look_further: int = 100) -> SignedCheckpoint | None:
        """The highest trusted checkpoint of ``audit_id`` near the end of the file (concurrent writers may
        append out of order, so it reads ``look_further`` lines past the last one it finds)."""
        best: SignedCheckpoint | None = None
        left = None
        try:
            for line in self._lines_from_end():
                if left is not None:
                    left -= 1
                    if left < 0:
                        break
                if not line.strip():
                    continue
                try:
                    cp = SignedCheckpoint.from_json(line)
                except CheckpointFormatError:
                    continue
                if cp.audit_id == audit_id and trusted(cp) and (best is None or cp.seq > best.seq):
                    best = cp
                    left = look_further if left is None else left
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WitnessError(f"cannot read the witness file {str(self.path)!r} ({exc.strerror})") from exc
        return best

    def entries(self, audit_id: str | None = None) -> list[WitnessEntry]:
        out: list[WitnessEntry] = []
        try:
            with open(self.path, "rb") as fh:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    _collect(out, f"{self.name} line {number}", lambda t=line: SignedCheckpoint.from_json(t), audit_id)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise WitnessError(f"cannot read the witness file {str(self.path)!r} ({exc.strerror})") from exc
        return out


class VaultKVWitness:
    """The latest checkpoint of each audit in Vault KV v2, at ``<mount>/<path>/<audit id>``.

    Written with check-and-set (``cas`` = the version read), and only when it extends what is there
    (a higher ``seq``; the same ``seq`` with the same ``row_hash`` is already witnessed). Concurrent
    writers that lose the race read again and retry. KV keeps earlier versions (``max_versions``),
    which :meth:`entries` returns too, so every retained checkpoint is checked by verification.
    """

    def __init__(self, client: Any, mount: str, path: str, retries: int = 30) -> None:
        """:param client: the plugin's :class:`~pseudonymise.core.vault.VaultClient` (or an ``hvac.Client``)."""
        self.client, self.mount, self.path, self.retries = VaultClient.of(client), mount, path.strip("/"), retries
        self.name = f"vault:{mount}/{self.path}"
        self.conflicts = 0

    def secret_path(self, audit_id: str) -> str:
        segments = [_KV_SEGMENT.sub("_", s) or "_" for s in audit_id.split("/")]
        return "/".join([p for p in (self.path,) if p] + segments)

    def _error(self, action: str, path: str, exc: VaultCallError) -> WitnessError:
        cls = WitnessUnreachableError if exc.unreachable else WitnessError
        return cls(f"Vault KV witness {self.mount}/{path}: could not {action} ({exc.cause}); check that "
                   f"Vault is reachable and the policy allows read, create and update on {self.mount}/data/{path} "
                   f"and read on {self.mount}/metadata/{path}")

    def _metadata(self, path: str) -> dict[str, Any] | None:
        try:
            return self.client.kv_metadata(self.mount, path)
        except VaultCallError as exc:
            raise self._error("read the metadata", path, exc) from exc

    def _version(self, path: str, version: int) -> WitnessEntry | None:
        where = f"{self.name} ({path} version {version})"
        try:
            data = self.client.kv_version(self.mount, path, version)
        except VaultCallError as exc:
            raise self._error("read", path, exc) from exc
        if data is None:
            return None  # deleted or destroyed
        try:
            return WitnessEntry(where, SignedCheckpoint.from_dict(data))
        except CheckpointFormatError as exc:
            return WitnessEntry(where, None, str(exc))

    def record(self, checkpoint: SignedCheckpoint, trusted: Callable[[SignedCheckpoint], bool] | None = None) -> bool:
        path = self.secret_path(checkpoint.audit_id)
        for _attempt in range(self.retries):
            meta = self._metadata(path)
            version = int(meta["current_version"]) if meta else 0
            current = self._version(path, version) if version else None
            held = current.checkpoint if current else None
            # A current entry that is not a trusted checkpoint (forged, or of a retired key not configured)
            # is overwritten: KV keeps it as an earlier version, where verification names it.
            if held is not None and (trusted is None or trusted(held)):
                if held.seq > checkpoint.seq:
                    return False
                if held.seq == checkpoint.seq:
                    if held.row_hash != checkpoint.row_hash:
                        raise CheckpointContradictionError(
                            f"the Vault KV witness {self.mount}/{path} holds the {held.describe()} of row {held.seq} "
                            "with another row_hash than that row has now: the history was rewritten; run "
                            "`pseudonymise audit verify --witness …`")
                    return False
            try:
                self.client.kv_write(self.mount, path, checkpoint.to_dict(), cas=version)
                return True
            except VaultCallError as exc:
                if exc.conflict:
                    self.conflicts += 1
                    time.sleep(random.uniform(0.005, 0.05))
                    continue
                raise self._error("write", path, exc) from exc
        raise WitnessError(f"Vault KV witness {self.mount}/{path}: {self.retries} check-and-set conflicts in a row; "
                           "too many writers at once, the next checkpoint will try again")

    def latest_trusted(self, audit_id: str, trusted: Callable[[SignedCheckpoint], bool]) -> SignedCheckpoint | None:
        path = self.secret_path(audit_id)
        meta = self._metadata(path)
        if not meta:
            return None
        for version in sorted((int(v) for v in meta.get("versions", {})), reverse=True):
            entry = self._version(path, version)
            if entry and entry.checkpoint and entry.checkpoint.audit_id == audit_id and trusted(entry.checkpoint):
                return entry.checkpoint
        return None

    def entries(self, audit_id: str | None = None) -> list[WitnessEntry]:
        if audit_id is None:
            raise WitnessError("a Vault KV witness is read per audit: give the audit id")
        path = self.secret_path(audit_id)
        meta = self._metadata(path)
        out: list[WitnessEntry] = []
        for version in sorted(int(v) for v in (meta or {}).get("versions", {})):
            entry = self._version(path, version)
            if entry is not None and (entry.checkpoint is None or entry.checkpoint.audit_id == audit_id):
                out.append(entry)
        return out


# --- making checkpoints -------------------------------------------------------------------------
@dataclass
class CheckpointResult:
    """What one checkpoint did: never a key or a secret."""

    checkpoint: SignedCheckpoint
    witnessed_by: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    recorded: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"audit_id": self.checkpoint.audit_id, "seq": self.checkpoint.seq, "row_hash": self.checkpoint.row_hash,
                "time": self.checkpoint.time, "kid": self.checkpoint.kid, "witnessed_by": self.witnessed_by,
                "superseded": self.superseded, "recorded": self.recorded}

    def __str__(self) -> str:
        where = ", ".join(self.witnessed_by) or "no witness"
        later = f"; {', '.join(self.superseded)} already held a later checkpoint" if self.superseded else ""
        return (f"{self.checkpoint.describe()} of row {self.checkpoint.seq} of {self.checkpoint.audit_id} "
                f"(row_hash {self.checkpoint.row_hash[:16]}…) "
                f"signed with key {self.checkpoint.kid[:16]}; witnessed by {where}{later}")


class Checkpointer:
    """Signs the audit chain's head and sends it to the witnesses and the checkpoint table.

    Before signing it finds the latest checkpoint it can trust (signature good) in each witness, and
    checks that the chain extends it and the latest one of the checkpoint table: the row at that
    ``seq`` still has that ``row_hash``, and every row after it links to the one before (on
    PostgreSQL in ``<audit table>_checkpoint_head``, so a role with EXECUTE only can checkpoint). A
    chain that contradicts one is never signed (:class:`CheckpointContradictionError`, naming it).

    :param public_keys: further trusted public keys (earlier keys, after a rotation), besides the signer's.
    """

    def __init__(self, audit: AuditLog, signer: CheckpointSigner, witnesses: Sequence[Witness] = (), *,
                 audit_id: str | None = None, public_keys: PublicKeys | None = None) -> None:
        self.audit, self.signer, self.witnesses = audit, signer, list(witnesses)
        self.audit_id = audit_id or audit_id_of(audit)
        self.extra_keys = public_keys
        self.table = CheckpointTable(audit)

    def checkpoint(self) -> CheckpointResult | None:
        """Sign a checkpoint of the head (``None`` while the audit is empty).

        Raises :class:`CheckpointContradictionError` if the chain contradicts a trusted checkpoint, and
        :class:`WitnessError` if a witness failed (after the others and the table have the checkpoint).
        """
        self.audit.create()
        self.table.create()
        keys = self.signer.public_keys().merge(self.extra_keys)
        failures: dict[str, WitnessError] = {}
        # 1. The latest trusted checkpoint of each witness, read before the head: the head only grows.
        anchors: list[SignedCheckpoint] = []
        for witness in self.witnesses:
            try:
                found = witness.latest_trusted(self.audit_id, keys.trusts)
            except WitnessError as exc:
                failures[witness.name] = exc
                continue
            if found is not None:
                anchors.append(found)
        # 2. The head, once the chain is known to extend every anchor.
        seq, head_hash = self.table.checked_head(anchors, self.audit_id, keys.trusts)
        if seq == 0:
            return None
        # 3. Sign, and hand the checkpoint to the witnesses, then the table.
        statement = Statement(self.audit_id, seq, head_hash, utc_micros(datetime.now(UTC)))
        checkpoint = sign_statement(statement, self.signer)
        result = CheckpointResult(checkpoint)
        for witness in self.witnesses:
            if witness.name in failures:
                continue
            try:
                (result.witnessed_by if witness.record(checkpoint, keys.trusts) else result.superseded).append(witness.name)
            except CheckpointContradictionError:
                raise
            except WitnessError as exc:
                failures[witness.name] = exc
        result.recorded = self.table.add(checkpoint, result.witnessed_by)
        if failures:
            unreachable = any(isinstance(e, ServiceUnavailableError) for e in failures.values())
            cls = WitnessUnreachableError if unreachable else WitnessError
            raise cls(f"the checkpoint of row {checkpoint.seq} was signed and recorded in the table, but "
                      f"{len(failures)} witness(es) failed: " + "; ".join(str(e) for e in failures.values()))
        return result


def checkpoint_after_use(make: Callable[[AuditLog], Checkpointer],
                         log: logging.Logger | logging.LoggerAdapter[Any] | Any | None = None) -> Callable[[AuditLog], None]:
    """A ``TokenUse(on_finished=…)`` callback: a checkpoint once a use's ``finished`` row is committed.

    It never raises: a failed checkpoint cannot undo the use. It logs a warning naming the reason
    (the plugin's messages carry no key or token; any other error only by its class) and leaves the
    head to the next checkpoint (the scheduled task).
    """
    logger = log if log is not None else _log

    def on_finished(audit: AuditLog) -> None:
        try:
            result = make(audit).checkpoint()
        except PseudonymiseError as exc:
            logger.warning("the audit checkpoint after this use failed (%s: %s); the use stands, the next scheduled "
                           "checkpoint covers it", type(exc).__name__, exc)
        except Exception as exc:  # a checkpoint must never fail the use; the text of foreign errors may quote anything
            logger.warning("the audit checkpoint after this use failed (%s); the use stands, the next scheduled "
                           "checkpoint covers it", type(exc).__name__)
        else:
            if result is not None:
                logger.info("audit checkpoint: %s", result)

    return on_finished


# --- verification -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contradiction:
    """A witnessed checkpoint the audit contradicts (or a witness entry that cannot be trusted)."""

    kind: str  # truncated | rewritten | bad-signature | malformed | missing
    message: str
    where: str
    seq: int | None = None
    time: str | None = None


@dataclass(frozen=True)
class WitnessVerifyResult:
    """The chain's own verification, and what the witnessed checkpoints say about it."""

    audit_id: str
    chain: VerifyResult
    checkpoints_checked: int
    latest: SignedCheckpoint | None
    contradictions: tuple[Contradiction, ...] = ()

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.contradictions

    @property
    def contradicted(self) -> Contradiction | None:
        """The first contradiction (lowest row), or ``None``."""
        return self.contradictions[0] if self.contradictions else None

    def __str__(self) -> str:
        lines = [str(self.chain)]
        if not self.contradictions and self.latest is not None:
            lines.append(f"audit anchored: {self.checkpoints_checked} witnessed checkpoint(s) of {self.audit_id} agree "
                         f"with the chain; the latest, the {self.latest.describe()}, witnessed row {self.latest.seq}")
        else:
            lines.append(f"audit NOT anchored: {len(self.contradictions)} problem(s) with the witnessed checkpoints "
                         f"of {self.audit_id}:")
            lines += [f"  - {c.message} [{c.where}]" for c in self.contradictions]
        return "\n".join(lines)


def _witness_list(witness: Witness | CheckpointTable | Sequence[Witness | CheckpointTable]) -> list[Any]:
    return list(witness) if isinstance(witness, Sequence) else [witness]


def verify_against_witness(audit: AuditLog, witness: Witness | CheckpointTable | Sequence[Witness | CheckpointTable],
                           public_keys: PublicKeys | str | Mapping[str, Any], *,
                           audit_id: str | None = None) -> WitnessVerifyResult:
    """Verify the chain (:meth:`AuditLog.verify`), then that it contains every witnessed checkpoint
    unchanged (the same ``row_hash`` at that ``seq``) and reaches the latest one.

    Names each checkpoint the chain contradicts: rows cut off below it ("the chain ends at row N
    but the checkpoint of <time> witnessed row M"), another ``row_hash`` at its ``seq`` (rewritten),
    a bad signature or an unknown key (forged), an entry that is not a checkpoint; and fails when the
    witness holds no checkpoint of this audit at all.
    """
    keys = public_keys if isinstance(public_keys, PublicKeys) else PublicKeys.from_jwks(public_keys)
    if not len(keys):
        raise CheckpointError("no audit public keys to verify checkpoints with: pass the JWKS of "
                              "`pseudonymise audit keygen`")
    chain = audit.verify()
    audit_id = audit_id or audit_id_of(audit)
    witnesses = _witness_list(witness)
    problems: list[Contradiction] = []
    good: list[tuple[str, SignedCheckpoint]] = []
    for source in witnesses:
        for entry in source.entries(audit_id):
            if entry.checkpoint is None:
                problems.append(Contradiction("malformed", f"an entry that is not a signed checkpoint ({entry.problem})",
                                              entry.where))
                continue
            cp = entry.checkpoint
            problem = keys.problem(cp)
            if problem is not None:
                problems.append(Contradiction("bad-signature", f"the {cp.describe()} for row {cp.seq} {problem}; what "
                                              "it states is not evidence", entry.where, cp.seq, cp.time))
            else:
                good.append((entry.where, cp))
    t = audit.table
    hashes: dict[int, str] = {}
    with audit.engine.connect() as conn:
        last_row = conn.execute(sa.select(sa.func.max(t.c.seq))).scalar() or 0
        wanted = sorted({cp.seq for _, cp in good if cp.seq <= last_row})
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            hashes.update((seq, value) for seq, value in conn.execute(
                sa.select(t.c.seq, t.c.row_hash).where(t.c.seq.in_(chunk))))
    for where, cp in good:
        if cp.seq > last_row:
            problems.append(Contradiction(
                "truncated", f"the chain ends at row {last_row} but the {cp.describe()} witnessed row {cp.seq}: rows "
                f"{last_row + 1}..{cp.seq} were cut off (or the history was rewritten shorter)", where, cp.seq, cp.time))
        elif hashes.get(cp.seq) != cp.row_hash:
            state = "is missing from the chain" if cp.seq not in hashes else "has another row_hash"
            problems.append(Contradiction(
                "rewritten", f"row {cp.seq} {state} than the {cp.describe()} witnessed for it: the history up to row "
                f"{cp.seq} was rewritten", where, cp.seq, cp.time))
    latest = max((cp for _, cp in good), key=lambda c: (c.seq, c.time), default=None)
    if not good and not problems:
        others = _other_audits(witnesses, audit_id)
        problems.append(Contradiction(
            "missing", f"the witness holds no checkpoint of audit {audit_id!r}"
            + (f" (it holds checkpoints of {', '.join(sorted(others))}: pass --audit-id)" if others else
               "; write one with `pseudonymise audit checkpoint`"),
            ", ".join(w.name for w in witnesses)))
    problems.sort(key=lambda c: (c.seq is None, c.seq or 0, c.kind))
    return WitnessVerifyResult(audit_id, chain, len(good), latest, tuple(problems))


def _other_audits(witnesses: Iterable[Any], audit_id: str) -> set[str]:
    others: set[str] = set()
    for w in witnesses:
        if isinstance(w, FileWitness):
            others.update(e.checkpoint.audit_id for e in w.entries() if e.checkpoint and e.checkpoint.audit_id != audit_id)
    return others
