"""The documented least-privilege grants (include/sql/least_privilege.sql) work on PostgreSQL: the
pipeline role pseudonymises and escrows, but cannot rewrite the audit or read escrow ciphertexts, nor
revoke or un-revoke a token; its uses are still counted and checked against the revocations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.approval import ReverseRequests
from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.copytext import CopyBlock
from pseudonymise.core.errors import ApprovalError, AuditError, RiskGateError, TokenRevokedError, TokenUsedUpError
from pseudonymise.core.escrow import EscrowWriter, reveal
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_dry_run, run_pseudonymisation, run_risk_report
from pseudonymise.core.plan import SharedTransaction, SinkFactory, TableDestination, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.risk import RiskSpec, describe_table
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.tokens import verify_token
from pseudonymise.core.use import GivenToken, TokenUse

pytestmark = pytest.mark.postgres
GRANTS = Path(__file__).resolve().parents[2] / "include/sql/least_privilege.sql"


class _Rows:
    columns: ClassVar[list[str]] = ["id"]

    def batches(self):  # type: ignore[no-untyped-def]
        yield {"id": ["A1", "A2", "A3"]}


class _Discard:
    def write(self, batch): ...  # type: ignore[no-untyped-def]
    def commit(self): ...  # type: ignore[no-untyped-def]
    def abort(self): ...  # type: ignore[no-untyped-def]


def _grant(pg_url: str) -> sa.Engine:
    """The audit owner creates the tables and runs least_privilege.sql; returns the owner's engine."""
    owner = sa.create_engine(pg_url)
    Store(owner).create()
    with owner.begin() as conn:
        conn.execute(sa.text("DROP ROLE IF EXISTS pseudonymise_pipeline"))
        conn.execute(sa.text("DROP ROLE IF EXISTS pseudonymise_auditor"))
        conn.execute(sa.text("DROP ROLE IF EXISTS pseudonymise_viewer"))
        for statement in GRANTS.read_text().split(";"):
            code = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--")).strip()
            if code:
                conn.execute(sa.text(code))
    return owner


def _drop_roles(pg_url: str, postgres: Any, *engines: sa.Engine) -> None:
    """Roles are cluster-wide: drop them (and the database that depends on them) for the next test."""
    for engine in engines:
        engine.dispose()
    with sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT").connect() as conn:
        db = sa.make_url(pg_url).database
        conn.execute(sa.text(f'DROP DATABASE "{db}" WITH (FORCE)'))
        conn.execute(sa.text("DROP ROLE pseudonymise_pipeline"))
        conn.execute(sa.text("DROP ROLE pseudonymise_auditor"))
        conn.execute(sa.text("DROP ROLE pseudonymise_viewer"))
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))


def _as(pg_url: str, role: str) -> sa.Engine:
    return sa.create_engine(sa.make_url(pg_url).set(username=role))


def test_pipeline_role_can_append_but_not_rewrite(pg_url: str, issuer: Issuer, postgres) -> None:  # type: ignore[no-untyped-def]
    owner = _grant(pg_url)
    pipeline = sa.create_engine(sa.make_url(pg_url).set(username="pseudonymise_pipeline"))
    token = issuer.issue("research-a", "pseudonymisation")
    policy = ColumnPolicy.pseudonymise("id")
    summary = run_pseudonymisation(Store(pipeline), GivenToken(token, issuer.public_keys()), policy,
                                   plan_transfer(_Rows(), SinkFactory(lambda cols, conn: _Discard()), policy))
    assert summary.counts["escrow_rows"] == 3
    for statement in ("UPDATE pseudonymise_audit SET outcome = 'success'", "DELETE FROM pseudonymise_audit",
                      "SELECT ciphertext FROM pseudonymise_escrow", "DELETE FROM pseudonymise_escrow"):
        with pipeline.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(statement))
    assert AuditLog(owner).verify().ok
    # the write modes' interval lock works for the pipeline role too (a target the owner made)
    with owner.begin() as conn:
        conn.execute(sa.text("CREATE TABLE dst (id text)"))
        conn.execute(sa.text("GRANT SELECT, INSERT, DELETE ON dst TO pseudonymise_pipeline"))
    for _ in range(2):
        run_pseudonymisation(Store(pipeline), GivenToken(issuer.issue("research-b", "pseudonymisation"),
                                                         issuer.public_keys()), policy,
                             plan_transfer(_Rows(), SinkFactory(
                                 lambda cols, conn: TableTarget("dst", mode="replace").sink(conn, cols)), policy))
    with owner.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dst")).scalar() == 3
        assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_write_lock")).scalar() == 0

    auditor = sa.create_engine(sa.make_url(pg_url).set(username="pseudonymise_auditor"))
    reverse = verify_token(issuer.issue("research-a", "reverse"), issuer.public_keys())
    with auditor.connect() as conn:
        pseudonyms = [r[0] for r in conn.execute(sa.text("SELECT pseudonym FROM pseudonymise_escrow"))]
        store = Store(auditor)
        revealed = reveal(conn, store.escrow, reverse, pseudonyms, lambda: store.audit.listed_escrow_batches(conn))
        assert sorted(revealed.values.values()) == ["A1", "A2", "A3"]
    _drop_roles(pg_url, postgres, pipeline, auditor, owner)


@pytest.mark.skipif(not native.available(), reason="escrow straight in takes the C engine's blocks")
def test_pipeline_role_writes_escrow_straight_in_and_looks_it_up(pg_url: str, issuer: Issuer, postgres: Any) -> None:
    """As the least-privilege pipeline role: a run that holds the project's escrow lock copies its rows straight in
    (the lock, the project's first look, a binary COPY, the batch row), a second run of the project looks its values
    up first (one SELECT of pseudonyms) and stores only the new one; the auditor reveals all four, and the role
    still cannot read a ciphertext."""
    owner = _grant(pg_url)
    pipeline = _as(pg_url, "pseudonymise_pipeline")
    token = verify_token(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys())
    store = Store(pipeline)
    listed: dict[str, str] = {}
    for values, stored in ((["A1", "A2", "A3"], 3), (["A2", "A4"], 1)):
        engine = Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))
        batch = engine.pseudonymise_batch(CopyBlock("".join(f"{v}\n" for v in values).encode(), len(values)), ["id"])
        writer = EscrowWriter(token, store.escrow, defer=True)
        with pipeline.begin() as conn:
            writer.write(conn, batch.escrow)
            assert writer.flush(conn) == stored and writer._mode == "direct"
        listed.update(writer.digests)
    with pipeline.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        conn.execute(sa.text("SELECT ciphertext FROM pseudonymise_escrow"))
    auditor = _as(pg_url, "pseudonymise_auditor")
    reverse = verify_token(issuer.issue("research-a", "reverse"), issuer.public_keys())
    with auditor.connect() as conn:
        pseudonyms = [r[0] for r in conn.execute(sa.text("SELECT pseudonym FROM pseudonymise_escrow"))]
        revealed = reveal(conn, Store(auditor).escrow, reverse, pseudonyms, lambda: listed)
    assert sorted(revealed.values.values()) == ["A1", "A2", "A3", "A4"]
    _drop_roles(pg_url, postgres, pipeline, auditor, owner)


def test_use_limits_and_revocation_through_the_roles(pg_url: str, issuer: Issuer, postgres: Any) -> None:
    """The pipeline role's uses are admitted by ``pseudonymise_audit_start`` (it reads the audit and the
    revocations as their owner: the role itself can read neither), a single-use token's second use is
    denied; only the auditor may revoke (through ``pseudonymise_audit_revoke``, recorded as its role), and
    no role but the owner can change or delete a revocation."""
    owner = _grant(pg_url)
    pipeline, auditor, viewer = (_as(pg_url, r) for r in ("pseudonymise_pipeline", "pseudonymise_auditor",
                                                          "pseudonymise_viewer"))
    once = issuer.issue("research-a", "reverse", max_uses=1)
    with TokenUse(AuditLog(pipeline), "reverse", GivenToken(once, issuer.public_keys()), kind="reverse"):
        pass
    with pytest.raises(TokenUsedUpError), TokenUse(AuditLog(pipeline), "reverse",
                                                   GivenToken(once, issuer.public_keys()), kind="reverse"):
        pytest.fail("handed out twice")
    token = issuer.issue("research-b", "pseudonymisation")
    jti = verify_token(token, issuer.public_keys()).jti
    for statement in (f"INSERT INTO pseudonymise_revoked VALUES ('{jti}', now(), 'me', 'x', 'u')",
                      "DELETE FROM pseudonymise_revoked", "SELECT * FROM pseudonymise_revoked"):
        with pipeline.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(statement))
    with pytest.raises(AuditError, match="NOT revoked"):
        AuditLog(pipeline).revoke(jti, "the pipeline may not revoke", AuditUse(operation="revoke"))
    AuditLog(auditor).revoke(jti, "vendor contract ended", AuditUse(operation="revoke", context={"triggered_by": "dpo"}))
    for statement in ("DELETE FROM pseudonymise_revoked", "UPDATE pseudonymise_revoked SET reason = 'x'"):
        with auditor.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(statement))
    with pytest.raises(TokenRevokedError), TokenUse(AuditLog(pipeline), "pseudonymise",
                                                    GivenToken(token, issuer.public_keys()), kind="pseudonymisation"):
        pytest.fail("a revoked token was handed out")
    assert [r["jti"] for r in AuditLog(viewer).revocations()] == [jti]
    audit = AuditLog(owner)
    assert audit.verify().ok
    rows = [(r["operation"], r["outcome"], r["db_role"]) for r in audit.iter_rows() if r["event"] == "finished"]
    assert rows == [("reverse", "success", "pseudonymise_pipeline"), ("reverse", "denied", "pseudonymise_pipeline"),
                    ("revoke", "success", "pseudonymise_auditor"),
                    ("pseudonymise", "denied", "pseudonymise_pipeline")]
    _drop_roles(pg_url, postgres, pipeline, auditor, viewer, owner)


def test_the_pipeline_role_cannot_give_a_used_up_token_its_uses_back(pg_url: str, issuer: Issuer, postgres: Any) -> None:
    """The pipeline role may append any audit row through the append function, so it can write a ``denied`` row
    for an earlier use of a single-use reverse token (use ids are in XCom and the logs). That row must not let
    the token be handed out again: uses are counted in ``pseudonymise_admitted``, which the role can neither
    write, delete nor read; the start function (as the owner) is its only writer. The viewer reads the counts."""
    owner = _grant(pg_url)
    pipeline, auditor, viewer = (_as(pg_url, r) for r in ("pseudonymise_pipeline", "pseudonymise_auditor",
                                                          "pseudonymise_viewer"))
    once = issuer.issue("research-a", "reverse", max_uses=1)
    jti = verify_token(once, issuer.public_keys()).jti
    with TokenUse(AuditLog(pipeline), "reverse", GivenToken(once, issuer.public_keys()), kind="reverse") as first:
        pass
    with pipeline.begin() as conn:
        conn.execute(sa.text("SELECT pseudonymise_audit_append(CAST(:p AS jsonb))"),
                     {"p": json.dumps({"use_id": first.use_id, "event": "finished", "outcome": "denied",
                                       "operation": "reverse"})})
    with pytest.raises(TokenUsedUpError), TokenUse(AuditLog(pipeline), "reverse",
                                                   GivenToken(once, issuer.public_keys()), kind="reverse"):
        pytest.fail("a used-up token was handed out again after a forged denied row")
    for statement in ("INSERT INTO pseudonymise_admitted VALUES ('u', 'j', now())",
                      f"DELETE FROM pseudonymise_admitted WHERE jti = '{jti}'",
                      "UPDATE pseudonymise_admitted SET jti = 'other'", "SELECT * FROM pseudonymise_admitted"):
        for engine in (pipeline, auditor):
            if engine is auditor and statement.startswith("SELECT"):
                continue
            with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text(statement))
    assert AuditLog(viewer).admissions() == {jti: 1}
    assert AuditLog(auditor).admissions() == {jti: 1}
    assert AuditLog(owner).verify().ok
    _drop_roles(pg_url, postgres, pipeline, auditor, viewer, owner)


def test_the_pipeline_role_cannot_make_or_approve_a_reversal_request(pg_url: str, postgres: Any) -> None:
    """Four eyes against the pipeline's database role: it may append audit rows (and so write a row that
    *says* a request was approved), but the request table is not granted to it, so it can neither insert an
    approved request nor approve a pending one, and its forged audit row approves nothing. The auditor role
    (the API server's) runs the whole flow; the viewer only reads."""
    owner = _grant(pg_url)
    pipeline, auditor, viewer = (_as(pg_url, r) for r in ("pseudonymise_pipeline", "pseudonymise_auditor",
                                                          "pseudonymise_viewer"))
    values = {"id": ["a" * 26, "b" * 26]}
    requests = ReverseRequests(AuditLog(auditor))
    made = requests.submit(connection_id="rev", columns=["id"], batch=values, requester="alice", reason="SAR 12")
    rid = made["request_id"]
    for statement in (f"UPDATE pseudonymise_reverse_request SET status = 'approved', decided_by = 'bob' "
                      f"WHERE request_id = '{rid}'",
                      "INSERT INTO pseudonymise_reverse_request (request_id, connection_id, columns, pseudonym_digest, "
                      "pseudonyms, require_all, requester, reason, status, created_at, expires_at) VALUES "
                      "('00000000-0000-0000-0000-000000000001', 'rev', '[\"id\"]', 'x', 1, false, 'mallory', 'x', "
                      "'approved', now(), now() + interval '1 day')",
                      "SELECT * FROM pseudonymise_reverse_request"):
        with pipeline.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(statement))
    with viewer.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        conn.execute(sa.text(f"UPDATE pseudonymise_reverse_request SET status = 'approved' WHERE request_id = '{rid}'"))
    forged = AuditUse(operation="reverse_approve", context={"triggered_by": "bob"})
    with pipeline.begin() as conn:  # the append function is the pipeline's right: the row goes in
        AuditLog(pipeline).append(conn, {**forged.record(), "event": "started", "outcome": "started"})
    with pytest.raises(ApprovalError, match="is pending, not approved"):
        requests.claim(rid, connection_id="rev", user="alice", columns=["id"], batch=values)
    with pytest.raises(ApprovalError, match="own requester"):
        requests.decide(rid, user="ALICE ", approve=True)  # the same person, however the name is written
    requests.decide(rid, user="bob", approve=True)
    approval = requests.claim(rid, connection_id="rev", user="alice", columns=["id"], batch={"id": values["id"][::-1]})
    assert (approval.requester, approval.approver, approval.reason) == ("alice", "bob", "SAR 12")
    with pytest.raises(ApprovalError, match="being executed right now"):  # a second, concurrent execution
        requests.claim(rid, connection_id="rev", user="alice", columns=["id"], batch=values)
    requests.executed(rid, "use-1")
    assert [r["state"] for r in ReverseRequests(AuditLog(viewer)).list()] == ["executed"]
    assert AuditLog(owner).verify().ok
    _drop_roles(pg_url, postgres, pipeline, auditor, viewer, owner)


def test_pipeline_role_runs_a_risk_gate_a_dry_run_and_a_report(pg_url: str, issuer: Issuer, postgres: Any) -> None:
    """The gate's temporary table, the dry_run and risk_report operations, through the least-privilege roles
    (the audit appended by the server's functions, whatever the operation's name)."""
    owner = _grant(pg_url)
    with owner.begin() as conn:
        conn.execute(sa.text("CREATE TABLE gated (id text)"))
        conn.execute(sa.text("GRANT SELECT, INSERT, DELETE ON gated TO pseudonymise_pipeline"))
    pipeline = _as(pg_url, "pseudonymise_pipeline")
    store = Store(pipeline)
    policy = ColumnPolicy.pseudonymise("id")
    token = GivenToken(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys())

    def transfer():  # type: ignore[no-untyped-def]
        return plan_transfer(_Rows(), TableDestination(TableTarget("gated"), SharedTransaction(pipeline)), policy)

    with pytest.raises(RiskGateError, match="3 of 3 classes"):
        run_pseudonymisation(store, token, policy, transfer(), risk=RiskSpec(("id",), 2))
    dry = run_dry_run(store, token, policy, transfer(), sample=2, risk=RiskSpec(("id",), 2))
    assert dry.dry_run is not None and dry.dry_run["sample_rows"] == 2 and dry.dry_run["target_exists"] is True

    def describe():  # type: ignore[no-untyped-def]
        with pipeline.connect() as conn:
            return describe_table(conn, "gated", RiskSpec(("id",), 2))
    assert run_risk_report(store, describe, source="table:gated").figures.rows == 0
    with owner.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM gated")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_escrow")).scalar() == 0
        rows = conn.execute(sa.text("SELECT operation, outcome, db_role FROM pseudonymise_audit ORDER BY seq")).all()
    assert [(r[0], r[1]) for r in rows] == [("pseudonymise", "started"), ("pseudonymise", "failed"),
                                            ("dry_run", "started"), ("dry_run", "success"),
                                            ("risk_report", "started"), ("risk_report", "success")]
    assert {r[2] for r in rows} == {"pseudonymise_pipeline"}
    assert AuditLog(owner).verify().ok
    _drop_roles(pg_url, postgres, pipeline, owner)
