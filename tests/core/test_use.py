"""One audited use of a token (core/use.py, ``TokenUse``) on SQLite and PostgreSQL.

The ``started`` row commits before the token is handed out (and the token is never handed out when it
cannot); a token that fails verification is audited ``denied`` with what it claimed only in the
``claimed`` column; ``on_finished`` is called once per use, after its ``finished`` row; ``success`` can
commit in the caller's transaction, and rolls back with it; an exception leaves the use ``failed``.
Expectations come from the token's own text (:mod:`tests.reference`), not from the token verifier.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import (
    AuditError,
    MalformedTokenError,
    TokenError,
    TokenExpiredError,
    TokenKindError,
    TokenNotYetValidError,
    TokenProjectError,
    TokenRevokedError,
    TokenSignatureError,
    TokenUsedUpError,
    UnknownIssuerKeyError,
)
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.tokens import b64url_decode, fingerprint, sign_claims
from pseudonymise.core.use import GivenToken, RunContext, TokenUse

from scripts.services import free_port
from tests import reference

CONTEXT = {"dag_id": "patients_daily", "task_id": "pseudonymise", "run_id": "scheduled__2026-11-01",
           "map_index": -1, "try_number": 1, "logical_date": datetime(2026, 11, 1, tzinfo=UTC),
           "host": "worker-1"}
VERIFIED = ("token_jti", "token_kind", "token_issuer", "token_expires_at", "retention_until")


def _use(audit: AuditLog, raw: str, issuer: Issuer, *, operation: str = "pseudonymise",
         kind: str = "pseudonymisation", project: str | None = None, context: dict[str, Any] | None = None,
         on_finished: Callable[[AuditLog], None] | None = None, **kwargs: Any) -> TokenUse:
    """A use of ``raw`` for ``operation``, trusting ``issuer``'s keys."""
    return TokenUse(audit, operation, GivenToken(raw, issuer.public_keys(), project), kind=kind,
                    run=RunContext(**(context or {}), on_finished=on_finished), **kwargs)


def _outcomes(audit: AuditLog) -> list[tuple[str, str]]:
    return [(r["event"], r["outcome"]) for r in audit.iter_rows()]


def _instant(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _secrets(raw: str) -> list[str]:
    claims = reference.claims(raw)
    return [raw, *raw.split("."), *(claims[k] for k in ("key", "escrow_public_key", "escrow_private_key")
                                    if k in claims)]


# --- started before the token is handed out -------------------------------------------------------
def test_started_row_is_committed_before_the_token_is_handed_out(audit: AuditLog, issuer: Issuer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    claims = reference.claims(raw)
    use = _use(audit, raw, issuer, project="research-a", source="table:patients", target="table:patients_p",
               columns=["patient_id"], context=CONTEXT)
    token_when_started: list[object] = []
    start = audit.start_use  # a verified token's use starts (and is admitted) there

    def spying_start(audit_use: Any, admission: Any) -> Any:
        token_when_started.append(use.token)
        return start(audit_use, admission)

    monkeypatch.setattr(audit, "start_use", spying_start)
    with use:
        assert use.token is not None and use.token.jti == claims["jti"]
        rows = list(audit.iter_rows())  # another connection: the started row is committed
        assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started")]
        started = rows[0]
    assert token_when_started == [None]
    assert (started["token_jti"], started["token_kind"], started["token_issuer"], started["project"]) == (
        claims["jti"], "pseudonymisation", claims["iss"], "research-a")
    assert started["token_fingerprint"] == hashlib.sha256(raw.encode()).hexdigest()[:16]
    assert started["token_expires_at"] == _instant(claims["exp"])
    assert started["retention_until"] == claims["retention_until"]
    assert started["claimed"] is None
    assert (started["source"], started["target"], json.loads(started["columns"])) == (
        "table:patients", "table:patients_p", ["patient_id"])
    assert (started["dag_id"], started["run_id"], started["map_index"], started["host"]) == (
        "patients_daily", "scheduled__2026-11-01", -1, "worker-1")
    assert _outcomes(audit) == [("started", "started"), ("finished", "success")]
    assert audit.verify().ok


def test_token_is_not_used_when_the_audit_is_unreachable(issuer: Issuer) -> None:
    log = AuditLog(make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    raw = issuer.issue("research-a", "pseudonymisation")
    # the wrong kind: had the token been verified first, the error would be TokenKindError
    wrong_kind = TokenUse(log, "reverse", GivenToken(raw, issuer.public_keys()), kind="reverse")
    entered = False
    with pytest.raises(AuditError), wrong_kind:
        entered = True
    assert not entered and wrong_kind.token is None
    valid = TokenUse(log, "pseudonymise", GivenToken(raw, issuer.public_keys()), kind="pseudonymisation")
    with pytest.raises(AuditError):
        valid.__enter__()
    assert valid.token is None


# --- denied uses: what the token claimed, apart -----------------------------------------------------
def _forged(issuer: Issuer, **changes: Any) -> str:
    """A token of research-a signed by the issuer's own key with ``changes`` to its claims."""
    claims = {**reference.claims(issuer.issue("research-a", "pseudonymisation")), **changes}
    return sign_claims(claims, issuer._private, issuer.kid)


def _tampered(issuer: Issuer) -> str:
    """A genuine token whose payload now names another project, under its old signature."""
    raw = issuer.issue("research-a", "pseudonymisation")
    head, _payload, signature = raw.split(".")
    claims = {**reference.claims(raw), "sub": "research-b"}
    return ".".join([head, reference.b64url_encode(json.dumps(claims).encode()), signature])


DENIALS: dict[str, tuple[Callable[[Issuer, Path], str], dict[str, Any], type[TokenError]]] = {
    "wrong-kind": (lambda i, _: i.issue("research-a", "pseudonymisation"), {"kind": "reverse",
                                                                           "operation": "reverse"}, TokenKindError),
    "wrong-project": (lambda i, _: i.issue("research-a", "pseudonymisation"), {"project": "research-b"},
                      TokenProjectError),
    "expired": (lambda i, _: _forged(i, exp=int(time.time()) - 3600, nbf=int(time.time()) - 7200,
                                     iat=int(time.time()) - 7200), {}, TokenExpiredError),
    "not-yet-valid": (lambda i, _: i.issue("research-a", "pseudonymisation",
                                           not_before=datetime.now(UTC) + timedelta(hours=1)), {},
                      TokenNotYetValidError),
    "unknown-issuer": (lambda _, tmp: _other_issuer(tmp).issue("research-a", "pseudonymisation"), {},
                       UnknownIssuerKeyError),
    "tampered": (lambda i, _: _tampered(i), {}, TokenSignatureError),
    "garbage": (lambda _i, _t: "not-a-token", {}, MalformedTokenError),
}


def _other_issuer(tmp_path: Path) -> Issuer:
    other = Issuer.init(DirectoryStore(tmp_path / "rogue-store"), "rogue")
    other.create_project("research-a")
    return other


@pytest.mark.parametrize("case", list(DENIALS))
def test_denied_use_keeps_the_claims_apart_and_never_hands_out_the_token(audit: AuditLog, issuer: Issuer,
                                                                         tmp_path: Path, case: str) -> None:
    make, options, error = DENIALS[case]
    raw = make(issuer, tmp_path)
    use = _use(audit, raw, issuer, context=CONTEXT, **options)
    entered = False
    with pytest.raises(error), use:
        entered = True
    assert not entered and use.token is None
    rows = list(audit.iter_rows())
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "denied")]
    assert rows[1]["error_class"] == error.__name__
    try:
        claims = reference.claims(raw)
    except (IndexError, ValueError):
        claimed = None
    else:
        claimed = {k: claims[k] for k in ("jti", "sub", "kind", "iss")}
    for row in rows:
        assert all(row[column] is None for column in VERIFIED), row
        assert (json.loads(row["claimed"]) if row["claimed"] else None) == claimed
        assert row["token_fingerprint"] == hashlib.sha256(raw.encode()).hexdigest()[:16]
        assert row["project"] == options.get("project")  # the project the use asked for, never a claim
    blob = json.dumps(rows, default=str)
    for secret in (_secrets(raw) if claimed else [raw]):
        assert secret not in blob
    assert audit.verify().ok


def test_denied_use_is_audited_without_the_token(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    claims = json.loads(b64url_decode(raw.split(".")[1]))
    entered = False
    with pytest.raises(TokenProjectError), TokenUse(audit, "pseudonymise",
                                                    GivenToken(raw, issuer.public_keys(), "research-b"),
                                                    kind="pseudonymisation", source="table:patients",
                                                    run=RunContext(**CONTEXT)):
        entered = True
    assert not entered
    rows = list(audit.iter_rows())
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "denied")]
    denied = rows[1]
    assert denied["error_class"] == "TokenProjectError"
    assert "research-b" in denied["error_message"]
    # what a token that failed verification says about itself is kept apart, marked as claimed
    assert denied["token_jti"] is None and denied["token_kind"] is None and denied["token_issuer"] is None
    assert json.loads(denied["claimed"]) == {"jti": claims["jti"], "sub": "research-a", "kind": "pseudonymisation",
                                             "iss": claims["iss"]}
    assert denied["token_fingerprint"] == fingerprint(raw)
    assert denied["project"] == "research-b"  # the project the use asked for, not what the token claimed
    secrets = [raw, *raw.split("."), claims["key"], claims["escrow_public_key"]]
    for row in rows:
        for column, value in row.items():
            for secret in secrets:
                assert secret not in str(value), column
    assert audit.verify().ok


def test_audited_fingerprint_is_the_tokens_whatever_the_whitespace(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    with TokenUse(audit, "pseudonymise", GivenToken(f"  {raw}\n", issuer.public_keys()),
                  kind="pseudonymisation") as use:
        assert use.token is not None
        fingerprint_of_token = use.token.fingerprint
    rows = list(audit.iter_rows())
    assert fingerprint_of_token == fingerprint(raw)
    assert {r["token_fingerprint"] for r in rows} == {fingerprint(raw)}


def test_garbage_token_use_is_denied(audit: AuditLog, issuer: Issuer) -> None:
    with pytest.raises(MalformedTokenError), TokenUse(audit, "reverse", GivenToken("not-a-token", issuer.public_keys()),
                                                      kind="reverse"):
        pass
    rows = list(audit.iter_rows())
    assert [r["outcome"] for r in rows] == ["started", "denied"]
    assert rows[0]["token_jti"] is None and rows[0]["token_fingerprint"] == fingerprint("not-a-token")


# --- on_finished: once, after the finished row ---------------------------------------------------
@pytest.mark.parametrize("ending", ["success", "success-in-transaction", "failed", "denied"])
def test_on_finished_is_called_once_after_the_finished_row(audit: AuditLog, issuer: Issuer, ending: str) -> None:
    seen: list[tuple[AuditLog, list[tuple[str, str]]]] = []

    def on_finished(log: AuditLog) -> None:
        seen.append((log, _outcomes(log)))  # what a checkpoint written now would cover

    raw = issuer.issue("research-a", "pseudonymisation")
    use = _use(audit, raw, issuer, project="research-b" if ending == "denied" else "research-a",
               on_finished=on_finished)
    if ending == "success":
        with use:
            pass
    elif ending == "success-in-transaction":
        with use, audit.engine.begin() as conn:
            use.succeed(conn, counts={"rows_in": 1})
    else:
        with pytest.raises(TokenProjectError if ending == "denied" else RuntimeError), use:
            raise RuntimeError("the load failed")
    outcome = ending.removesuffix("-in-transaction")
    assert seen == [(audit, [("started", "started"), ("finished", outcome)])]


def test_on_finished_is_not_called_when_the_use_never_started(issuer: Issuer) -> None:
    log = AuditLog(make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    calls: list[AuditLog] = []
    with pytest.raises(AuditError), _use(log, issuer.issue("research-a", "pseudonymisation"), issuer,
                                         on_finished=calls.append):
        pass
    assert calls == []


# --- success in the caller's transaction, failure on an exception ----------------------------------
def test_success_commits_with_the_callers_data_and_only_then(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    with audit.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE target_rows (v text)"))
    with _use(audit, raw, issuer) as use, audit.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO target_rows VALUES ('a'), ('b')"))
        use.counts.update({"rows_in": 2})
        use.succeed(conn, counts={"rows_out": 2}, details={"key_version": 1})
        # seen from another connection, neither the data nor the success is there before the commit
        assert _outcomes(audit) == [("started", "started")]
        with audit.engine.connect() as other:
            assert other.execute(sa.text("SELECT count(*) FROM target_rows")).scalar_one() == 0
    rows = list(audit.iter_rows())
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "success")]
    assert (rows[1]["rows_in"], rows[1]["rows_out"], json.loads(rows[1]["details"])) == (2, 2, {"key_version": 1})
    with audit.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM target_rows")).scalar_one() == 2
    assert audit.verify().ok


def test_success_without_a_transaction_is_recorded_once(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    with _use(audit, raw, issuer) as use:
        use.succeed(counts={"rows_in": 3})
        assert _outcomes(audit) == [("started", "started"), ("finished", "success")]
    assert _outcomes(audit) == [("started", "started"), ("finished", "success")]


def test_successful_and_failed_uses(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    with TokenUse(audit, "pseudonymise", GivenToken(raw, issuer.public_keys()), kind="pseudonymisation") as use:
        assert use.token is not None and use.token.project == "research-a"
        use.counts.update({"rows_in": 3, "rows_out": 3})
    with pytest.raises(RuntimeError), TokenUse(audit, "pseudonymise", GivenToken(raw, issuer.public_keys()),
                                               kind="pseudonymisation"):
        raise RuntimeError("target table is locked by P100000")
    rows = list(audit.iter_rows())
    assert [r["outcome"] for r in rows] == ["started", "success", "started", "failed"]
    assert rows[1]["rows_in"] == 3
    assert rows[3]["error_class"] == "RuntimeError" and "P100000" not in rows[3]["error_message"]
    assert audit.verify().ok


def test_failure_keeps_the_counts_so_far_and_re_raises(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    with pytest.raises(ValueError, match="batch 3") as raised, _use(audit, raw, issuer) as use:
        use.counts.update({"rows_in": 20, "rows_out": 10})
        raise ValueError("batch 3 could not be written")
    rows = list(audit.iter_rows())
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "failed")]
    assert (rows[1]["rows_in"], rows[1]["rows_out"], rows[1]["error_class"]) == (20, 10, "ValueError")
    assert isinstance(raised.value, ValueError)


def test_success_rolled_back_with_the_data_becomes_failed(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    with pytest.raises(RuntimeError), TokenUse(audit, "pseudonymise", GivenToken(raw, issuer.public_keys()),
                                               kind="pseudonymisation") as use, audit.engine.begin() as conn:
        use.succeed(conn, counts={"rows_in": 5})
        raise RuntimeError("load failed")
    rows = list(audit.iter_rows())
    assert [r["outcome"] for r in rows] == ["started", "failed"]
    assert audit.verify().ok


# --- the token source: read, masked, audited even when it cannot give a token -----------------------
class _Source:
    """A token source whose reads can fail, remembering what it was asked to mask."""

    def __init__(self, raw: str | None, keys: Any, project: str | None = None,
                 failure: TokenError | None = None) -> None:
        self.raw, self.keys, self.failure, self.masked = raw, keys, failure, []
        self._project = project

    @property
    def project(self) -> str | None:
        if self.failure is not None:
            raise self.failure
        return self._project

    def get_token(self) -> str:
        if self.failure is not None:
            raise self.failure
        assert self.raw is not None
        return self.raw

    def get_trusted_keys(self) -> Any:
        return self.keys

    def get_mac_service(self, token: Any) -> None:
        return None

    def mask(self, secret: str) -> None:
        self.masked.append(secret)


@pytest.mark.parametrize("what", ["no such connection", "Vault down"])
def test_a_source_that_cannot_give_a_token_is_a_denied_use(audit: AuditLog, issuer: Issuer, what: str) -> None:
    """The only place an unreadable token is audited: the use is ``denied``, with no fingerprint or claim."""
    failure = TokenError(f"the token could not be read ({what})")
    seen: list[AuditLog] = []
    use = TokenUse(audit, "pseudonymise", _Source(None, issuer.public_keys(), failure=failure),
                   kind="pseudonymisation", source="hospital:query", target="research:visits",
                   run=RunContext(dag_id="daily", triggered_by="alice", on_finished=seen.append))
    entered = False
    with pytest.raises(TokenError, match=what), use:
        entered = True
    assert not entered and use.token is None and seen == [audit]
    rows = list(audit.iter_rows())
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "denied")]
    assert rows[1]["error_class"] == "TokenError" and what in rows[1]["error_message"]
    for row in rows:
        assert row["token_fingerprint"] is None and row["claimed"] is None and row["project"] is None
        assert (row["source"], row["target"], row["dag_id"], row["triggered_by"]) == (
            "hospital:query", "research:visits", "daily", "alice")
    assert audit.verify().ok


def test_every_secret_part_is_masked_before_the_token_is_verified(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    source = _Source(raw, issuer.public_keys(), project="research-b")  # refused: the wrong project
    with pytest.raises(TokenProjectError), TokenUse(audit, "pseudonymise", source, kind="pseudonymisation"):
        pass
    claims = reference.claims(raw)
    assert raw in source.masked and raw.split(".")[1] in source.masked
    assert claims["key"] in source.masked and claims["escrow_public_key"] in source.masked


def test_a_run_context_is_checked_once() -> None:
    assert RunContext(map_index=-1, try_number=2, logical_date="2026-11-04").audit_fields()["map_index"] == -1
    with pytest.raises(TypeError, match="map_index"):
        RunContext(map_index="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logical_date"):
        RunContext(logical_date=20261104)  # type: ignore[arg-type]


# --- max_uses and revocation (docs/design.md §3, v1.1) -------------------------------------------------------
def _finished(audit: AuditLog, jti: str) -> list[tuple[str, str | None]]:
    return [(r["outcome"], r["error_class"]) for r in audit.iter_rows() if r["token_jti"] == jti
            and r["event"] == "finished"]


def test_a_token_is_refused_once_it_has_had_its_max_uses(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "reverse", max_uses=2)
    jti = reference.claims(raw)["jti"]
    for _ in range(2):
        with _use(audit, raw, issuer, operation="reverse", kind="reverse") as use:
            assert use.token is not None and use.token.max_uses == 2
    refused = _use(audit, raw, issuer, operation="reverse", kind="reverse")
    with pytest.raises(TokenUsedUpError, match=f"token {jti} allows 2 uses \\(max_uses\\)"), refused:
        pytest.fail("a used-up token was handed out")
    assert refused.token is None
    assert _finished(audit, jti) == [("success", None), ("success", None), ("denied", "TokenUsedUpError")]
    # the denied use's two rows were committed together, and the chain holds
    rows = [r for r in audit.iter_rows() if r["use_id"] == refused.use_id]
    assert [(r["event"], r["outcome"], r["token_max_uses"]) for r in rows] == [
        ("started", "started", 2), ("finished", "denied", 2)]
    assert audit.verify().ok


def test_a_failed_use_counts_and_a_denied_one_does_not(audit: AuditLog, issuer: Issuer) -> None:
    """A use that got the token counts even when it then failed (it may have read what it should not
    have twice); a refused use does not (the token was never handed out)."""
    raw = issuer.issue("research-a", "reverse", max_uses=1)
    jti = reference.claims(raw)["jti"]
    with pytest.raises(TokenKindError), _use(audit, raw, issuer, kind="pseudonymisation"):  # refused: not counted
        pass
    with pytest.raises(RuntimeError, match="target down"), _use(audit, raw, issuer, operation="reverse",
                                                                 kind="reverse"):
        raise RuntimeError("target down")
    with pytest.raises(TokenUsedUpError), _use(audit, raw, issuer, operation="reverse", kind="reverse"):
        pass
    assert _finished(audit, jti) == [("failed", "RuntimeError"), ("denied", "TokenUsedUpError")]


def test_a_token_without_max_uses_has_no_limit(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    for _ in range(4):
        with _use(audit, raw, issuer):
            pass
    assert [o for o, _ in _finished(audit, reference.claims(raw)["jti"])] == ["success"] * 4


def test_a_revoked_token_is_refused_for_ever(audit: AuditLog, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    jti = reference.claims(raw)["jti"]
    with _use(audit, raw, issuer):
        pass
    revocation = AuditUse(operation="revoke", source="test", context={"triggered_by": "dpo"})
    audit.revoke(jti, "key material leaked", revocation)
    with pytest.raises(AuditError, match="already revoked"):
        audit.revoke(jti, "again", AuditUse(operation="revoke"))
    with pytest.raises(AuditError, match="needs a reason"):
        audit.revoke("other-jti", "  ", AuditUse(operation="revoke"))
    for _ in range(2):
        refused = _use(audit, raw, issuer)
        with pytest.raises(TokenRevokedError, match=f"token {jti} has been revoked"), refused:
            pytest.fail("a revoked token was handed out")
    assert _finished(audit, jti) == [("success", None), ("success", None), ("failed", "AuditError"),
                                     ("denied", "TokenRevokedError"), ("denied", "TokenRevokedError")]
    [row] = audit.revocations()
    assert (row["jti"], row["reason"], row["revoked_by"], row["use_id"]) == (
        jti, "key material leaked", "dpo", revocation.use_id)
    assert audit.verify().ok


def test_no_use_when_the_revocations_cannot_be_read(audit: AuditLog, issuer: Issuer) -> None:
    """Fail closed: the revocation table gone (dropped by its owner, say) means no token is used."""
    raw = issuer.issue("research-a", "pseudonymisation")
    with audit.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE pseudonymise_revoked"))
    use = _use(audit, raw, issuer)
    with pytest.raises(AuditError, match="the token was NOT used"), use:
        pytest.fail("the token was handed out without its revocation check")
    assert use.token is None
    assert not [r for r in audit.iter_rows() if r["token_jti"] == reference.claims(raw)["jti"]]
