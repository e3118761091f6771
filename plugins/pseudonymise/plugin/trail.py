"""Reading the audit trail for the pages and the API: filters, token uses, tokens, daily counts.

A *use* is the pair of rows one token use writes: its ``started`` row and, unless it crashed or
is still running, its ``finished`` row. Every query is limited to what the user may see
(:class:`~pseudonymise.plugin.access.DagScope`) and runs on the audit connection's engine.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from pseudonymise.core.audit import VerifyResult
from pseudonymise.core.pipeline import Store
from pseudonymise.plugin.access import DagScope

#: Outcomes a filter may ask for: a use's final outcome, or ``incomplete`` (started, never finished).
USE_OUTCOMES = ("success", "failed", "denied", "incomplete")
OPERATIONS = ("pseudonymise", "secondary", "reverse", "reverse_request", "reverse_approve", "reverse_reject", "rekey",
              "purge", "verify", "revoke", "retire", "erase", "dry_run", "risk_report")
_VERIFY_TTL_SECONDS = 60.0
_verified: dict[tuple[str, str], tuple[float, tuple[Any, ...], VerifyResult]] = {}
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class TrailFilter:
    """What the audit page and ``GET /api/v1/audit`` filter on; ``None`` means any."""

    project: str | None = None
    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    map_index: int | None = None
    operation: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    use_id: str | None = None
    token_jti: str | None = None

    def query_items(self) -> list[tuple[str, str]]:
        """The filter as URL query items (for pagination links)."""
        items = []
        for name in ("project", "dag_id", "task_id", "run_id", "map_index", "operation", "outcome", "use_id",
                     "token_jti"):
            value = getattr(self, name)
            if value is not None:
                items.append((name, str(value)))
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                items.append((name, value.strftime("%Y-%m-%dT%H:%M:%S")))
        return items


@dataclass
class Use:
    """One token use: its ``started`` row and its ``finished`` row (``None`` while incomplete)."""

    started: dict[str, Any]
    finished: dict[str, Any] | None = None

    @property
    def outcome(self) -> str:
        return self.finished["outcome"] if self.finished else "incomplete"

    @property
    def last(self) -> dict[str, Any]:
        return self.finished or self.started


@dataclass
class TokenSummary:
    """Everything the audit knows about one token (by ``jti``); never the token itself."""

    jti: str
    project: str | None
    projects_seen: int
    kind: str | None
    issuer: str | None
    first_use: datetime
    last_use: datetime
    uses: int
    outcomes: dict[str, int]
    expired_uses: int
    expires_at: datetime | None
    retention_until: datetime | None
    state: str = "unknown"  # valid | expiring | expired | unknown
    #: Known only from what refused uses *claimed* (their token never verified): jti, project, kind and
    #: issuer are unverified labels.
    claimed: bool = False
    #: The token's ``max_uses`` (v1.1) and its uses that were let through (the admissions table; without it, the
    #: audit's uses that were not denied), so the uses left.
    max_uses: int | None = None
    admitted: int = 0
    #: When, by whom and why it was revoked (the revocation table), if it was.
    revoked: dict[str, Any] | None = None

    @property
    def uses_left(self) -> int | None:
        """``None``: no limit but the token's lifetime."""
        return None if self.max_uses is None else max(self.max_uses - self.admitted, 0)

    def classify(self, now: datetime, warning: timedelta) -> None:
        if self.expires_at is None:
            self.state = "unknown"
        elif self.expires_at <= now:
            self.state = "expired"
        elif self.expires_at <= now + warning:
            self.state = "expiring"
        else:
            self.state = "valid"


@dataclass
class ProjectEscrow:
    project: str
    values: int
    retention_from: datetime | None
    retention_to: datetime | None


@dataclass
class DailyUses:
    day: date
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _instant(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Trail:
    """Read-only queries over one store's audit (and escrow) tables, for one user's scope."""

    def __init__(self, store: Store, scope: DagScope) -> None:
        self.store = store
        self.table = store.audit.table
        self.scope = scope

    # --- filters --------------------------------------------------------------------------------
    def _conditions(self, t: sa.Table, flt: TrailFilter) -> list[sa.ColumnElement[bool]]:
        conds = [self.scope.clause(t.c.dag_id)]
        for name in ("project", "dag_id", "task_id", "run_id", "operation", "use_id", "token_jti"):
            value = getattr(flt, name)
            if value is not None:
                conds.append(t.c[name] == value)
        if flt.map_index is not None:
            conds.append(t.c.map_index == flt.map_index)
        if flt.since is not None:
            conds.append(t.c.recorded_at >= flt.since)
        if flt.until is not None:
            conds.append(t.c.recorded_at < flt.until)
        return conds

    def _finished(self, use_id: sa.ColumnElement[Any], outcome: str | None = None) -> sa.Exists:
        f = self.table.alias("f")
        conds = [f.c.use_id == use_id, f.c.event == "finished"]
        if outcome is not None:
            conds.append(f.c.outcome == outcome)
        return sa.exists().where(*conds)

    # --- uses and rows --------------------------------------------------------------------------
    def uses(self, flt: TrailFilter, offset: int = 0, limit: int = 50) -> tuple[int, list[Use]]:
        """Token uses matching ``flt``, newest first: (total, one page)."""
        t = self.table
        conds = [t.c.event == "started", *self._conditions(t, flt)]
        if flt.outcome == "incomplete":
            conds.append(~self._finished(t.c.use_id))
        elif flt.outcome is not None:
            conds.append(self._finished(t.c.use_id, flt.outcome))
        with self.store.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(t).where(*conds)).scalar_one()
            started = [dict(r) for r in conn.execute(
                sa.select(t).where(*conds).order_by(t.c.seq.desc()).offset(offset).limit(limit)).mappings()]
            ids = [r["use_id"] for r in started]
            finished = {r["use_id"]: dict(r) for r in conn.execute(
                sa.select(t).where(t.c.use_id.in_(ids), t.c.event == "finished")).mappings()} if ids else {}
        return total, [Use(r, finished.get(r["use_id"])) for r in started]

    def rows(self, flt: TrailFilter, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Audit rows matching ``flt``, newest first; ``outcome`` matches the row's own outcome
        (``started`` for started rows), or ``incomplete`` for started rows never finished."""
        t = self.table
        conds = self._conditions(t, flt)
        if flt.outcome == "incomplete":
            conds += [t.c.event == "started", ~self._finished(t.c.use_id)]
        elif flt.outcome is not None:
            conds.append(t.c.outcome == flt.outcome)
        query = sa.select(t).where(*conds).order_by(t.c.seq.desc()).offset(offset).limit(limit)
        with self.store.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    # --- tokens and projects --------------------------------------------------------------------
    def tokens(self, now: datetime, warning: timedelta) -> list[TokenSummary]:
        t = self.table
        finished = t.c.event == "finished"

        def count(cond: sa.ColumnElement[bool]) -> Any:
            return sa.func.sum(sa.case((cond, 1), else_=0))

        def claim(column: sa.ColumnElement[Any]) -> Any:
            # As the verified token said (rows with its expiry), else as a refused use claimed it.
            verified = sa.func.max(sa.case((t.c.token_expires_at.is_not(None), column)))
            return sa.func.coalesce(verified, sa.func.max(column))

        query = (
            sa.select(
                t.c.token_jti, claim(t.c.project), sa.func.count(sa.distinct(t.c.project)),
                claim(t.c.token_kind), claim(t.c.token_issuer),
                sa.func.min(t.c.recorded_at), sa.func.max(t.c.recorded_at), sa.func.count(sa.distinct(t.c.use_id)),
                count(finished & (t.c.outcome == "success")), count(finished & (t.c.outcome == "failed")),
                count(finished & (t.c.outcome == "denied")), count(finished & (t.c.error_class == "TokenExpiredError")),
                sa.func.max(t.c.token_expires_at), sa.func.max(t.c.retention_until), sa.func.max(t.c.token_max_uses),
            )
            .where(t.c.token_jti.is_not(None), self.scope.clause(t.c.dag_id))
            .group_by(t.c.token_jti)
            .order_by(sa.func.max(t.c.recorded_at).desc())
        )
        out = []
        with self.store.engine.connect() as conn:
            for (jti, project, projects, kind, issuer, first, last, uses, ok, failed, denied, expired,
                 expires, retention, max_uses) in conn.execute(query):
                summary = TokenSummary(
                    jti=jti, project=project, projects_seen=projects, kind=kind, issuer=issuer,
                    first_use=first, last_use=last, uses=uses,
                    outcomes={"success": ok or 0, "failed": failed or 0, "denied": denied or 0},
                    expired_uses=expired or 0, expires_at=_instant(expires), retention_until=_instant(retention),
                    max_uses=max_uses, admitted=uses - (denied or 0))
                summary.classify(now, warning)
                out.append(summary)
            out += self._claimed_tokens(conn, {s.jti for s in out}, now, warning)
        revoked, admitted = self.revocations(), self.admissions()
        for summary in out:
            summary.revoked = revoked.get(summary.jti)
            if admitted is not None and not summary.claimed:
                summary.admitted = admitted.get(summary.jti, 0)
        return sorted(out, key=lambda s: s.last_use, reverse=True)

    def admissions(self) -> dict[str, int] | None:
        """Uses let through per token id, as the start function counts them for ``max_uses``; ``None`` when
        the admissions table cannot be read (an audit made before it existed, or a role without SELECT on it:
        the page then counts the audit's uses that were not denied)."""
        try:
            return self.store.audit.admissions()
        except SQLAlchemyError:
            return None

    def revocations(self) -> dict[str, dict[str, Any]]:
        """Revoked token ids with when, by whom and why; empty when the revocation table cannot be read (an
        audit made before revocation existed, read by a role that may not create it)."""
        try:
            return {r["jti"]: r for r in self.store.audit.revocations()}
        except SQLAlchemyError:
            return {}

    def _claimed_tokens(self, conn: Connection, known: set[str], now: datetime,
                        warning: timedelta) -> list[TokenSummary]:
        """Tokens seen only in refused uses, by the jti they claimed (the ``claimed`` column: unverified)."""
        t = self.table
        query = (sa.select(t.c.use_id, t.c.claimed, t.c.project, t.c.recorded_at, t.c.error_class)
                 .where(t.c.token_jti.is_(None), t.c.claimed.is_not(None), t.c.event == "finished",
                        self.scope.clause(t.c.dag_id)))
        found: dict[str, TokenSummary] = {}
        for row in conn.execute(query):
            try:
                claims = json.loads(row.claimed)
            except ValueError:
                continue
            jti = claims.get("jti") if isinstance(claims, dict) else None
            if not isinstance(jti, str) or not jti or jti in known:
                continue
            summary = found.get(jti)
            if summary is None:
                summary = found[jti] = TokenSummary(
                    jti=jti, project=claims.get("sub") or row.project, projects_seen=1, kind=claims.get("kind"),
                    issuer=claims.get("iss"), first_use=row.recorded_at, last_use=row.recorded_at, uses=0,
                    outcomes={"success": 0, "failed": 0, "denied": 0}, expired_uses=0, expires_at=None,
                    retention_until=None, claimed=True)
            summary.uses += 1
            summary.outcomes["denied"] += 1
            summary.expired_uses += row.error_class == "TokenExpiredError"
            summary.first_use, summary.last_use = min(summary.first_use, row.recorded_at), max(summary.last_use, row.recorded_at)
        for summary in found.values():
            summary.classify(now, warning)
        return list(found.values())

    def escrow_by_project(self) -> list[ProjectEscrow]:
        """Sealed values held per project and when their retention ends (counts only, never a value)."""
        v = self.store.escrow.values
        query = (sa.select(v.c.project, sa.func.count(), sa.func.min(v.c.retention_until), sa.func.max(v.c.retention_until))
                 .group_by(v.c.project).order_by(v.c.project))
        with self.store.engine.connect() as conn:
            return [ProjectEscrow(p, n, lo, hi) for p, n, lo, hi in conn.execute(query)]

    # --- charts ---------------------------------------------------------------------------------
    def daily_uses(self, since: datetime, until: datetime) -> list[DailyUses]:
        """Uses per day (of their start, UTC) by final outcome, every day of the midnight-aligned
        window present (see :func:`window`)."""
        t = self.table
        f = t.alias("f")
        query = (
            sa.select(t.c.recorded_at, f.c.outcome)
            .select_from(t.outerjoin(f, sa.and_(f.c.use_id == t.c.use_id, f.c.event == "finished")))
            .where(t.c.event == "started", t.c.recorded_at >= since, t.c.recorded_at < until,
                   self.scope.clause(t.c.dag_id))
        )
        days: dict[date, DailyUses] = {}
        day = since.date()
        while day < until.date():
            days[day] = DailyUses(day)
            day += timedelta(days=1)
        with self.store.engine.connect() as conn:
            for recorded_at, outcome in conn.execute(query):
                bucket = days.setdefault(recorded_at.date(), DailyUses(recorded_at.date()))
                key = outcome or "incomplete"
                bucket.counts[key] = bucket.counts.get(key, 0) + 1
        return [days[d] for d in sorted(days)]

    def rows_by_project(self, since: datetime, until: datetime) -> list[tuple[str, int, int]]:
        """(project, rows pseudonymised, values pseudonymised) of successful (secondary) pseudonymisations."""
        t = self.table
        query = (
            sa.select(t.c.project, sa.func.sum(t.c.rows_out), sa.func.sum(t.c.values_pseudonymised))
            .where(t.c.event == "finished", t.c.outcome == "success", t.c.operation.in_(("pseudonymise", "secondary")),
                   t.c.recorded_at >= since, t.c.recorded_at < until, self.scope.clause(t.c.dag_id))
            .group_by(t.c.project)
        )
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        with self.store.engine.connect() as conn:
            for project, rows, values in conn.execute(query):
                totals[project or "(none)"][0] += int(rows or 0)
                totals[project or "(none)"][1] += int(values or 0)
        return sorted(((p, r, v) for p, (r, v) in totals.items()), key=lambda x: (-x[1], x[0]))

    # --- verification ---------------------------------------------------------------------------
    def verify(self) -> tuple[VerifyResult, float]:
        """The chain's verification and when it ran (epoch seconds). It reads every row, so a result is
        reused for up to a minute while the chain's head stays the same; any append re-runs it."""
        head_table = self.store.audit.head
        with self.store.engine.connect() as conn:
            head = tuple(conn.execute(sa.select(head_table.c.seq, head_table.c.row_hash)).first() or ())
        key = (self.store.engine.url.render_as_string(hide_password=True), self.table.fullname)
        now = time.time()
        with _verified_lock:
            cached = _verified.get(key)
        if cached and cached[1] == head and now - cached[0] < _VERIFY_TTL_SECONDS:
            return cached[2], cached[0]
        result = self.store.audit.verify()
        with _verified_lock:
            _verified[key] = (now, head, result)
        return result, now


@dataclass(frozen=True)
class RiskEntry:
    """A risk report or a run's risk gate, as the audit's ``finished`` row recorded it: counts only."""

    use_id: str
    recorded_at: datetime
    operation: str
    outcome: str
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    source: str | None
    figures: dict[str, Any]


#: Operations whose ``finished`` rows may carry risk figures in their details.
RISK_OPERATIONS = ("risk_report", "pseudonymise", "secondary", "dry_run")


def risk_entries(store: Store, scope: DagScope, limit: int = 20, scan: int = 500) -> tuple[list[RiskEntry],
                                                                                       list[RiskEntry]]:
    """(the latest risk reports, the latest runs with a risk gate or a dry run's risk figures), newest first,
    among the last ``scan`` finished rows of those operations the user may see."""
    t = store.audit.table
    query = (sa.select(t.c.use_id, t.c.recorded_at, t.c.operation, t.c.outcome, t.c.dag_id, t.c.task_id,
                       t.c.run_id, t.c.source, t.c.details)
             .where(t.c.event == "finished", t.c.operation.in_(RISK_OPERATIONS), t.c.details.is_not(None),
                    scope.clause(t.c.dag_id))
             .order_by(t.c.seq.desc()).limit(scan))
    reports: list[RiskEntry] = []
    gates: list[RiskEntry] = []
    with store.engine.connect() as conn:
        for row in conn.execute(query):
            try:
                details = json.loads(row.details)
            except ValueError:
                continue
            figures = details.get("risk_report") if row.operation == "risk_report" else (
                (details.get("dry_run") or {}).get("risk") if row.operation == "dry_run" else details.get("risk"))
            if not isinstance(figures, dict):
                continue
            recorded = row.recorded_at if row.recorded_at.tzinfo else row.recorded_at.replace(tzinfo=UTC)
            entry = RiskEntry(row.use_id, recorded, row.operation, row.outcome, row.dag_id, row.task_id, row.run_id,
                              row.source, figures)
            target = reports if row.operation == "risk_report" else gates
            if len(target) < limit:
                target.append(entry)
    return reports, gates


@dataclass(frozen=True)
class CheckpointView:
    """The audit's latest signed checkpoint and the latest one a witness accepted (rows of
    ``<audit table>_checkpoint``); ``readable`` is False when the role may not read that table."""

    latest: dict[str, Any] | None
    witnessed: dict[str, Any] | None
    readable: bool = True


def latest_checkpoints(store: Store) -> CheckpointView:
    """What the audit page shows of the signed checkpoints (docs/design.md §6.1); checking them against a witness is
    ``pseudonymise audit verify --witness``'s job."""
    from pseudonymise.core.checkpoint import CheckpointTable

    table = CheckpointTable(store.audit)
    try:
        latest = table.latest()
        witnessed = latest if latest is None or latest["witnessed_by"] else table.latest(witnessed=True)
    except sa.exc.SQLAlchemyError:
        return CheckpointView(None, None, readable=False)
    return CheckpointView(latest, witnessed)


def window(days: int, now: datetime) -> tuple[datetime, datetime]:
    """The last ``days`` whole UTC days up to and including today."""
    end = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return end - timedelta(days=days), end


def distinct_values(store: Store, scope: DagScope, column: str, limit: int = 200) -> Sequence[str]:
    """Values seen in an audit column, for the filter drop-downs."""
    t = store.audit.table
    query = (sa.select(t.c[column]).where(t.c[column].is_not(None), scope.clause(t.c.dag_id))
             .group_by(t.c[column]).order_by(t.c[column]).limit(limit))
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(query)]
