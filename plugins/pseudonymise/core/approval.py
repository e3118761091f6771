"""Four eyes before any reversal: who asked, who approved, and the stored requests of the HTTP API.

A reversal reveals originals, so it needs two people: the *requester* (who triggered the DAG run, or
who asked through the HTTP API) and an *approver*, who must be someone else. :class:`Approval` is the
proof a reversal carries into its audit row; :func:`require_four_eyes` is the one rule.

Through the HTTP API a reversal is a :class:`ReverseRequests` row: the requester submits the pseudonyms
(stored only as :func:`pseudonym_set_digest`, never the values) with a reason, a second user approves
or rejects it, and the requester executes it once, with the very same pseudonyms, before it expires.
Every step commits with its own audit row in the same transaction. The table lives beside the audit
and is never granted to the pipeline's database role (include/sql/least_privilege.sql), so the role that
can append audit rows still cannot approve a request.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.db import database_now
from pseudonymise.core.errors import ApprovalError, AuditError

#: A request's life: pending → approved | rejected | expired; approved → executing → executed (or back
#: to approved when the reversal fails, so that a failure does not use the approval up).
STATUSES = ("pending", "approved", "rejected", "executing", "executed")


@dataclass(frozen=True)
class Approval:
    """The proof of a second person's approval that a reversal's audit row records (no values, no secret).

    :param via: ``airflow-hitl`` (an ``ApprovalOperator`` of the same DAG run) or ``api-request``.
    :param reference: the approval task id, or the request id.
    """

    requester: str
    approver: str
    reason: str | None
    approved_at: str | None
    via: str
    reference: str
    #: the digest of the pseudonym set the approver was shown (:func:`pseudonym_set_digest`): the reversal must
    #: read exactly that set, or it fails before anything is written (``None``: the request itself is bound)
    pseudonym_set_digest: str | None = None

    def require_set(self, read: PseudonymSet) -> None:
        """The pseudonyms a reversal reads must be the set this approval names (when it names one); else
        :class:`ApprovalError`: the source changed after the approval, or the task reads another set."""
        if self.pseudonym_set_digest is None:
            return
        digest, count = read.digest()
        if digest != self.pseudonym_set_digest:
            raise ApprovalError(
                f"the {count} pseudonym(s) read are not the set that was approved (read {digest[:12]}…, approved "
                f"{self.pseudonym_set_digest[:12]}…): the source changed after the approval, or this is another "
                "set; nothing was written or revealed. Ask again, for the pseudonyms to reveal")

    def details(self) -> dict[str, Any]:
        four_eyes = {"requester": self.requester, "approver": self.approver, "reason": self.reason,
                     "approved_at": self.approved_at, "via": self.via, "reference": self.reference}
        if self.pseudonym_set_digest is not None:
            four_eyes["pseudonym_set_digest"] = self.pseudonym_set_digest
        return {"four_eyes": four_eyes}


def same_person(a: str, b: str) -> bool:
    """User names compared as identity providers compare them: case-insensitively, trimmed."""
    return a.strip().casefold() == b.strip().casefold()


def require_four_eyes(requester: str | None, approver: str | None, *, what: str) -> None:
    """The rule: a named requester and a named approver who is not the requester; else :class:`ApprovalError`."""
    if not requester or not requester.strip():
        raise ApprovalError(f"{what} has no requester to hold to four eyes (a run must be triggered by a person, "
                            "not by the scheduler); trigger the run as the person who asks for the originals")
    if not approver or not approver.strip():
        raise ApprovalError(f"{what} has no recorded approval; a second person must approve it first")
    if same_person(requester, approver):
        raise ApprovalError(f"{what} was approved by its own requester {requester!r}; four eyes needs a second "
                            "person: ask another user with the approval permission to approve it")


def pseudonym_set_digest(columns: Sequence[str], batch: Mapping[str, Sequence[Any]]) -> tuple[str, int]:
    """SHA-256 (hex) of the set of ``(column, pseudonym)`` pairs of ``batch`` (NULLs left out), and its size.

    Order and repetition do not matter: the same pseudonyms asked again in another order give the same digest.
    """
    pairs = PseudonymSet(columns)
    pairs.add(batch)
    return pairs.digest()


class PseudonymSet:
    """The ``(column, pseudonym)`` pairs of a stream of batches, for :func:`pseudonym_set_digest` over all of them."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self._pairs: set[tuple[str, str]] = set()

    def add(self, batch: Mapping[str, Sequence[Any]]) -> None:
        self._pairs.update((c, str(v)) for c in self.columns for v in batch.get(c, ()) if v is not None)

    def digest(self) -> tuple[str, int]:
        text = json.dumps(sorted(self._pairs), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest(), len(self._pairs)


#: How an approval names the pseudonyms it approves: a line of the approval's text (an ``ApprovalOperator``'s
#: body), which :class:`~pseudonymise.operators.PseudonymSetDigestOperator` gives as ``line``.
SET_DIGEST_LABEL = "pseudonym set digest:"
_SET_DIGEST = re.compile(re.escape(SET_DIGEST_LABEL) + r"\s*([0-9a-f]{64})\b")


def approved_set_digest(text: str | None, *, what: str) -> str:
    """The one pseudonym-set digest an approval's ``text`` names; :class:`ApprovalError` when it names none, or
    more than one (a requester's reason quoting another set's digest cannot be the one that counts)."""
    found = set(_SET_DIGEST.findall(text or ""))
    if not found:
        raise ApprovalError(
            f"{what} does not name the pseudonyms it approves: its text holds no '{SET_DIGEST_LABEL} <sha-256>'. "
            "Put a PseudonymSetDigestOperator on the same source upstream of the ApprovalOperator and show its "
            "line in the body (body=\"... {{ ti.xcom_pull(task_ids='digest_requests')['line'] }}\"), so the "
            "approver sees what is revealed and the reversal reads exactly that")
    if len(found) > 1:
        raise ApprovalError(
            f"{what} names {len(found)} different pseudonym sets ('{SET_DIGEST_LABEL}' appears with different "
            "digests, one of them perhaps in the requester's own text): it approves no one set; ask again")
    return found.pop()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat()


class ReverseRequests:
    """The reversal requests of the HTTP API, in the audit database, each step audited.

    :param audit: the audit log of the database (its engine, metadata and schema are used).
    :param ttl: how long a pending request waits for approval, and how long an approved one may be executed.
    """

    TABLE = "pseudonymise_reverse_request"

    def __init__(self, audit: AuditLog, ttl: timedelta = timedelta(hours=24)) -> None:
        self.audit, self.ttl = audit, ttl
        self.engine: Engine = audit.engine
        self.table = self.define(audit.metadata, audit.table.schema)

    @classmethod
    def define(cls, metadata: sa.MetaData, schema: str | None) -> sa.Table:
        key = f"{schema}.{cls.TABLE}" if schema else cls.TABLE
        if key in metadata.tables:
            return metadata.tables[key]
        return sa.Table(
            cls.TABLE, metadata,
            sa.Column("request_id", sa.String(36), primary_key=True),
            sa.Column("connection_id", sa.String(250), nullable=False),
            sa.Column("columns", sa.Text, nullable=False),
            sa.Column("pseudonym_digest", sa.String(64), nullable=False),
            sa.Column("pseudonyms", sa.Integer, nullable=False),
            sa.Column("require_all", sa.Boolean, nullable=False),
            sa.Column("requester", sa.String(250), nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("decided_by", sa.String(250)),
            sa.Column("decided_at", sa.DateTime(timezone=True)),
            sa.Column("comment", sa.Text),
            sa.Column("executed_at", sa.DateTime(timezone=True)),
            sa.Column("use_id", sa.String(36)),
            schema=schema,
        )

    def create(self) -> None:
        try:
            self.audit.create()
            self.table.create(self.engine, checkfirst=True)
        except sa.exc.SQLAlchemyError as exc:
            raise AuditError(f"cannot create the reversal request table ({exc.__class__.__name__}); check the "
                             "audit database and that this role may create it (or run the owner's setup)") from None

    # --- steps ----------------------------------------------------------------------------------
    def submit(self, *, connection_id: str, columns: Sequence[str], batch: Mapping[str, Sequence[Any]],
               requester: str, reason: str, require_all: bool = False) -> dict[str, Any]:
        """Store a pending request for the pseudonyms in ``columns`` of ``batch``; audited ``reverse_request``."""
        reason = (reason or "").strip()
        if not reason:
            raise ApprovalError('a reversal request needs a "reason": the approver decides on it and the audit '
                                "records it")
        if len(reason) > 2000:
            raise ApprovalError('"reason" is longer than 2,000 characters; say why in fewer words')
        digest, count = pseudonym_set_digest(columns, batch)
        if count == 0:
            raise ApprovalError("the request names no pseudonyms (every value of the named columns is empty)")
        row: dict[str, Any] = {
            "request_id": str(uuid.uuid4()), "connection_id": connection_id, "columns": json.dumps(list(columns)),
            "pseudonym_digest": digest, "pseudonyms": count, "require_all": bool(require_all),
            "requester": requester, "reason": reason, "status": "pending"}
        with self._transaction() as conn:
            now = database_now(conn)
            row.update(created_at=now, expires_at=now + self.ttl)
            conn.execute(self.table.insert().values(**row))
            self._audit(conn, "reverse_request", requester, row, "success")
        return self._public(row)

    def decide(self, request_id: str, *, user: str, approve: bool, comment: str | None = None) -> dict[str, Any]:
        """Approve or reject a pending request as ``user``, who must not be its requester."""
        operation = "reverse_approve" if approve else "reverse_reject"
        with self._transaction() as conn:
            row = self._locked(conn, request_id)
            now = database_now(conn)
            problem = self._expired(row, now) or (
                None if row["status"] == "pending" else
                ApprovalError(f"reversal request {request_id} is {row['status']}, not pending; only a pending request "
                              "can be approved or rejected"))
            if problem is None:
                try:
                    require_four_eyes(row["requester"], user, what=f"reversal request {request_id}")
                except ApprovalError as exc:
                    problem = exc
            if problem is not None:
                self._audit(conn, operation, user, row, "denied", error=problem)
                refusal = problem
            else:
                values = {"status": "approved" if approve else "rejected", "decided_by": user, "decided_at": now,
                          "comment": (comment or "").strip()[:2000] or None,
                          "expires_at": now + self.ttl if approve else row["expires_at"]}
                conn.execute(sa.update(self.table).where(self.table.c.request_id == request_id).values(**values))
                row.update(values)
                self._audit(conn, operation, user, row, "success")
                refusal = None
        if refusal is not None:
            raise refusal
        return self._public(row)

    def claim(self, request_id: str, *, connection_id: str, user: str, columns: Sequence[str],
              batch: Mapping[str, Sequence[Any]]) -> Approval:
        """Take an approved request for execution by its requester with the very pseudonyms approved.

        It becomes ``executing`` (so a second, concurrent execution is refused); :meth:`executed` or
        :meth:`release` ends that. A refusal is audited ``denied`` as ``reverse`` and raised.
        """
        digest, _ = pseudonym_set_digest(columns, batch)
        with self._transaction() as conn:
            row = self._locked(conn, request_id)
            now = database_now(conn)
            problem = self._expired(row, now)
            if problem is None:
                problem = self._execution_problem(row, connection_id, user, columns, digest)
            if problem is None:
                conn.execute(sa.update(self.table).where(self.table.c.request_id == request_id)
                             .values(status="executing"))
            else:
                self._audit(conn, "reverse", user, row, "denied", error=problem)
        if problem is not None:
            raise problem
        return Approval(requester=row["requester"], approver=row["decided_by"], reason=row["reason"],
                        approved_at=_iso(row["decided_at"]), via="api-request", reference=request_id)

    def executed(self, request_id: str, use_id: str) -> None:
        """The claimed request's reversal committed as audit use ``use_id``: it can never run again."""
        with self._transaction() as conn:
            conn.execute(sa.update(self.table).where(self.table.c.request_id == request_id,
                                                     self.table.c.status == "executing")
                         .values(status="executed", executed_at=database_now(conn), use_id=use_id))

    def release(self, request_id: str) -> None:
        """The claimed request's reversal failed (nothing was revealed): it may be executed again until it expires."""
        with self._transaction() as conn:
            conn.execute(sa.update(self.table).where(self.table.c.request_id == request_id,
                                                     self.table.c.status == "executing").values(status="approved"))

    # --- reading --------------------------------------------------------------------------------
    def get(self, request_id: str) -> dict[str, Any]:
        self._check_id(request_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.request_id == request_id)).mappings().first()
            if row is None:
                raise ApprovalError(f"there is no reversal request {request_id!r}; list them with GET "
                                    "/pseudonymise/api/v1/reverse-requests")
            return self._public(dict(row), database_now(conn))

    def list(self, *, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Requests newest first, each with its ``state`` (``expired`` for one past its deadline)."""
        query = sa.select(self.table).order_by(self.table.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            now = database_now(conn)
            rows = [self._public(dict(r), now) for r in conn.execute(query).mappings()]
        return [r for r in rows if status is None or r["state"] == status]

    # --- helpers --------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction on the audit database; a database failure is an :class:`AuditError` (nothing changed)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise AuditError(f"cannot record the reversal request step ({exc.__class__.__name__}); nothing changed. "
                             "Check the audit database, that `pseudonymise` created the request table, and this "
                             "role's grants") from None

    @staticmethod
    def _check_id(request_id: str) -> None:
        try:
            uuid.UUID(request_id)
        except (ValueError, AttributeError, TypeError):
            raise ApprovalError(f"{request_id!r} is not a reversal request id (a UUID)") from None

    def _locked(self, conn: Connection, request_id: str) -> dict[str, Any]:
        self._check_id(request_id)
        query = sa.select(self.table).where(self.table.c.request_id == request_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        else:  # SQLite: take the write lock before reading, so two executions cannot both see "approved"
            conn.execute(sa.update(self.table).where(self.table.c.request_id == request_id)
                         .values(status=self.table.c.status))
        row = conn.execute(query).mappings().first()
        if row is None:
            raise ApprovalError(f"there is no reversal request {request_id}; list them with GET "
                                "/pseudonymise/api/v1/reverse-requests")
        return dict(row)

    @staticmethod
    def _aware(value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    def _expired(self, row: Mapping[str, Any], now: datetime) -> ApprovalError | None:
        if row["status"] in ("pending", "approved") and self._aware(row["expires_at"]) <= now:
            return ApprovalError(f"reversal request {row['request_id']} expired at {_iso(row['expires_at'])} "
                                 f"while {row['status']}; submit a new request")
        return None

    @staticmethod
    def _execution_problem(row: Mapping[str, Any], connection_id: str, user: str, columns: Sequence[str],
                           digest: str) -> ApprovalError | None:
        rid = row["request_id"]
        if row["status"] != "approved":
            hint = {"pending": "it waits for a second person's approval",
                    "rejected": f"it was rejected by {row['decided_by']}",
                    "executing": "it is being executed right now",
                    "executed": "it was executed already; a request reveals once"}.get(row["status"], "")
            return ApprovalError(f"reversal request {rid} is {row['status']}, not approved: {hint}")
        if not same_person(row["requester"], user):
            return ApprovalError(f"reversal request {rid} was made by another user; only its requester may "
                                 "execute it")
        if row["connection_id"] != connection_id:
            return ApprovalError(f"reversal request {rid} is for connection {row['connection_id']!r}, not "
                                 f"{connection_id!r}")
        if json.loads(row["columns"]) != list(columns) or row["pseudonym_digest"] != digest:
            return ApprovalError(f"the pseudonyms sent are not those approved in request {rid} (the columns or the "
                                 "set of pseudonyms differ); send exactly the approved ones, or submit a new request")
        return None

    def _audit(self, conn: Connection, operation: str, user: str, row: Mapping[str, Any], outcome: str,
               error: BaseException | None = None) -> None:
        use = AuditUse(operation=operation, source=f"api:{row['connection_id']}",
                       columns=json.loads(row["columns"]), context={"triggered_by": user})
        details = {"request_id": row["request_id"], "requester": row["requester"], "reason": row["reason"],
                   "pseudonyms": row["pseudonyms"], "approver": row.get("decided_by"), "status": row["status"]}
        self.audit.append(conn, {**use.record(), "event": "started", "outcome": "started"})
        self.audit.finish(use, outcome, conn=conn, error=error, details=details)

    def _public(self, row: Mapping[str, Any], now: datetime | None = None) -> dict[str, Any]:
        state = row["status"]
        if now is not None and state in ("pending", "approved") and self._aware(row["expires_at"]) <= now:
            state = "expired"
        return {
            "request_id": row["request_id"], "connection_id": row["connection_id"],
            "columns": json.loads(row["columns"]), "pseudonyms": row["pseudonyms"],
            "pseudonym_digest": row["pseudonym_digest"], "require_all": bool(row["require_all"]),
            "requester": row["requester"], "reason": row["reason"], "status": row["status"], "state": state,
            "created_at": _iso(row["created_at"]), "expires_at": _iso(row["expires_at"]),
            "decided_by": row.get("decided_by"), "decided_at": _iso(row.get("decided_at")),
            "comment": row.get("comment"), "executed_at": _iso(row.get("executed_at")), "use_id": row.get("use_id"),
        }
