"""Trust model v1.1, attacked through the least-privilege roles of include/sql/least_privilege.sql on real
PostgreSQL: escrow that proves itself (docs/design.md §5.1), an audit only the server appends to (§6.1), claims
of refused tokens kept apart (§6), retention on the database's clock.

Each attack here succeeded on the product before v1.1 (commit 7606545): the forged escrow row was revealed,
the pipeline role rewrote the audit and moved its head, a worker with its clock set back reversed after
the retention end.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pseudonymise.core import tokens as tokens_module
from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.errors import EscrowIntegrityError, RetentionEndedError
from pseudonymise.core.escrow import batch_digest, unproven_rows
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation, run_reversal
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sealer import AD_VERSION, associated_data, seal_key
from pseudonymise.core.tokens import Token, verify_token
from pseudonymise.core.use import GivenToken, RunContext
from sqlalchemy.engine import Engine

from scripts.services import PostgresServer
from tests import reference

pytestmark = pytest.mark.postgres
GRANTS = Path(__file__).resolve().parents[2] / "include/sql/least_privilege.sql"
ROLES = ("pseudonymise_pipeline", "pseudonymise_auditor", "pseudonymise_viewer")
POLICY = ColumnPolicy.pseudonymise("id")


@dataclass
class Roles:
    owner: Engine
    pipeline: Engine
    auditor: Engine
    viewer: Engine


@pytest.fixture
def roles(pg_url: str, postgres: PostgresServer) -> Iterator[Roles]:
    """The audit owner creates the tables and runs least_privilege.sql; each role connects as itself."""
    owner = sa.create_engine(pg_url)
    Store(owner).create()
    with owner.begin() as conn:
        for role in ROLES:
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        for statement in GRANTS.read_text().split(";"):
            code = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--")).strip()
            if code:
                conn.execute(sa.text(code))
    engines = Roles(owner, *(sa.create_engine(sa.make_url(pg_url).set(username=r)) for r in ROLES))
    yield engines
    for engine in (engines.owner, engines.pipeline, engines.auditor, engines.viewer):
        engine.dispose()
    with sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT").connect() as conn:
        db = sa.make_url(pg_url).database
        conn.execute(sa.text(f'DROP DATABASE "{db}" WITH (FORCE)'))
        for role in ROLES:
            conn.execute(sa.text(f"DROP ROLE {role}"))
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))


class _Rows:
    columns: ClassVar[list[str]] = ["id"]

    def __init__(self, *values: str) -> None:
        self.values = list(values)

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        yield {"id": list(self.values)}


class _Collect:
    def __init__(self) -> None:
        self.rows: list[dict[str, list[Any]]] = []

    def write(self, batch: dict[str, list[Any]]) -> None:
        self.rows.append(batch)

    def commit(self) -> None: ...
    def abort(self) -> None: ...


def _pseudonym(token: Token, value: str) -> str:
    """The pseudonym of ``value`` by docs/design.md §4 written out again (:mod:`tests.reference`)."""
    return str(reference.token_pseudonyms(token.raw, [value])[0])


def _forge(engine: Engine, token: Token, pseudonym: str, value: str) -> tuple[str, str]:
    """What a holder of the pipeline role and a pseudonymisation token can write: an escrow row, sealed to
    the project's escrow public key with correct v1.1 associated data, that maps ``pseudonym`` to ``value``."""
    dek, batch_id, nonce = AESGCM.generate_key(bit_length=256), str(uuid.uuid4()), bytes(12)
    ciphertext = AESGCM(dek).encrypt(nonce, b"str\x00" + value.encode(), associated_data(
        token.project, pseudonym, "", token.key_version, token.retention_until))
    store = Store(engine)
    with engine.begin() as conn:
        conn.execute(store.escrow.batches.insert(), {
            "batch_id": batch_id, "project": token.project, "sealed_dek": seal_key(dek, token.escrow_public_key),  # type: ignore[arg-type]
            "created_at": datetime.now(UTC), "retention_until": token.retention_until, "domain": "",
            "key_version": token.key_version, "ad_version": AD_VERSION})
        conn.execute(store.escrow.values.insert(), {
            "project": token.project, "pseudonym": pseudonym, "batch_id": batch_id, "nonce": nonce,
            "ciphertext": ciphertext, "retention_until": token.retention_until})
    return batch_id, batch_digest([(pseudonym, nonce, ciphertext)])


def _reverse(engine: Engine, issuer: Issuer, project: str, pseudonyms: list[str]) -> dict[str, Any]:
    sink = _Collect()
    run_reversal(Store(engine), GivenToken(issuer.issue(project, "reverse"), issuer.public_keys()), ["id"],
                 plan_transfer(_Rows(*pseudonyms), SinkFactory(lambda cols, conn: sink)), RunContext(triggered_by="alice"))
    return dict(zip(pseudonyms, sink.rows[0]["id"], strict=True))


def _audit_rows(engine: Engine) -> list[dict[str, Any]]:
    return list(AuditLog(engine).iter_rows())


# --- escrow authenticity ----------------------------------------------------------------------------
def test_forged_escrow_row_is_refused_not_revealed(roles: Roles, issuer: Issuer) -> None:
    """The attack of issue 11, item 1: a pre-inserted row mapping patient X's pseudonym to another person."""
    raw = issuer.issue("research-a", "pseudonymisation")
    token = verify_token(raw, issuer.public_keys())
    px = _pseudonym(token, "PATIENT-X")
    forged, digest = _forge(roles.pipeline, token, px, "SOMEONE-ELSE")
    # the legitimate run keeps the forged row (ON CONFLICT DO NOTHING): 0 escrow rows of its own
    summary = run_pseudonymisation(Store(roles.pipeline), GivenToken(raw, issuer.public_keys()), POLICY,
                                   plan_transfer(_Rows("PATIENT-X", "PATIENT-Z"), SinkFactory(lambda cols, conn: _Collect())))
    assert summary.counts["escrow_rows"] == 1
    # the attacker also appends a "success" row listing the forged batch with its true digest
    with roles.pipeline.connect() as conn:
        AuditLog(roles.pipeline).append(conn, {
            **AuditUse(operation="pseudonymise", project="research-a").record(), "event": "finished",
            "outcome": "success", "details": json.dumps({"escrow_batches": {forged: digest}})})
        conn.commit()
    pz = _pseudonym(token, "PATIENT-Z")
    assert _reverse(roles.auditor, issuer, "research-a", [pz]) == {pz: "PATIENT-Z"}
    with pytest.raises(EscrowIntegrityError) as refused:
        _reverse(roles.auditor, issuer, "research-a", [px, pz])
    message = str(refused.value)
    assert px in message and "SOMEONE-ELSE" not in message and "PATIENT" not in message
    last = _audit_rows(roles.owner)[-1]
    assert (last["operation"], last["outcome"], last["error_class"]) == ("reverse", "failed", "EscrowRefusedError")
    assert "SOMEONE-ELSE" not in json.dumps(last, default=str)
    # the auditor's list: by digests alone the forged batch looks listed; with the reverse token every row
    # is checked as reversal checks it, and the forged one is named, by pseudonym
    reverse = verify_token(issuer.issue("research-a", "reverse"), issuer.public_keys())
    with roles.auditor.connect() as conn:
        listed = AuditLog(roles.auditor).listed_escrow_batches(conn)
        assert unproven_rows(conn, Store(roles.auditor).escrow, listed) == []
        unproven = unproven_rows(conn, Store(roles.auditor).escrow, listed, token=reverse)
    assert [(u.pseudonym, u.batch_id) for u in unproven] == [(px, forged)]
    assert "give this pseudonym again" in unproven[0].reason


def test_escrow_row_outside_any_audited_use_is_refused_in_randomised_projects(roles: Roles, issuer: Issuer) -> None:
    """Randomised projects cannot recompute: a batch no successful use listed is never shown."""
    raw = issuer.issue("random-r", "pseudonymisation")
    token = verify_token(raw, issuer.public_keys())
    sink = _Collect()
    run_pseudonymisation(Store(roles.pipeline), GivenToken(raw, issuer.public_keys()), POLICY,
                         plan_transfer(_Rows("R1", "R2"), SinkFactory(lambda cols, conn: sink)))
    real = [p for p in sink.rows[0]["id"]]
    fake = "f" * 26
    _forge(roles.pipeline, token, fake, "INVENTED")
    assert sorted(_reverse(roles.auditor, issuer, "random-r", real).values()) == ["R1", "R2"]
    with pytest.raises(EscrowIntegrityError, match="not listed by a successful use"):
        _reverse(roles.auditor, issuer, "random-r", [fake])


def test_escrow_row_added_to_a_listed_batch_is_refused(roles: Roles, issuer: Issuer) -> None:
    """A row slipped into a real batch (its id is no secret) breaks that batch's digest."""
    raw = issuer.issue("random-r", "pseudonymisation")
    token = verify_token(raw, issuer.public_keys())
    sink = _Collect()
    run_pseudonymisation(Store(roles.pipeline), GivenToken(raw, issuer.public_keys()), POLICY,
                         plan_transfer(_Rows("R1"), SinkFactory(lambda cols, conn: sink)))
    with roles.owner.connect() as conn:
        batch_id = conn.execute(sa.text("SELECT batch_id FROM pseudonymise_escrow")).scalar_one()
    with roles.pipeline.begin() as conn:
        conn.execute(sa.text("INSERT INTO pseudonymise_escrow VALUES ('random-r', :p, :b, :n, :c, :r)"),
                     {"p": "g" * 26, "b": batch_id, "n": (7).to_bytes(12, "big"), "c": b"\x00" * 32,
                      "r": token.retention_until})
    with pytest.raises(EscrowIntegrityError, match="differ from the digest"):
        _reverse(roles.auditor, issuer, "random-r", sink.rows[0]["id"])


def test_a_later_listing_by_an_appending_role_cannot_make_a_real_batch_unrevealable(roles: Roles,
                                                                                    issuer: Issuer) -> None:
    """Batch ids are no secret to the pipeline role (it may read them), and it may append any audit row: a
    ``success`` row listing a real batch with a junk digest, even one that says it is an erasure, must not
    make that batch's genuine rows refused. A batch's first listing stands; only an ``erase`` row written by a
    role that may delete escrow rows re-lists it, as a real erasure does."""
    from pseudonymise.core.erase import erase_by_pseudonyms

    raw = issuer.issue("random-r", "pseudonymisation")
    sink = _Collect()
    run_pseudonymisation(Store(roles.pipeline), GivenToken(raw, issuer.public_keys()), POLICY,
                         plan_transfer(_Rows("R1", "R2", "R3"), SinkFactory(lambda cols, conn: sink)))
    p1, p2, p3 = sink.rows[0]["id"]
    with roles.pipeline.connect() as conn:
        batch_id = conn.execute(sa.text("SELECT DISTINCT batch_id FROM pseudonymise_escrow")).scalar_one()

    def junk(operation: str) -> None:
        with roles.pipeline.connect() as conn:
            AuditLog(roles.pipeline).append(conn, {
                **AuditUse(operation=operation, project="random-r").record(), "event": "finished",
                "outcome": "success", "details": json.dumps({"escrow_batches": {batch_id: "0" * 64}})})
            conn.commit()

    junk("pseudonymise")
    junk("erase")
    assert _reverse(roles.auditor, issuer, "random-r", [p1, p2, p3]) == {p1: "R1", p2: "R2", p3: "R3"}
    with roles.auditor.connect() as conn:
        listed = AuditLog(roles.auditor).listed_escrow_batches(conn, Store(roles.auditor).escrow.values)
        assert unproven_rows(conn, Store(roles.auditor).escrow, listed) == []
    # a real erasure, by a role that may delete escrow rows (the owner here), re-lists the batch
    erase_by_pseudonyms(Store(roles.owner), "random-r", [p1])
    erasure = _audit_rows(roles.owner)[-1]
    assert (erasure["operation"], erasure["outcome"], erasure["db_role"]) == ("erase", "success", "postgres")
    junk("erase")  # and a forged erasure after it changes nothing either
    assert _reverse(roles.auditor, issuer, "random-r", [p2, p3]) == {p2: "R2", p3: "R3"}
    assert _reverse(roles.auditor, issuer, "random-r", [p1]) == {p1: None}
    assert AuditLog(roles.owner).verify().ok


def test_retention_is_judged_by_the_databases_clock(roles: Roles, issuer: Issuer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose clock is set back must not reverse past the retention end. The worker's clock is
    the one thing mocked here (``time.time`` in the token module): setting the machine's real clock back
    would need root over the whole test host and disturb every other process."""
    issuer.create_project("short", method="reversible", treatment="deterministic", retention=timedelta(seconds=3))
    sink = _Collect()
    run_pseudonymisation(Store(roles.pipeline), GivenToken(issuer.issue("short", "pseudonymisation"),
                                                           issuer.public_keys()),
                         POLICY, plan_transfer(_Rows("P1"), SinkFactory(lambda cols, conn: sink)))
    reverse = issuer.issue("short", "reverse")
    end = verify_token(reverse, issuer.public_keys()).retention_until
    time.sleep(max(0.0, end.timestamp() - time.time()) + 0.5)  # the database's clock is past the end now
    monkeypatch.setattr(tokens_module.time, "time", lambda: end.timestamp() - 1)  # the worker's is not
    assert verify_token(reverse, issuer.public_keys()).retention_until == end  # the worker alone would accept
    with pytest.raises(RetentionEndedError, match="database's clock"):
        run_reversal(Store(roles.auditor), GivenToken(reverse, issuer.public_keys()), ["id"],
                     plan_transfer(_Rows(sink.rows[0]["id"][0]), SinkFactory(lambda cols, conn: _Collect())))
    last = _audit_rows(roles.owner)[-1]
    assert (last["outcome"], last["error_class"]) == ("denied", "RetentionEndedError")


# --- an audit only the server appends to ----------------------------------------------------------
def test_pipeline_role_cannot_rewrite_the_audit_or_move_its_head(roles: Roles, issuer: Issuer) -> None:
    """The attack of issue 11, item 4, by the pipeline role itself."""
    run_pseudonymisation(Store(roles.pipeline), GivenToken(issuer.issue("research-b", "pseudonymisation"),
                                                           issuer.public_keys()),
                         POLICY, plan_transfer(_Rows("A"), SinkFactory(lambda cols, conn: _Collect())))
    for statement in ("DELETE FROM pseudonymise_audit WHERE seq > 1",
                      "UPDATE pseudonymise_audit SET outcome = 'failed'",
                      "UPDATE pseudonymise_audit_head SET seq = 1",
                      "INSERT INTO pseudonymise_audit (seq, use_id, event, recorded_at, prev_hash, row_hash) "
                      "VALUES (99, 'x', 'finished', now(), 'x', 'x')",
                      "SELECT * FROM pseudonymise_audit", "SELECT ciphertext FROM pseudonymise_escrow"):
        with roles.pipeline.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(statement))
    # what it can append is placed, timed, chained and signed with its own role by the server
    before = datetime.now(UTC) - timedelta(minutes=1)
    with roles.pipeline.connect() as conn:
        row = AuditLog(roles.pipeline).append(conn, {
            "use_id": "fake", "event": "finished", "operation": "reverse", "outcome": "success",
            "triggered_by": "alice", "seq": 1, "recorded_at": datetime(2020, 1, 1, tzinfo=UTC),
            "prev_hash": "0" * 64, "row_hash": "1" * 64, "db_role": "postgres"})
        conn.commit()
    rows = _audit_rows(roles.owner)
    assert row["seq"] == len(rows) == rows[-1]["seq"] and rows[-1]["recorded_at"] > before
    assert rows[-1]["db_role"] == "pseudonymise_pipeline" and rows[-2]["db_role"] == "pseudonymise_pipeline"
    assert rows[-1]["prev_hash"] == rows[-2]["row_hash"]
    assert AuditLog(roles.owner).verify().ok
    # the viewer reads, and appends nothing
    assert len(_audit_rows(roles.viewer)) == len(rows)
    with roles.viewer.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
        AuditLog(roles.viewer).append(conn, {"use_id": "v", "event": "finished", "outcome": "success"})


def test_public_cannot_append(roles: Roles, pg_url: str, postgres: PostgresServer) -> None:
    """PostgreSQL lets PUBLIC execute a new function; the audit's append function is revoked from PUBLIC."""
    with roles.owner.begin() as conn:
        conn.execute(sa.text("DROP ROLE IF EXISTS pseudonymise_stranger"))
        conn.execute(sa.text("CREATE ROLE pseudonymise_stranger LOGIN"))
    stranger = sa.create_engine(sa.make_url(pg_url).set(username="pseudonymise_stranger"))
    try:
        with stranger.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            AuditLog(stranger).append(conn, {"use_id": "s", "event": "finished", "outcome": "success"})
    finally:
        stranger.dispose()
        with roles.owner.begin() as conn:
            conn.execute(sa.text("DROP ROLE pseudonymise_stranger"))


AWKWARD = ["quote \" backslash \\ slash /", "tab\tnewline\ncr\r", "\x01\x1f\x7f bell \x07", "Zoë 日本 🙂",
           "\u2028\u2029", "", "a" * 3000]


def test_the_servers_hash_equals_the_verifiers(roles: Roles) -> None:
    """The append function's canonical JSON is the verifier's, for every awkward text a row can hold."""
    log = AuditLog(roles.pipeline)
    for n, text in enumerate(AWKWARD):
        with roles.pipeline.connect() as conn:
            log.append(conn, {"use_id": str(n), "event": "finished", "operation": "pseudonymise", "outcome": "failed",
                              "error_message": text, "details": json.dumps({"t": text}), "rows_in": n,
                              "claimed": json.dumps({"jti": text[:50]})})
            conn.commit()
    result = AuditLog(roles.owner).verify()
    assert result.ok and result.rows_checked == len(AWKWARD), result
