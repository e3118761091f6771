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

from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.errors import TokenError
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

    On entry: the ``started`` row is committed (or :class:`AuditError` is raised and the token is
    not used), then the token is verified; a :class:`TokenError` is audited as ``denied`` and
    re-raised. On exit: ``failed`` if an exception escaped, else ``success`` unless
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
        peek = peek_claims(raw_token) if raw_token else {}
        self.use = AuditUse(
            operation=operation,
            project=project or peek.get("sub"),
            token_jti=peek.get("jti"),
            token_kind=peek.get("kind"),
            # of the stripped token, as Token.fingerprint and `token inspect` show it
            token_fingerprint=fingerprint(raw_token.strip()) if raw_token else None,
            token_issuer=peek.get("iss"),
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
        self.audit.start(self.use)
        if self.raw is None:
            return self
        try:
            self.token = verify_token(self.raw, self.keys, kind=self.kind, project=self.project)
        except TokenError as exc:
            self.audit.finish(self.use, "denied", error=exc)
            self._finished = True
            if self.on_finished is not None:
                self.on_finished(self.audit)
            raise
        self.use.token_expires_at = _instant(self.token.expires)
        self.use.retention_until = _instant(self.token.retention_until)
        return self

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
