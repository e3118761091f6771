"""One audited use of a token: token read, ``started`` committed, token verified, outcome recorded.

Every entry point (CLI, operators, HTTP API) goes through :class:`TokenUse`, so no token is
ever used without its ``started`` row, and denied uses (a token that cannot even be read, a bad
signature, expired, wrong kind or project) are audited like any other. Where a token comes from
is a :class:`TokenSource` (an Airflow connection, the CLI's file or environment variable, a
token in hand); who runs the use and when is a :class:`RunContext`.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from pseudonymise.core.audit import CONTEXT_FIELDS, Admission, AuditLog, AuditUse
from pseudonymise.core.db import database_now
from pseudonymise.core.errors import (
    AuditError,
    PseudonymiseError,
    RetentionEndedError,
    TokenError,
    TokenRevokedError,
    TokenUsedUpError,
)
from pseudonymise.core.instants import utc_seconds
from pseudonymise.core.tokens import Token, TrustedKeys, fingerprint, peek_claims, secret_parts, verify_token

if TYPE_CHECKING:
    from pseudonymise.core.transit import TransitMac


def current_user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None


class TokenSource(Protocol):
    """Where a token use gets its token, and what it needs around it.

    Implemented by the Airflow hook (:class:`~pseudonymise.hooks.PseudonymisationTokenHook`), the CLI's
    file/environment source, and :class:`GivenToken`. A method that cannot give what it is asked for
    raises a :class:`TokenError` (a retryable one when a service could not be reached); its message
    never carries the token.
    """

    @property
    def project(self) -> str | None:
        """The project the token must belong to; ``None`` accepts any project."""
        ...

    def get_token(self) -> str:
        """The raw token, stripped."""
        ...

    def get_trusted_keys(self) -> TrustedKeys:
        """The issuer public keys that verify the token."""
        ...

    def get_mac_service(self, token: Token) -> TransitMac | None:
        """The Vault Transit client that computes the MACs of ``token`` when its key is held there
        (``key_ref``); ``None`` when the token carries its key."""
        ...

    def mask(self, secret: str) -> None:
        """Hide ``secret`` (one of :func:`~pseudonymise.core.tokens.secret_parts` of the token) from every log."""
        ...


@dataclass(frozen=True, repr=False)
class GivenToken:
    """A token already in hand (tests, benchmarks, code that drives the core directly).

    :param raw: the token.
    :param keys: the issuer keys that verify it.
    :param project: the project it must belong to (default: any).
    :param transit: the Vault client of a token whose key is held in Vault Transit; ``None`` for a token
        that carries its key.
    """

    raw: str
    keys: TrustedKeys
    project: str | None = None
    transit: Any = None

    def get_token(self) -> str:
        return self.raw.strip()

    def get_trusted_keys(self) -> TrustedKeys:
        return self.keys

    def get_mac_service(self, token: Token) -> TransitMac | None:
        if token.key_ref is None or self.transit is None:
            return None
        from pseudonymise.core.transit import TransitMac

        return TransitMac(self.transit, token.key_ref["mount"], token.key_ref["name"], key_version=token.key_version)

    def mask(self, secret: str) -> None:
        """Nothing to do: no log masker outside Airflow."""

    def __repr__(self) -> str:
        return f"GivenToken(fingerprint={fingerprint(self.raw.strip())!r}, project={self.project!r})"


@dataclass(frozen=True)
class RunContext:
    """Who runs a token use, where and when, as the audit records it; checked once.

    :param dag_id: the DAG of the task (``None`` outside Airflow); ``task_id``, ``run_id``, ``map_index``
        (``-1`` for a task that is not mapped) and ``try_number`` likewise.
    :param logical_date: the run's logical date; ``data_interval_start`` and ``data_interval_end`` its
        data interval (aware datetimes, or ISO 8601 text).
    :param triggered_by: the user who triggered the run or made the call.
    :param host: the machine that ran the use (default: this one's name, as the audit finds it).
    :param on_finished: called with the audit log after the use's ``finished`` row is committed, e.g. to
        write a signed checkpoint of the audit (docs/design.md §6.1); not called for a crashed use.
    """

    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    map_index: int | None = None
    try_number: int | None = None
    logical_date: datetime | str | None = None
    data_interval_start: datetime | str | None = None
    data_interval_end: datetime | str | None = None
    triggered_by: str | None = None
    host: str | None = None
    on_finished: Callable[[AuditLog], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "on_finished":
                continue
            if f.name in ("map_index", "try_number"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif f.name in ("logical_date", "data_interval_start", "data_interval_end"):
                ok = isinstance(value, (datetime, str))
            else:
                ok = isinstance(value, str)
            if not ok:
                raise TypeError(f"RunContext.{f.name} cannot be a {type(value).__name__}")
        if self.on_finished is not None and not callable(self.on_finished):
            raise TypeError("RunContext.on_finished must be callable")

    def audit_fields(self) -> dict[str, Any]:
        """The context columns of the use's audit rows (the audit schema's context fields, docs/design.md §6)."""
        return {name: getattr(self, name) for name in CONTEXT_FIELDS}


class TokenUse:
    """Context manager around one use of the token of ``tokens`` for ``operation``.

    On entry: the token and the trusted keys are read from ``tokens`` and every secret part of the
    token is masked; a source that cannot produce them (no such connection, Vault down, no token) is
    audited as a ``denied`` use (``started`` then ``finished``) and its :class:`TokenError` raised.
    Then the token is verified (nothing is used yet), the ``started`` row is committed with the
    verified facts, or with only what the token *claimed* when it failed (or :class:`AuditError`
    is raised and the token is not used); a :class:`TokenError` (including a reverse token past its
    retention end by the database's clock) is then audited as ``denied`` and re-raised. On exit:
    ``failed`` if an exception escaped, else ``success`` unless :meth:`succeed` already recorded it
    (typically inside the data's own transaction).
    """

    def __init__(self, audit: AuditLog, operation: str, tokens: TokenSource, *, kind: str | None,
                 source: str | None = None, target: str | None = None, columns: Sequence[str] | None = None,
                 run: RunContext | None = None) -> None:
        """:param kind: the kind of token the operation needs (``None``: any).
        :param source: what the use reads, as the audit names it (``hospital_db:query``, ``file:in.csv`` …);
            ``target`` what it writes; ``columns`` the columns it works on.
        :param run: who runs the use and when; its ``on_finished`` is called once the use's ``finished``
            row is committed."""
        self.audit = audit
        self.tokens = tokens
        self.kind = kind
        self.run = run or RunContext()
        self.on_finished = self.run.on_finished
        self.use = AuditUse(operation=operation, source=source, target=target, columns=columns,
                            context=self.run.audit_fields())
        self.token: Token | None = None
        self.counts: dict[str, int] = {}
        self.details: dict[str, Any] = {}
        self._finished = False
        self._succeeded_in_transaction = False

    @property
    def use_id(self) -> str:
        return self.use.use_id

    def mac_service(self) -> TransitMac | None:
        """The Vault Transit client of the verified token whose key is held there; ``None`` if it carries its key."""
        assert self.token is not None, "the use has not started"
        return self.tokens.get_mac_service(self.token)

    def __enter__(self) -> TokenUse:
        project = self._expected_project()
        self.use.project = project
        try:
            raw, keys = self._read()
        except TokenError as exc:
            # A token that cannot even be read is still an attempted use (docs/design.md §6).
            self._deny(exc)
        denial: TokenError | None = None
        verified: Token | None = None
        # of the stripped token, as Token.fingerprint and `token inspect` show it: a fact about the string
        # presented, whatever it claims
        self.use.token_fingerprint = fingerprint(raw) if raw else None
        # Checked before the started row so that the row holds verified facts; a token that fails
        # verification leaves only what it *claimed*, in the ``claimed`` column (docs/design.md §6). The
        # token is handed out (``self.token``) only once the started row is committed.
        try:
            verified = verify_token(raw, keys, kind=self.kind, project=project)
        except TokenError as exc:
            denial = exc
            self.use.claimed = peek_claims(raw) or None
        if verified is None:
            self.audit.start(self.use)
        else:
            self._record_verified(verified)
            # revoked or used up: the denied row is already committed with the started one (docs/design.md §3, v1.1)
            refused = self.audit.start_use(self.use, self._admission(verified))
            if refused is not None:
                self._finished = True
                if self.on_finished is not None:
                    self.on_finished(self.audit)
                raise refused
        if verified is not None and verified.kind == "reverse":
            denial = self._retention_on_database_clock(verified)
        if denial is not None:
            self._finish_denied(denial)
            raise denial
        self.token = verified
        return self

    def _expected_project(self) -> str | None:
        try:
            return self.tokens.project
        except PseudonymiseError:  # the source cannot be read at all: the read below says why
            return None

    def _read(self) -> tuple[str, TrustedKeys]:
        """The raw token, masked in every log before anything else happens to it, and the trusted keys."""
        raw = self.tokens.get_token()
        for part in secret_parts(raw):
            self.tokens.mask(part)
        return raw, self.tokens.get_trusted_keys()

    def _deny(self, error: TokenError) -> NoReturn:
        self.audit.start(self.use)
        self._finish_denied(error)
        raise error

    def _finish_denied(self, error: TokenError) -> None:
        self.audit.finish(self.use, "denied", error=error)
        self._finished = True
        if self.on_finished is not None:
            self.on_finished(self.audit)

    def _record_verified(self, token: Token) -> None:
        self.use.project = token.project
        self.use.token_jti = token.jti
        self.use.token_kind = token.kind
        self.use.token_issuer = token.issuer
        self.use.token_expires_at = utc_seconds(token.expires)
        self.use.retention_until = utc_seconds(token.retention_until)
        self.use.token_max_uses = token.max_uses

    @staticmethod
    def _admission(token: Token) -> Admission:
        uses = "" if token.max_uses is None else f"{token.max_uses} use{'s' if token.max_uses != 1 else ''}"
        return Admission(
            max_uses=token.max_uses,
            revoked=TokenRevokedError(f"token {token.jti} has been revoked and can never be used again; ask the "
                                      "project's issuer for a new token"),
            used_up=TokenUsedUpError(f"token {token.jti} allows {uses} (max_uses) and has had them; ask the project's "
                                     "issuer for a new token"),
        )

    def _retention_on_database_clock(self, token: Token) -> TokenError | None:
        """Retention is judged by the audit database's clock, not the worker's (docs/design.md §5.1): a worker
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
                f"project {token.project!r}'s retention ended at {utc_seconds(token.retention_until)} by the database's "
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
