"""One audited use of a token: ``started`` committed, token verified, outcome recorded.

Every entry point (CLI, operators, HTTP API) goes through :class:`TokenUse`, so no token is
ever used without its ``started`` row, and denied uses (bad signature, expired, wrong kind or
project) are audited like any other.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.db import database_now
from pseudonymise.core.errors import AuditError, RetentionEndedError, TokenError
from pseudonymise.core.tokens import Token, TrustedKeys, fingerprint, peek_claims, verify_token


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def current_user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None


class TokenUse:
    """Context manager around one use of ``raw_token`` for ``operation``.

    On entry: the token is verified (nothing is used yet), then the ``started`` row is committed with
    the verified facts, or with only what the token *claimed* when it failed (or :class:`AuditError`
    is raised and the token is not used); a :class:`TokenError` (including a reverse token past its
    retention end by the database's clock) is then audited as ``denied`` and re-raised. On exit: ``failed`` if an exception escaped, else ``success`` unless
    :meth:`succeed` already recorded it (typically inside the data's own transaction).
    """

    def __init__(self, audit: AuditLog, operation: str, raw_token: str | None, keys: TrustedKeys, *,
                 kind: str | None, project: str | None = None, source: str | None = None,
                 target: str | None = None, columns: Sequence[str] | None = None,
                 context: Mapping[str, Any] | None = None,
                 on_finished: Callable[[AuditLog], None] | None = None) -> None:
        """:param on_finished: called with the audit log once the use's ``finished`` row is committed (for
            instance to write a signed checkpoint of the chain's head); not called for a crashed use."""
        self.audit = audit
        self.on_finished = on_finished
        self.raw = raw_token
        self.keys = keys
        self.kind = kind
        self.project = project
        self.use = AuditUse(
            operation=operation,
            project=project,
            # of the stripped token, as Token.fingerprint and `token inspect` show it: a fact about the
            # string presented, whatever it claims
            token_fingerprint=fingerprint(raw_token.strip()) if raw_token else None,
            source=source,
            target=target,
            columns=columns,
            context=dict(context or {}),
        )
        self.token: Token | None = None
        self.counts: dict[str, int] = {}
        self.details: dict[str, Any] = {}
        self._finished = False
        self._succeeded_in_transaction = False

    @property
    def use_id(self) -> str:
        return self.use.use_id

    def __enter__(self) -> TokenUse:
        denial: TokenError | None = None
        verified: Token | None = None
        if self.raw is not None:
            # Checked before the started row so that the row holds verified facts; a token that fails
            # verification leaves only what it *claimed*, in the ``claimed`` column (DESIGN.md §6). The
            # token is handed out (``self.token``) only once the started row is committed.
            try:
                verified = verify_token(self.raw, self.keys, kind=self.kind, project=self.project)
            except TokenError as exc:
                denial = exc
                self.use.claimed = peek_claims(self.raw) or None
        if verified is not None:
            self._record_verified(verified)
        self.audit.start(self.use)
        if verified is not None and verified.kind == "reverse":
            denial = self._retention_on_database_clock(verified)
        if denial is None:
            self.token = verified
        else:
            self.audit.finish(self.use, "denied", error=denial)
            self._finished = True
            if self.on_finished is not None:
                self.on_finished(self.audit)
            raise denial
        return self

    def _record_verified(self, token: Token) -> None:
        self.use.project = token.project
        self.use.token_jti = token.jti
        self.use.token_kind = token.kind
        self.use.token_issuer = token.issuer
        self.use.token_expires_at = _instant(token.expires)
        self.use.retention_until = _instant(token.retention_until)

    def _retention_on_database_clock(self, token: Token) -> TokenError | None:
        """Retention is judged by the audit database's clock, not the worker's (DESIGN.md §5.1): a worker
        whose clock is set back cannot reverse past the retention end."""
        try:
            with self.audit.engine.connect() as conn:
                now = database_now(conn)
        except SQLAlchemyError as exc:
            raise AuditError(
                f"cannot read the audit database's clock ({exc.__class__.__name__}); the token was NOT used"
            ) from None
        if now >= token.retention_until:
            return RetentionEndedError(
                f"project {token.project!r}'s retention ended at {_instant(token.retention_until)} by the database's "
                "clock; reversal is impossible for ever"
            )
        return None

    def succeed(self, conn: Connection | None = None, counts: Mapping[str, int] | None = None,
                details: Mapping[str, Any] | None = None) -> None:
        """Record ``success`` now, in ``conn``'s transaction when given (data and audit commit together)."""
        if counts:
            self.counts.update(counts)
        if details:
            self.details.update(details)
        self.audit.finish(self.use, "success", conn=conn, counts=self.counts, details=self.details or None)
        # Inside a transaction the row may still roll back: only an exception on exit tells.
        self._finished = conn is None
        self._succeeded_in_transaction = conn is not None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._finished:
            if exc is None:
                if not self._succeeded_in_transaction:
                    self.succeed()
            else:
                try:
                    self.audit.finish(self.use, "failed", counts=self.counts, error=exc, details=self.details or None)
                finally:
                    self._finished = True
        if self.on_finished is not None:
            self.on_finished(self.audit)
