"""The audit log (docs/design.md §6): every token use as a ``started``/``finished`` pair in a hash chain.

Each row stores ``prev_hash`` and ``row_hash = SHA-256(prev_hash || canonical JSON of the row)``.
Appends are serialised (a PostgreSQL advisory lock, plus a one-row head table that also guards
against the chain's tail being cut off). ``started`` rows commit before the token is used; if
they cannot be written the token is not used (fail closed). A ``finished`` row can be appended
inside the caller's transaction so that loaded data and its audit commit together.

On PostgreSQL rows are appended only through a ``SECURITY DEFINER`` function owned by the role that
created the audit (docs/design.md §6.1): the server sets ``seq``, the time, ``prev_hash``, ``row_hash`` and
the calling database role (``db_role``), so a pipeline role given EXECUTE on it, and nothing else,
cannot rewrite, delete or back-date rows, nor move the head. SQLite (the embedded default) appends
in-process and trusts whoever can write its file.
"""

from __future__ import annotations

import hashlib
import json
import socket
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex, CreateTable

from pseudonymise.core.db import UTCDateTime, advisory_lock, database_now, insert_ignoring_duplicates, joined
from pseudonymise.core.errors import AuditError, EscrowIntegrityError, PseudonymiseError
from pseudonymise.core.instants import utc_micros

GENESIS = "0" * 64
OUTCOMES = ("started", "success", "failed", "denied")

@dataclass(frozen=True)
class AuditColumn:
    """One column of the audit table: the table, the records, the HTTP API's model and the pages derive
    from :data:`SCHEMA`, the only list of them."""

    name: str
    #: ``id`` (seq), ``instant`` (recorded_at), ``int``, ``text`` (``length`` characters) or ``long_text``
    kind: str
    description: str
    length: int | None = None
    #: added after the first release: hashed only when set, so chains written before still verify
    optional: bool = False
    #: who and when: filled from the run's context (DAG, task, run, dates, user, host)
    context: bool = False


def _c(name: str, kind: str, description: str, length: int | None = None, **flags: bool) -> AuditColumn:
    return AuditColumn(name, kind, description, length, **flags)


#: Every hashed column, in the table's order (the hashed JSON is canonical anyway: sorted keys).
SCHEMA: tuple[AuditColumn, ...] = (
    _c("seq", "id", "Position in the chain, set by the appender (on PostgreSQL by the server)."),
    _c("use_id", "text", "One token use: its started and finished rows share it.", 36),
    _c("event", "text", "started or finished.", 16),
    _c("recorded_at", "instant", "The audit database's clock."),
    _c("operation", "text", "pseudonymise, secondary, reverse, rekey, purge, verify, revoke, retire, dry_run, risk_report.", 40),
    _c("outcome", "text", "started, success, failed or denied.", 16),
    _c("project", "text", "The verified token's project, else the project the use asked for.", 200),
    _c("token_jti", "text", "The verified token's id (never the token).", 64),
    _c("token_kind", "text", "The verified token's kind.", 32),
    _c("token_fingerprint", "text", "First 16 hex digits of SHA-256 of the token string presented.", 16),
    _c("token_issuer", "text", "The verified token's issuer.", 200),
    _c("dag_id", "text", "DAG of the task that used the token.", 250, context=True),
    _c("task_id", "text", "Task that used the token.", 250, context=True),
    _c("run_id", "text", "DAG run.", 250, context=True),
    _c("map_index", "int", "Mapped task index (-1 when not mapped).", context=True),
    _c("try_number", "int", "Task try.", context=True),
    _c("logical_date", "text", "The run's logical date (ISO 8601).", 40, context=True),
    _c("data_interval_start", "text", "Start of the run's data interval (ISO 8601).", 40, context=True),
    _c("data_interval_end", "text", "End of the run's data interval (ISO 8601).", 40, context=True),
    _c("triggered_by", "text", "The user who triggered the run or called the API.", 250, context=True),
    _c("host", "text", "Host that used the token.", 250, context=True),
    _c("source", "long_text", "What was read (table, query label, file, api:<connection>)."),
    _c("target", "long_text", "What was written."),
    _c("columns", "long_text", "JSON list of the columns pseudonymised or reversed."),
    _c("rows_in", "int", "Rows read."),
    _c("rows_out", "int", "Rows written."),
    _c("rows_null", "int", "NULL values left as NULL."),
    _c("values_pseudonymised", "int", "Values pseudonymised (or revealed)."),
    _c("escrow_rows", "int", "Escrow rows written."),
    _c("error_class", "text", "The error's class (never a data value).", 200),
    _c("error_message", "long_text", "The plugin's own message; never a driver's text or a data value."),
    _c("details", "long_text", "JSON: key version, escrow batches and digests, other counts."),
    _c("token_expires_at", "text", "When the verified token expires.", 40, optional=True),
    _c("retention_until", "text", "When the verified token's project's retention ends.", 40, optional=True),
    _c("claimed", "long_text", "JSON of what a token that failed verification claimed (jti, sub, kind, iss): "
                               "unverified, never in the token_* columns.", optional=True),
    _c("db_role", "text", "The database role that appended the row, set by the server (PostgreSQL).", 128,
       optional=True),
    _c("token_max_uses", "int", "The verified token's max_uses (v1.1): how many uses it allows.", optional=True),
)
FIELDS: tuple[str, ...] = tuple(c.name for c in SCHEMA)
#: The run context's columns (who and when), in order.
CONTEXT_FIELDS: tuple[str, ...] = tuple(c.name for c in SCHEMA if c.context)
_OPTIONAL_FIELDS = tuple(c.name for c in SCHEMA if c.optional)
_TEXT_FIELDS = {c.name: c.length for c in SCHEMA[4:] if c.kind == "text"}
_INT_FIELDS = tuple(c.name for c in SCHEMA if c.kind == "int")
_LONG_TEXT_FIELDS = tuple(c.name for c in SCHEMA if c.kind == "long_text")


def define_audit_tables(metadata: sa.MetaData, table: str = "pseudonymise_audit",
                        schema: str | None = None) -> tuple[sa.Table, sa.Table]:
    cols: list[sa.Column[Any]] = [
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
        sa.Column("use_id", sa.String(36), nullable=False, index=True),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("recorded_at", UTCDateTime, nullable=False, index=True),
    ]
    types: dict[str, Callable[[AuditColumn], Any]] = {
        "int": lambda c: sa.BigInteger(), "long_text": lambda c: sa.Text(), "text": lambda c: sa.String(c.length)}
    # token_jti is indexed: every use of a token counts the earlier uses of its jti (max_uses, v1.1)
    cols += [sa.Column(c.name, types[c.kind](c), index=c.name == "token_jti") for c in SCHEMA[4:]]
    cols += [sa.Column("prev_hash", sa.String(64), nullable=False), sa.Column("row_hash", sa.String(64), nullable=False)]
    audit = sa.Table(table, metadata, *cols, schema=schema)
    head = sa.Table(
        f"{table}_head", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        schema=schema,
    )
    return audit, head


#: The revocation table (docs/design.md §3, v1.1): one row per revoked token id, beside the audit.
REVOKED_TABLE = "pseudonymise_revoked"


def define_revoked_table(metadata: sa.MetaData, schema: str | None = None) -> sa.Table:
    return sa.Table(
        REVOKED_TABLE, metadata,
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("revoked_at", UTCDateTime, nullable=False),
        sa.Column("revoked_by", sa.String(250)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("use_id", sa.String(36), nullable=False),
        schema=schema,
    )


#: The admitted uses of verified tokens (docs/design.md §3, v1.1 ``max_uses``): one row per use let through, written only
#: by the start function (as the audit's owner on PostgreSQL), never by the roles that append. A token's uses
#: are counted here, not from the audit's rows, which any appending role can add to (a forged ``denied`` row
#: for an earlier use would otherwise give a used-up token its use back).
ADMITTED_TABLE = "pseudonymise_admitted"


def define_admitted_table(metadata: sa.MetaData, schema: str | None = None) -> sa.Table:
    return sa.Table(
        ADMITTED_TABLE, metadata,
        sa.Column("use_id", sa.String(36), primary_key=True),
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("admitted_at", UTCDateTime, nullable=False),
        sa.Index(f"ix_{ADMITTED_TABLE}_jti", "jti"),
        schema=schema,
    )


@dataclass(frozen=True)
class Admission:
    """What a use of a verified token must pass under the audit lock, with the errors it is denied with.

    :param max_uses: the token's ``max_uses`` claim (``None``: no limit).
    :param revoked: the error when the token's jti is in the revocation table.
    :param used_up: the error when the jti already has ``max_uses`` uses in the audit.
    """

    max_uses: int | None
    revoked: BaseException
    used_up: BaseException


def canonical_row(row: Mapping[str, Any]) -> bytes:
    """Canonical JSON of the hashed fields: sorted keys, no spaces, UTC instants to the microsecond."""
    doc = {}
    for name in FIELDS:
        value = row.get(name)
        if value is None and name in _OPTIONAL_FIELDS:
            continue
        if isinstance(value, datetime):
            value = utc_micros(value)
        doc[name] = value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_row(row)).hexdigest()


def safe_error_message(exc: BaseException) -> tuple[str, str]:
    """(class, message) for the audit: our own errors are written to carry no secret or data value;
    anything else is recorded by class and origin only, because its text may quote data."""
    if isinstance(exc, PseudonymiseError):
        return type(exc).__name__, str(exc)[:2000]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].name} ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return type(exc).__name__, f"{type(exc).__module__}.{type(exc).__name__}{where}; see the task log"


@dataclass
class AuditUse:
    """One use of one token: what is known when it starts."""

    operation: str
    project: str | None = None
    token_jti: str | None = None
    token_kind: str | None = None
    token_fingerprint: str | None = None
    token_issuer: str | None = None
    source: str | None = None
    target: str | None = None
    columns: Sequence[str] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    #: From the verified token (ISO 8601 UTC), so the audit shows which tokens expire when.
    token_expires_at: str | None = None
    retention_until: str | None = None
    #: What a token that failed verification claimed (unverified, kept apart from the verified columns).
    claimed: Mapping[str, str] | None = None
    #: The verified token's ``max_uses`` (v1.1), so the audit can tell how many uses it has left.
    token_max_uses: int | None = None
    use_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "use_id": self.use_id,
            "operation": self.operation,
            "project": self.project,
            "token_jti": self.token_jti,
            "token_kind": self.token_kind,
            "token_fingerprint": self.token_fingerprint,
            "token_issuer": self.token_issuer,
            "source": self.source,
            "target": self.target,
            "columns": json.dumps(list(self.columns)) if self.columns is not None else None,
            "host": self.context.get("host") or socket.gethostname(),
            "token_expires_at": self.token_expires_at,
            "retention_until": self.retention_until,
            "claimed": json.dumps(dict(self.claimed), sort_keys=True) if self.claimed else None,
            "token_max_uses": self.token_max_uses,
        }
        for key in CONTEXT_FIELDS:
            if key == "host":
                continue
            value = self.context.get(key)
            rec[key] = value.isoformat() if isinstance(value, datetime) else value
        return rec


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int
    last_seq: int
    broken_at: int | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain verified: {self.rows_checked} rows, up to row {self.last_seq}"
        return f"audit chain BROKEN at row {self.broken_at}: {self.reason} ({self.rows_checked} rows checked)"


class AuditLog:
    """An audit table (and its head) in one database; appends are serialised and hash-chained."""

    def __init__(self, engine: Engine, table: str = "pseudonymise_audit", schema: str | None = None) -> None:
        self.engine = engine
        self.metadata = sa.MetaData()
        self.table, self.head = define_audit_tables(self.metadata, table, schema)
        self.revoked = define_revoked_table(self.metadata, schema)
        self.admitted = define_admitted_table(self.metadata, schema)
        self._lock_name = f"pseudonymise-audit:{schema or ''}.{table}"
        self._created = False

    @property
    def append_function(self) -> str:
        """The qualified name of the PostgreSQL append function (``<table>_append``)."""
        prep = self.engine.dialect.identifier_preparer
        name = prep.quote(f"{self.table.name}_append"[:63])
        return f"{prep.quote(self.table.schema)}.{name}" if self.table.schema else name

    def _function(self, suffix: str) -> str:
        prep = self.engine.dialect.identifier_preparer
        name = prep.quote(f"{self.table.name}_{suffix}"[:63])
        return f"{prep.quote(self.table.schema)}.{name}" if self.table.schema else name

    @property
    def start_function(self) -> str:
        """The PostgreSQL function that appends a ``started`` row and admits the use (``<table>_start``)."""
        return self._function("start")

    @property
    def revoke_function(self) -> str:
        """The PostgreSQL function that revokes a token id, audited (``<table>_revoke``)."""
        return self._function("revoke")

    def _ready_on_postgres(self, conn: Connection) -> bool:
        """Whether tables, head row, indexes and functions exist (a least-privilege role can create none)."""
        prep = conn.dialect.identifier_preparer
        for table in (self.head, self.revoked, self.admitted):
            if conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": prep.format_table(table)}).scalar() is None:
                return False
        jti_index = next(i for i in self.table.indexes if "token_jti" in i.columns)
        qualified = f"{prep.quote(self.table.schema)}.{prep.quote(str(jti_index.name))}" if self.table.schema \
            else prep.quote(str(jti_index.name))
        if conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": qualified}).scalar() is None:
            return False
        for signature in (f"{self.append_function}(jsonb)", f"{self.start_function}(jsonb, integer, jsonb, jsonb)",
                          f"{self.revoke_function}(jsonb, text, text)"):
            if conn.execute(sa.text("SELECT to_regprocedure(:f)"), {"f": signature}).scalar() is None:
                return False
        return not self.missing_columns(conn)

    def create(self, within: Connection | None = None) -> None:
        """Create the tables (and on PostgreSQL the append function) if absent (idempotent).

        :param within: a connection whose transaction the statements join (the caller commits), instead of a
            transaction of their own."""
        if self._created:
            return
        try:
            if self.engine.dialect.name == "postgresql" and within is None:
                with self.engine.connect() as conn:
                    if self._ready_on_postgres(conn):
                        self._created = True
                        return
            with joined(within) if within is not None else self.engine.begin() as conn:
                # Workers starting together on a fresh database race to create the tables: the lock
                # serialises them on PostgreSQL (whose DDL is transactional), IF NOT EXISTS on SQLite.
                advisory_lock(conn, self._lock_name)
                new_ledger = not sa.inspect(conn).has_table(self.admitted.name, schema=self.admitted.schema)
                if conn.dialect.name == "sqlite":
                    for table in self.metadata.sorted_tables:
                        conn.execute(CreateTable(table, if_not_exists=True))
                        for index in sorted(table.indexes, key=lambda i: str(i.name)):
                            conn.execute(CreateIndex(index, if_not_exists=True))
                else:
                    self.metadata.create_all(conn, checkfirst=True)
                    for index in sorted(self.table.indexes, key=lambda i: str(i.name)):  # a table made before them
                        conn.execute(CreateIndex(index, if_not_exists=True))
                # Look first: a least-privilege pipeline role may update the head but not insert it.
                if conn.execute(sa.select(self.head.c.id).where(self.head.c.id == 1)).first() is None:
                    insert_ignoring_duplicates(self.head, ["id"]).execute(conn, [{"id": 1, "seq": 0, "row_hash": GENESIS}])
                self._add_missing_columns(conn)
                if new_ledger:
                    self._fill_ledger(conn)
                if conn.dialect.name == "postgresql":
                    # through the driver's cursor with no parameters: the body's "%ROWTYPE" is no placeholder
                    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                    try:
                        cursor.execute(self._append_function_sql(conn))
                        cursor.execute(self._start_function_sql(conn))
                        cursor.execute(self._revoke_function_sql(conn))
                        # PostgreSQL lets PUBLIC execute new functions: only the roles granted them may call them
                        for signature in (f"{self.append_function}(jsonb)",
                                          f"{self.start_function}(jsonb, integer, jsonb, jsonb)",
                                          f"{self.revoke_function}(jsonb, text, text)"):
                            cursor.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
                    finally:
                        cursor.close()
        except SQLAlchemyError as exc:
            raise AuditError(
                f"cannot create the audit table {self.table.fullname!r} ({exc.__class__.__name__}); "
                "check that the audit database is reachable and the role may create tables"
            ) from exc
        self._created = True

    def _fill_ledger(self, conn: Connection) -> None:
        """A new admissions table on an audit that already has uses: the uses the audit shows admitted so far (a
        ``started`` row with a verified token id and no ``denied`` row), so no token gets its uses back. Those
        rows are taken as the audit holds them; every later admission is the start function's own. Workers
        creating the tables together on SQLite (no advisory lock) may both fill it: a use already there is
        left as it is."""
        a, d, u = self.table.alias("a"), self.table.alias("d"), self.admitted.alias("u")
        denied = sa.select(d.c.use_id).where(d.c.use_id == a.c.use_id, d.c.event == "finished", d.c.outcome == "denied")
        there = sa.select(u.c.use_id).where(u.c.use_id == a.c.use_id)
        admitted = (sa.select(a.c.use_id, sa.func.min(a.c.token_jti), sa.func.min(a.c.recorded_at))
                    .where(a.c.event == "started", a.c.token_jti.is_not(None), ~denied.exists(), ~there.exists())
                    .group_by(a.c.use_id))
        conn.execute(self.admitted.insert().from_select(["use_id", "jti", "admitted_at"], admitted))

    def missing_columns(self, conn: Connection) -> list[str]:
        """The optional columns this release has that the table (made by an earlier one) lacks."""
        present = {c["name"] for c in sa.inspect(conn).get_columns(self.table.name, schema=self.table.schema)}
        return [name for name in _OPTIONAL_FIELDS if name not in present]

    def _add_missing_columns(self, conn: Connection) -> None:
        """Give a table made by an earlier release the optional columns (NULL in its old rows)."""
        if not self.missing_columns(conn):
            return
        # Without advisory locks (SQLite) a write takes the database's lock; then look again.
        conn.execute(sa.update(self.head).where(self.head.c.id == 1).values(seq=self.head.c.seq))
        quote = conn.dialect.identifier_preparer
        for name in self.missing_columns(conn):
            column = self.table.c[name]
            conn.execute(sa.text(f"ALTER TABLE {quote.format_table(self.table)} ADD COLUMN "
                                 f"{quote.format_column(column)} {column.type.compile(conn.dialect)}"))

    # --- writing --------------------------------------------------------------------------------
    def _append_function_sql(self, conn: Connection) -> str:
        """The ``SECURITY DEFINER`` function through which every role appends on PostgreSQL: it takes the
        caller's fields as JSON and sets ``seq``, ``recorded_at``, ``prev_hash``, ``row_hash`` and ``db_role``
        itself, hashing the same canonical JSON as :func:`canonical_row` (checked by the tests)."""
        prep = conn.dialect.identifier_preparer
        # The function runs with a fixed search_path (no caller can shadow its tables): name them in full.
        schema = prep.quote(self.table.schema or conn.execute(sa.text("SELECT current_schema()")).scalar_one())
        audit, head = f"{schema}.{prep.quote(self.table.name)}", f"{schema}.{prep.quote(self.head.name)}"
        lock = int.from_bytes(hashlib.sha256(self._lock_name.encode()).digest()[:8], "big", signed=True)
        assign = []
        for name in FIELDS:
            if name in ("seq", "recorded_at", "db_role"):
                continue
            cast = "::bigint" if name in _INT_FIELDS else ""
            assign.append(f"r.{prep.quote(name)} := (p->>'{name}'){cast};")
        parts = []
        for name in sorted(FIELDS):
            column = f"r.{prep.quote(name)}"
            if name == "recorded_at":
                value = (f"'\"' || to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "
                         "|| '\"'")
            elif name in _INT_FIELDS or name == "seq":
                value = f"{column}::text"
            else:
                value = f"to_json({column})::text"
            member = f"'\"{name}\":' || coalesce({value}, 'null')"
            parts.append(f"CASE WHEN {column} IS NULL THEN NULL ELSE {member} END" if name in _OPTIONAL_FIELDS
                         else member)
        body = "\n    ".join(assign)
        doc = ",\n        ".join(parts)
        return f"""CREATE OR REPLACE FUNCTION {self.append_function}(p jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pseudonymise$
DECLARE
    h record;
    r {audit}%ROWTYPE;
BEGIN
    PERFORM pg_advisory_xact_lock({lock});
    SELECT seq, row_hash INTO h FROM {head} WHERE id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the audit head row is missing; the audit table was altered' USING ERRCODE = 'P0001';
    END IF;
    {body}
    r.seq := h.seq + 1;
    r.recorded_at := date_trunc('microseconds', clock_timestamp());
    r.db_role := session_user;
    r.prev_hash := h.row_hash;
    r.row_hash := encode(sha256(convert_to(h.row_hash || '{{' || concat_ws(',',
        {doc}) || '}}', 'UTF8')), 'hex');
    INSERT INTO {audit} SELECT r.*;
    UPDATE {head} SET seq = r.seq, row_hash = r.row_hash WHERE id = 1;
    RETURN to_jsonb(r);
END
$pseudonymise$"""

    def _qualified(self, conn: Connection) -> tuple[str, str, str, int, str]:
        """Audit table, revocation table and append function named in full (the functions run with a fixed
        search_path), the audit lock's key, and the admissions table named in full."""
        prep = conn.dialect.identifier_preparer
        schema = prep.quote(self.table.schema or conn.execute(sa.text("SELECT current_schema()")).scalar_one())
        lock = int.from_bytes(hashlib.sha256(self._lock_name.encode()).digest()[:8], "big", signed=True)
        return (f"{schema}.{prep.quote(self.table.name)}", f"{schema}.{prep.quote(REVOKED_TABLE)}",
                f"{schema}.{prep.quote(f'{self.table.name}_append'[:63])}", lock,
                f"{schema}.{prep.quote(ADMITTED_TABLE)}")

    def _start_function_sql(self, conn: Connection) -> str:
        """``<table>_start(p, max_uses, revoked, used_up)``: under the audit lock, append the ``started`` row
        ``p``, then deny the use when its jti is revoked or has ``max_uses`` earlier uses, appending the
        ``denied`` row ``p || denial`` in the same call, so two concurrent uses of a single-use token cannot
        both pass (docs/design.md §3, v1.1). A use let through is recorded in the admissions table, which only this
        function writes, and the uses are counted there: no row a caller can append changes the count."""
        _, revoked, append, lock, admitted = self._qualified(conn)
        return f"""CREATE OR REPLACE FUNCTION {self.start_function}(p jsonb, max_uses integer, revoked jsonb,
        used_up jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pseudonymise$
DECLARE
    started jsonb;
    finished jsonb;
    uses bigint := 0;
    verdict text;
    v_jti text := p->>'token_jti';
BEGIN
    PERFORM pg_advisory_xact_lock({lock});
    started := {append}(p);
    IF v_jti IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM {revoked} r WHERE r.jti = v_jti) THEN
            verdict := 'revoked';
        ELSIF max_uses IS NOT NULL THEN  -- counted only for a token that has a limit
            SELECT count(*) INTO uses FROM {admitted} u WHERE u.jti = v_jti;
            IF uses >= max_uses THEN
                verdict := 'used_up';
            END IF;
        END IF;
        IF verdict IS NULL THEN
            INSERT INTO {admitted} (use_id, jti, admitted_at) VALUES (p->>'use_id', v_jti, clock_timestamp());
        END IF;
    END IF;
    IF verdict IS NOT NULL THEN
        finished := {append}(p || jsonb_build_object('event', 'finished', 'outcome', 'denied')
                                             || CASE verdict WHEN 'revoked' THEN revoked ELSE used_up END);
    END IF;
    RETURN jsonb_build_object('started', started, 'finished', finished, 'verdict', verdict, 'uses', uses);
END
$pseudonymise$"""

    def _revoke_function_sql(self, conn: Connection) -> str:
        """``<table>_revoke(p, jti, reason)``: the revocation row and its audited use (``p`` started, then
        success; or failed when the jti was already revoked) in one call; the caller's role is recorded."""
        _, revoked, append, lock, _ = self._qualified(conn)
        return f"""CREATE OR REPLACE FUNCTION {self.revoke_function}(p jsonb, p_jti text, p_reason text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pseudonymise$
DECLARE
    started jsonb;
    finished jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock({lock});
    started := {append}(p || jsonb_build_object('event', 'started', 'outcome', 'started'));
    INSERT INTO {revoked} (jti, revoked_at, revoked_by, reason, use_id)
    VALUES (p_jti, clock_timestamp(), coalesce(p->>'triggered_by', session_user), p_reason, p->>'use_id')
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        finished := {append}(p || jsonb_build_object('event', 'finished', 'outcome', 'success'));
    ELSE
        finished := {append}(p || jsonb_build_object('event', 'finished', 'outcome', 'failed',
            'error_class', 'AuditError', 'error_message', 'token ' || p_jti || ' was already revoked'));
    END IF;
    RETURN jsonb_build_object('started', started, 'finished', finished);
END
$pseudonymise$"""

    @staticmethod
    def _function_fields(record: Mapping[str, Any]) -> dict[str, Any]:
        """``record`` as the PostgreSQL functions take it: the caller's fields, server-set ones left out."""
        fields: dict[str, Any] = {}
        for name in FIELDS[4:]:
            value = record.get(name)
            if value is not None and name != "db_role":
                fields[name] = int(value) if name in _INT_FIELDS else value if isinstance(value, str) else str(value)
        fields["use_id"], fields["event"] = record.get("use_id"), record.get("event")
        return fields

    @staticmethod
    def _stored(stored: Mapping[str, Any]) -> dict[str, Any]:
        row = {name: stored.get(name) for name in (*FIELDS, "prev_hash", "row_hash")}
        row["recorded_at"] = datetime.fromisoformat(stored["recorded_at"]).astimezone(UTC)
        return row

    def append(self, conn: Connection, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one row inside ``conn``'s transaction (the caller commits)."""
        if conn.dialect.name == "postgresql":
            stored = self._call(conn, f"SELECT {self.append_function}(CAST(:p AS jsonb))",
                                {"p": json.dumps(self._function_fields(record))})
            return self._stored(stored)
        advisory_lock(conn, self._lock_name)
        # The head update comes first: it takes the write lock on databases without advisory locks.
        conn.execute(sa.update(self.head).where(self.head.c.id == 1).values(seq=self.head.c.seq))
        head = conn.execute(sa.select(self.head.c.seq, self.head.c.row_hash).where(self.head.c.id == 1)).first()
        if head is None:
            raise AuditError("the audit head row is missing; the audit table was altered: run `pseudonymise audit verify`")
        row = {name: None for name in FIELDS}
        row.update({k: v for k, v in record.items() if k in FIELDS})
        # Hash what the database will give back: "2" read from an integer column comes back as 2.
        for name in FIELDS[4:]:
            value = row[name]
            if value is not None:
                row[name] = int(value) if name in _INT_FIELDS else value if isinstance(value, str) else str(value)
        row["seq"] = head.seq + 1
        row["recorded_at"] = database_now(conn)
        row["prev_hash"] = head.row_hash
        row["row_hash"] = row_hash(head.row_hash, row)
        conn.execute(self.table.insert().values(**row))
        conn.execute(sa.update(self.head).where(self.head.c.id == 1).values(seq=row["seq"], row_hash=row["row_hash"]))
        return row

    @staticmethod
    def _call(conn: Connection, statement: str, params: Mapping[str, Any]) -> Any:
        try:
            return conn.execute(sa.text(statement), params).scalar_one()
        except sa.exc.DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) == "P0001":  # raised by the append function itself
                raise AuditError("the audit head row is missing; the audit table was altered: run "
                                 "`pseudonymise audit verify`") from None
            raise

    def _admit_here(self, conn: Connection, record: Mapping[str, Any], admission: Admission) -> str | None:
        """The start function's verdict, in-process (SQLite): the caller holds the database's write lock. A use
        let through is recorded in the admissions table, where the uses are counted (see the start function)."""
        jti = record.get("token_jti")
        if jti is None:
            return None
        if conn.execute(sa.select(self.revoked.c.jti).where(self.revoked.c.jti == jti)).first() is not None:
            return "revoked"
        if admission.max_uses is not None:
            uses = conn.execute(sa.select(sa.func.count()).select_from(self.admitted)
                                .where(self.admitted.c.jti == jti)).scalar_one()
            if uses >= admission.max_uses:
                return "used_up"
        conn.execute(self.admitted.insert().values(use_id=record["use_id"], jti=jti, admitted_at=database_now(conn)))
        return None

    def start_use(self, use: AuditUse, admission: Admission) -> BaseException | None:
        """Commit the ``started`` row of a use of a verified token and admit it under the audit lock: when
        the token is revoked or used up, its ``denied`` row is committed in the same transaction and the
        error of ``admission`` returned (the caller raises it). :class:`AuditError` if nothing could be
        written or the revocation table cannot be read: the token is then not used (fail closed)."""
        record = {**use.record(), "event": "started", "outcome": "started"}
        denials = {"revoked": admission.revoked, "used_up": admission.used_up}
        try:
            self.create()
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    def denial(error: BaseException) -> str:
                        error_class, message = safe_error_message(error)
                        return json.dumps({"error_class": error_class, "error_message": message})

                    result = self._call(
                        conn, f"SELECT {self.start_function}(CAST(:p AS jsonb), :max_uses, CAST(:revoked AS jsonb), "
                        "CAST(:used_up AS jsonb))",
                        {"p": json.dumps(self._function_fields(record)), "max_uses": admission.max_uses,
                         "revoked": denial(admission.revoked), "used_up": denial(admission.used_up)})
                    verdict = result.get("verdict")
                else:
                    self.append(conn, record)
                    verdict = self._admit_here(conn, record, admission)
                    if verdict is not None:
                        error_class, message = safe_error_message(denials[verdict])
                        self.append(conn, {**use.record(), "event": "finished", "outcome": "denied",
                                           "error_class": error_class, "error_message": message})
        except AuditError:
            raise
        except SQLAlchemyError as exc:
            raise AuditError(
                f"cannot write the audit 'started' row or read the revocations ({exc.__class__.__name__}); the "
                "token was NOT used. Check that the audit database is reachable and writable, then retry"
            ) from None
        return None if verdict is None else denials[verdict]

    def revoke(self, jti: str, reason: str, use: AuditUse) -> None:
        """Revoke the token id ``jti`` for ever, with ``reason``; audited as ``use`` (operation ``revoke``) in
        the same transaction. :class:`AuditError` if it was already revoked or cannot be written."""
        if not reason or not reason.strip():
            raise AuditError("a revocation needs a reason (--reason): it is recorded with it")
        if not jti or len(jti) > 64:
            raise AuditError("the token id to revoke must be the token's jti (at most 64 characters; "
                             "`pseudonymise token inspect` shows it)")
        use.token_jti = jti
        try:
            self.create()
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    result = self._call(conn, f"SELECT {self.revoke_function}(CAST(:p AS jsonb), :jti, :reason)",
                                        {"p": json.dumps(self._function_fields(use.record())), "jti": jti,
                                         "reason": reason.strip()})
                    failed = result["finished"]["outcome"] == "failed"
                else:
                    self.append(conn, {**use.record(), "event": "started", "outcome": "started"})
                    failed = conn.execute(sa.select(self.revoked.c.jti).where(self.revoked.c.jti == jti)).first() \
                        is not None
                    if not failed:
                        conn.execute(self.revoked.insert().values(
                            jti=jti, revoked_at=database_now(conn), revoked_by=use.context.get("triggered_by"),
                            reason=reason.strip(), use_id=use.use_id))
                    finish: dict[str, Any] = {**use.record(), "event": "finished",
                                              "outcome": "failed" if failed else "success"}
                    if failed:
                        finish.update(error_class="AuditError", error_message=f"token {jti} was already revoked")
                    self.append(conn, finish)
        except AuditError:
            raise
        except SQLAlchemyError as exc:
            raise AuditError(f"cannot record the revocation ({exc.__class__.__name__}); the token is NOT revoked. "
                             "Check that the audit database is reachable and that this role may revoke") from None
        if failed:
            raise AuditError(f"token {jti} was already revoked; nothing changed")

    def revocations(self, conn: Connection | None = None) -> list[dict[str, Any]]:
        """Every revoked token id with when, by whom and why, newest first."""
        query = sa.select(self.revoked).order_by(self.revoked.c.revoked_at.desc())
        if conn is not None:
            return [dict(r._mapping) for r in conn.execute(query)]
        with self.engine.connect() as own:
            return [dict(r._mapping) for r in own.execute(query)]

    def admissions(self, conn: Connection | None = None) -> dict[str, int]:
        """The uses let through so far, per token id (the admissions table, where ``max_uses`` is counted)."""
        query = sa.select(self.admitted.c.jti, sa.func.count()).group_by(self.admitted.c.jti)
        if conn is not None:
            return {jti: n for jti, n in conn.execute(query)}
        with self.engine.connect() as own:
            return {jti: n for jti, n in own.execute(query)}

    def start(self, use: AuditUse) -> dict[str, Any]:
        """Commit the ``started`` row of ``use``; raise :class:`AuditError` if it cannot be written."""
        try:
            self.create()
            with self.engine.begin() as conn:
                return self.append(conn, {**use.record(), "event": "started", "outcome": "started"})
        except AuditError:
            raise
        except SQLAlchemyError as exc:
            raise AuditError(
                f"cannot write the audit 'started' row ({exc.__class__.__name__}); the token was NOT used. "
                "Check that the audit database is reachable and writable, then retry"
            ) from exc

    def finish(self, use: AuditUse, outcome: str, conn: Connection | None = None,
               counts: Mapping[str, int] | None = None, error: BaseException | None = None,
               details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append the ``finished`` row; inside ``conn``'s transaction if given, else in its own."""
        if outcome not in OUTCOMES[1:]:
            raise ValueError(f"unknown audit outcome {outcome!r}")
        record: dict[str, Any] = {**use.record(), "event": "finished", "outcome": outcome}
        for key, value in (counts or {}).items():
            column = "rows_null" if key == "nulls" else key
            if column in _INT_FIELDS:
                record[column] = value
        if error is not None:
            record["error_class"], record["error_message"] = safe_error_message(error)
        if details:
            record["details"] = json.dumps(dict(details), sort_keys=True, default=str)
        if conn is not None:
            return self.append(conn, record)
        try:
            self.create()
            with self.engine.begin() as own:
                return self.append(own, record)
        except SQLAlchemyError as exc:
            raise AuditError(
                f"cannot write the audit 'finished' row ({exc.__class__.__name__}); the use stays visible as "
                "'started' without 'finished'. Check the audit database"
            ) from exc

    # --- reading --------------------------------------------------------------------------------
    def iter_rows(self, batch: int = 1000, conn: Connection | None = None) -> Iterator[dict[str, Any]]:
        last = 0
        while True:
            query = sa.select(self.table).where(self.table.c.seq > last).order_by(self.table.c.seq).limit(batch)
            if conn is not None:
                rows = conn.execute(query).mappings().all()
            else:
                with self.engine.connect() as own:
                    rows = own.execute(query).mappings().all()
            if not rows:
                return
            for row in rows:
                yield dict(row)
            last = rows[-1]["seq"]

    def recent(self, limit: int = 20, **filters: Any) -> list[dict[str, Any]]:
        query = sa.select(self.table).order_by(self.table.c.seq.desc()).limit(limit)
        for name, value in filters.items():
            if value is not None:
                query = query.where(self.table.c[name] == value)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def verify(self, conn: Connection | None = None,
               visit: Callable[[Mapping[str, Any]], None] | None = None) -> VerifyResult:
        """Walk the chain and name the first row where it breaks (edited, deleted, inserted or reordered).

        :param conn: read through this connection (its transaction's view) instead of a new one.
        :param visit: called with every row that verified, in order."""
        if conn is None:
            self.create()
        expected_prev, expected_seq, checked = GENESIS, 1, 0
        for row in self.iter_rows(conn=conn):
            seq = row["seq"]
            if seq != expected_seq:
                return VerifyResult(False, checked, expected_seq - 1, seq,
                                    f"row(s) {expected_seq}..{seq - 1} are missing (deleted)")
            if row["prev_hash"] != expected_prev:
                return VerifyResult(False, checked, seq - 1, seq,
                                    "prev_hash does not match the previous row: a row was deleted, inserted or reordered before it")
            if row_hash(row["prev_hash"], row) != row["row_hash"]:
                return VerifyResult(False, checked, seq - 1, seq, "row_hash does not match its content: the row was edited")
            expected_prev, expected_seq, checked = row["row_hash"], seq + 1, checked + 1
            if visit is not None:
                visit(row)
        query = sa.select(self.head.c.seq, self.head.c.row_hash).where(self.head.c.id == 1)
        if conn is not None:
            head = conn.execute(query).first()
        else:
            with self.engine.connect() as own:
                head = own.execute(query).first()
        if head is None or head.seq != expected_seq - 1 or head.row_hash != expected_prev:
            at = expected_seq if head is None or head.seq >= expected_seq else head.seq + 1
            return VerifyResult(False, checked, expected_seq - 1, at,
                                "the chain's head does not match its last row: rows were cut off the end or appended outside the plugin")
        return VerifyResult(True, checked, expected_seq - 1)

    def listed_escrow_batches(self, conn: Connection | None = None, escrow: sa.Table | None = None) -> dict[str, str]:
        """``{batch id: digest}`` of the escrow batches listed by ``success`` rows of the chain, which must
        verify (docs/design.md §5.1); raise :class:`EscrowIntegrityError` naming the break otherwise.

        A batch's first listing is its writer's (in the same transaction as its rows). A later listing of it
        replaces that only when it is an ``erase`` use's (an erasure lists the digest of the rows it left), and
        on PostgreSQL only when the row's ``db_role`` (set by the server) may delete from ``escrow``, the
        values table: the one role that can have changed the batch. Any other later listing, which any role
        that appends can write, is left out: it could otherwise make every genuine row of a batch refused."""
        listed: dict[str, str] = {}
        may_erase = self._erasers(escrow)

        def collect(row: Mapping[str, Any]) -> None:
            if row["outcome"] != "success" or not row["details"]:
                return
            try:
                batches = json.loads(row["details"]).get("escrow_batches")
            except (ValueError, AttributeError):
                return
            if not isinstance(batches, dict):
                return
            for batch_id, digest in batches.items():
                batch_id, digest = str(batch_id), str(digest)
                if batch_id not in listed or (row["operation"] == "erase" and may_erase(row.get("db_role"))):
                    listed[batch_id] = digest

        result = self.verify(conn, visit=collect)
        if not result.ok:
            raise EscrowIntegrityError(
                f"the audit chain does not verify ({result}); escrow cannot be proven, so nothing is revealed. "
                "Run `pseudonymise audit verify` and restore the audit from a backup"
            )
        return listed

    def _erasers(self, escrow: sa.Table | None) -> Callable[[str | None], bool]:
        """Whether an ``erase`` row written by a database role may re-list batches (see
        :meth:`listed_escrow_batches`): on SQLite always (no roles: the file's owner is trusted); on PostgreSQL
        when the role exists and holds DELETE on the escrow values table, asked once per role."""
        if self.engine.dialect.name != "postgresql":
            return lambda role: True
        if escrow is None:
            return lambda role: False
        table = self.engine.dialect.identifier_preparer.format_table(escrow)
        answers: dict[str, bool] = {}

        def may_erase(role: str | None) -> bool:
            if role is None:
                return False
            if role not in answers:
                with self.engine.connect() as own:
                    # by the role's oid: a role since dropped has none, and no privilege
                    answers[role] = bool(own.execute(sa.text(
                        "SELECT has_table_privilege(r.oid, CAST(:t AS regclass), 'DELETE') FROM pg_roles r "
                        "WHERE r.rolname = :r"), {"t": table, "r": role}).scalar())
            return answers[role]

        return may_erase

    def succeeded(self, operation: str, *, dag_id: str, run_id: str, task_id: str, map_index: int) -> str | None:
        """The use id of a successful use of ``operation`` by the task instance (``dag_id``, ``run_id``,
        ``task_id``, ``map_index``) in any earlier try, or ``None``; :class:`AuditError` if the audit cannot be read."""
        t = self.table
        query = (sa.select(t.c.use_id).where(t.c.event == "finished", t.c.outcome == "success",
                                            t.c.operation == operation, t.c.dag_id == dag_id, t.c.run_id == run_id,
                                            t.c.task_id == task_id, t.c.map_index == map_index)
                 .order_by(t.c.seq).limit(1))
        try:
            with self.engine.connect() as conn:
                return conn.execute(query).scalar()
        except SQLAlchemyError as exc:
            raise AuditError(f"cannot read the audit {self.table.fullname!r} ({exc.__class__.__name__}); check that "
                             "the database is reachable and its role may read the audit") from None

    def incomplete_uses(self) -> list[str]:
        """use ids with a ``started`` row and no ``finished`` row (crashed or running tasks)."""
        t = self.table
        finished = sa.select(t.c.use_id).where(t.c.event == "finished")
        query = sa.select(t.c.use_id).where(t.c.event == "started", t.c.use_id.not_in(finished)).order_by(t.c.seq)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

