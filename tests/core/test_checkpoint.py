"""Signed checkpoints and witnesses (docs/design.md §6.1), on SQLite and real PostgreSQL.

The attacks of issue 11 §4, made by someone who can write the audit database (its owner): cut off
the last rows and set the head to the new last row; remove the reversal rows, re-hash the rest and
set the head; forge a checkpoint. ``AuditLog.verify()`` says "verified" for the first two, and
``verify_against_witness`` names the checkpoint each contradicts.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.checkpoint import (
    CheckpointContradictionError,
    Checkpointer,
    CheckpointError,
    CheckpointFormatError,
    CheckpointTable,
    FileWitness,
    LocalSigner,
    PublicKeys,
    SignedCheckpoint,
    Statement,
    audit_id_of,
    checkpoint_after_use,
    sign_statement,
    verify_against_witness,
)
from pseudonymise.core.issuer import Issuer

from tests.tampering import make_uses, rewrite_without, truncate


@pytest.fixture
def signer() -> LocalSigner:
    return LocalSigner.generate()


def per_use(signer: LocalSigner, witness: FileWitness) -> Callable[[AuditLog], None]:
    return checkpoint_after_use(lambda audit: Checkpointer(audit, signer, [witness]))


# --- statements and keys --------------------------------------------------------------------------
def test_statement_is_canonical_and_the_signature_binds_every_field(signer: LocalSigner) -> None:
    cp = sign_statement(Statement("sqlite/a.db/-/pseudonymise_audit", 7, "ab" * 32, "2026-11-30T10:00:00.000000Z"),
                        signer)
    assert cp.text == ('{"audit_id":"sqlite/a.db/-/pseudonymise_audit","row_hash":"' + "ab" * 32 + '","seq":7,'
                       '"time":"2026-11-30T10:00:00.000000Z","typ":"pseudonymise-audit-checkpoint/v1"}')
    keys = signer.public_keys()
    assert keys.problem(SignedCheckpoint.from_json(cp.to_json())) is None
    for field, value in (("seq", 8), ("row_hash", "cd" * 32), ("audit_id", "other"), ("time", "2026-11-30T11:00:00.000000Z")):
        doc = json.loads(cp.text)
        doc[field] = value
        altered = SignedCheckpoint.from_dict({**cp.to_dict(), "statement": json.dumps(doc, sort_keys=True,
                                                                                       separators=(",", ":"))})
        assert "bad signature" in (keys.problem(altered) or ""), field
    assert "not among the trusted" in (LocalSigner.generate().public_keys().problem(cp) or "")
    with pytest.raises(CheckpointFormatError, match="canonical"):
        SignedCheckpoint.from_dict({**cp.to_dict(), "statement": cp.text.replace(",", ", ")})
    duplicate = cp.text.replace('"seq":7,', '"seq":1,"seq":7,')
    with pytest.raises(CheckpointFormatError, match="canonical"):
        SignedCheckpoint.from_dict({**cp.to_dict(), "statement": duplicate})


def test_signing_key_round_trips_and_errors_never_quote_it(signer: LocalSigner) -> None:
    jwk = signer.private_jwk()
    assert set(jwk) == {"kty", "crv", "x", "d", "kid", "alg", "use"}
    again = LocalSigner.from_jwk(json.dumps(jwk))
    assert again.kid == signer.kid and again.public_keys().to_jwks() == signer.public_keys().to_jwks()
    public = json.dumps(signer.public_keys().to_jwks())
    assert jwk["d"] not in public and "\"d\"" not in public
    assert len(PublicKeys.from_jwks(public)) == 1
    other = LocalSigner.generate().private_jwk()
    for bad in ({**jwk, "x": other["x"]}, {**jwk, "d": jwk["d"][:-2]}, {**jwk, "crv": "X25519"}, "not json " + jwk["d"]):
        with pytest.raises(CheckpointFormatError) as info:
            LocalSigner.from_jwk(bad if isinstance(bad, str) else json.dumps(bad))
        assert jwk["d"] not in str(info.value) and jwk["d"][:-2] not in str(info.value)
    assert jwk["d"] not in repr(signer)


# --- checkpoints after each use, and verification --------------------------------------------------
def test_a_checkpoint_after_each_use_and_the_witness_verifies(db_url: str, issuer: Issuer, signer: LocalSigner,
                                                              tmp_path: Path) -> None:
    audit = AuditLog(sa.create_engine(db_url))
    witness = FileWitness(tmp_path / "witness.jsonl")
    make_uses(audit, issuer, ["pseudonymise", "reverse", "pseudonymise"], per_use(signer, witness))
    lines = [SignedCheckpoint.from_json(line) for line in (tmp_path / "witness.jsonl").read_text().splitlines()]
    assert [cp.seq for cp in lines] == [2, 4, 6]
    heads = {r["seq"]: r["row_hash"] for r in audit.iter_rows()}
    assert all(cp.row_hash == heads[cp.seq] and cp.audit_id == audit_id_of(audit) for cp in lines)
    latest = CheckpointTable(audit).latest()
    assert latest is not None and latest["seq"] == 6 and latest["witnessed_by"] == witness.name
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert result.ok, str(result)
    assert result.checkpoints_checked == 3 and result.latest is not None and result.latest.seq == 6
    assert "audit anchored: 3 witnessed checkpoint(s)" in str(result)
    # the table is a witness too (inside the database: weaker, but checked the same way)
    assert verify_against_witness(audit, CheckpointTable(audit), signer.public_keys()).ok
    # a checkpoint of an unchanged head is recorded once in the table, and appended again to the file
    again = Checkpointer(audit, signer, [witness]).checkpoint()
    assert again is not None and again.checkpoint.seq == 6 and again.recorded is False
    assert audit_id_of(audit).endswith("/pseudonymise_audit")


def test_truncation_verifies_as_a_chain_but_the_witness_names_the_checkpoint(
        db_url: str, issuer: Issuer, signer: LocalSigner, tmp_path: Path) -> None:
    audit = AuditLog(sa.create_engine(db_url))
    witness = FileWitness(tmp_path / "witness.jsonl")
    make_uses(audit, issuer, ["pseudonymise", "reverse", "reverse"], per_use(signer, witness))
    truncate(audit, 2)  # the two reversals are gone, the head points at row 2
    assert audit.verify().ok  # the contrast: the chain alone cannot tell
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert not result.ok and result.chain.ok
    assert [(c.kind, c.seq) for c in result.contradictions] == [("truncated", 4), ("truncated", 6)]
    last = result.contradictions[-1]
    assert last.message.startswith("the chain ends at row 2 but the checkpoint of ")
    assert f"{last.time[:19]}Z witnessed row 6" in last.message and "line 3" in last.where
    assert "audit NOT anchored" in str(result)
    # and no signer vouches for the truncated chain: the next checkpoint is refused, naming the same checkpoint
    with pytest.raises(CheckpointContradictionError, match=r"the chain ends at row 2 but the checkpoint of .* witnessed row 6"):
        Checkpointer(audit, signer, [witness]).checkpoint()
    assert len((tmp_path / "witness.jsonl").read_text().splitlines()) == 3
    # a later use on the truncated chain is not hidden either: row 4 now has another hash
    make_uses(audit, issuer, ["pseudonymise"], per_use(signer, witness))
    kinds = [(c.kind, c.seq) for c in verify_against_witness(audit, witness, signer.public_keys()).contradictions]
    assert kinds == [("rewritten", 4), ("truncated", 6)]


def test_rewrite_without_the_reversals_verifies_as_a_chain_but_the_witness_names_the_checkpoint(
        db_url: str, issuer: Issuer, signer: LocalSigner, tmp_path: Path) -> None:
    audit = AuditLog(sa.create_engine(db_url))
    witness = FileWitness(tmp_path / "witness.jsonl")
    make_uses(audit, issuer, ["pseudonymise", "reverse", "pseudonymise", "reverse", "pseudonymise"],
              per_use(signer, witness))
    assert rewrite_without(audit, "reverse") == 6
    assert audit.verify().ok  # re-hashed with a consistent head: the chain verifies
    assert not [r for r in audit.iter_rows() if r["operation"] == "reverse"]
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert not result.ok
    assert [(c.kind, c.seq) for c in result.contradictions] == [("rewritten", 4), ("rewritten", 6), ("truncated", 8),
                                                               ("truncated", 10)]
    first = result.contradicted
    assert first is not None and first.message.startswith("row 4 has another row_hash than the checkpoint of ")
    assert "the history up to row 4 was rewritten" in first.message
    with pytest.raises(CheckpointContradictionError, match="rows were cut off"):
        Checkpointer(audit, signer, [witness]).checkpoint()
    # with as many rows again (fake uses appended), the rewritten rows are still named
    make_uses(audit, issuer, ["pseudonymise"] * 2, None)
    kinds = [(c.kind, c.seq) for c in verify_against_witness(audit, witness, signer.public_keys()).contradictions]
    assert kinds == [("rewritten", 4), ("rewritten", 6), ("rewritten", 8), ("rewritten", 10)]
    with pytest.raises(CheckpointContradictionError, match="row 10 does not have the row_hash that the checkpoint of"):
        Checkpointer(audit, signer, [witness]).checkpoint()


def test_forged_checkpoints_are_named(db_url: str, issuer: Issuer, signer: LocalSigner, tmp_path: Path) -> None:
    audit = AuditLog(sa.create_engine(db_url))
    path = tmp_path / "witness.jsonl"
    witness = FileWitness(path)
    make_uses(audit, issuer, ["pseudonymise", "reverse"], per_use(signer, witness))
    truncate(audit, 2)
    genuine = [SignedCheckpoint.from_json(line) for line in path.read_text().splitlines()]
    head = audit.recent(1)[0]
    # 1. a checkpoint of the truncated head, signed by the attacker's key under the real key id
    attacker = LocalSigner.generate()
    forged = sign_statement(Statement(audit_id_of(audit), 2, head["row_hash"], genuine[-1].time), attacker)
    forged = SignedCheckpoint(forged.statement, forged.text, forged.signature, signer.kid)
    # 2. the genuine latest checkpoint with its row changed, signature kept
    moved = json.loads(genuine[-1].text)
    moved.update(seq=2, row_hash=head["row_hash"])
    moved_text = json.dumps(moved, sort_keys=True, separators=(",", ":"))
    with path.open("a") as fh:
        fh.write(forged.to_json() + "\n")
        fh.write(json.dumps({**genuine[-1].to_dict(), "statement": moved_text}) + "\n")
        fh.write("{not a checkpoint\n")
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert not result.ok
    found = [(c.kind, c.seq, c.where.rsplit(" ", 1)[-1]) for c in result.contradictions]
    assert found == [("bad-signature", 2, "3"), ("bad-signature", 2, "4"), ("truncated", 4, "2"),
                     ("malformed", None, "5")], found
    assert all("has a bad signature" in c.message and "forged or altered" in c.message
               for c in result.contradictions if c.kind == "bad-signature")
    # a forged checkpoint does not hide the truncation from the signer either
    with pytest.raises(CheckpointContradictionError, match="witnessed row 4"):
        Checkpointer(audit, signer, [witness]).checkpoint()


def test_an_empty_or_foreign_witness_is_not_a_verification(db_url: str, issuer: Issuer, signer: LocalSigner,
                                                           tmp_path: Path) -> None:
    audit = AuditLog(sa.create_engine(db_url))
    witness = FileWitness(tmp_path / "witness.jsonl")
    make_uses(audit, issuer, ["pseudonymise"], None)
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert not result.ok and result.chain.ok
    assert result.contradictions[0].kind == "missing" and "pseudonymise audit checkpoint" in result.contradictions[0].message
    Checkpointer(audit, signer, [witness], audit_id="warehouse-audit").checkpoint()
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert "it holds checkpoints of warehouse-audit: pass --audit-id" in result.contradictions[0].message
    assert verify_against_witness(audit, witness, signer.public_keys(), audit_id="warehouse-audit").ok


def test_a_failed_checkpoint_does_not_undo_the_use(sqlite_url: str, issuer: Issuer, signer: LocalSigner,
                                                   tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(sa.create_engine(sqlite_url))
    broken = FileWitness(tmp_path / "no-such-folder" / "witness.jsonl")
    with caplog.at_level(logging.WARNING):
        make_uses(audit, issuer, ["pseudonymise"], per_use(signer, broken))
    assert [r["outcome"] for r in audit.iter_rows()] == ["started", "success"]
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "the audit checkpoint after this use failed (WitnessError: the checkpoint of row 2 was signed and " \
           "recorded in the table, but 1 witness(es) failed: cannot append" in warning
    assert "the use stands" in warning
    assert signer.private_jwk()["d"] not in caplog.text
    latest = CheckpointTable(audit).latest()
    assert latest is not None and latest["seq"] == 2 and latest["witnessed_by"] is None

    def explode(_audit: AuditLog) -> Checkpointer:
        raise RuntimeError("boom with text that must not be logged")

    make_uses(audit, issuer, ["pseudonymise"], checkpoint_after_use(explode))
    assert [r["outcome"] for r in audit.iter_rows()][-1] == "success"
    assert "failed (RuntimeError)" in caplog.text and "must not be logged" not in caplog.text


# --- PostgreSQL: checkpoints go in only through the SECURITY DEFINER function -----------------------
@pytest.fixture
def restricted(pg_url: str, postgres: Any) -> Iterator[tuple[sa.Engine, sa.Engine, str]]:
    """(owner engine, engine of a role granted only what checkpointing needs, role name)."""
    role = f"cp_pipeline_{uuid.uuid4().hex[:8]}"
    owner = sa.create_engine(pg_url)
    with owner.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
    engine = sa.create_engine(sa.make_url(pg_url).set(username=role))
    yield owner, engine, role
    engine.dispose()
    with owner.begin() as conn:
        conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
        conn.execute(sa.text(f'DROP ROLE "{role}"'))
    owner.dispose()


@pytest.mark.postgres
def test_pipeline_role_adds_checkpoints_only_through_the_function(
        restricted: tuple[sa.Engine, sa.Engine, str], issuer: Issuer, signer: LocalSigner, tmp_path: Path) -> None:
    owner, engine, role = restricted
    owned = AuditLog(owner)
    make_uses(owned, issuer, ["pseudonymise"], None)
    table = CheckpointTable(owned)
    table.create()
    with owner.begin() as conn:  # EXECUTE on the two functions, nothing on the audit, its head or the checkpoints
        for grant in table.grants_sql(role):
            conn.execute(sa.text(grant))
    audit = AuditLog(engine)
    witness = FileWitness(tmp_path / "witness.jsonl")
    result = Checkpointer(audit, signer, [witness]).checkpoint()
    assert result is not None and result.recorded and result.checkpoint.seq == 2
    for statement in ("SELECT seq FROM pseudonymise_audit_checkpoint", "SELECT seq FROM pseudonymise_audit_head",
                      "INSERT INTO pseudonymise_audit_checkpoint (seq, key_id, row_hash, signed_at, statement, signature)"
                      " VALUES (9, 'k', 'h', now(), 's', 'x')",
                      "UPDATE pseudonymise_audit_checkpoint SET row_hash = 'h'",
                      "DELETE FROM pseudonymise_audit_checkpoint"):
        with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text(statement))
    # the function refuses a checkpoint that is not the audit row's, however it is signed
    other = sign_statement(Statement(audit_id_of(audit), 2, "ab" * 32, result.checkpoint.time), signer)
    with pytest.raises(CheckpointError, match="SQLSTATE 23514"):
        CheckpointTable(audit).add(other)
    call = sa.text("SELECT pseudonymise_audit_checkpoint_add(1, :h, now(), :s, 'x', 'k', NULL)")
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError, match="does not state row 1"):
        conn.execute(call, {"h": result.checkpoint.row_hash, "s": result.checkpoint.text})  # the statement says row 2
    # EXECUTE is not granted to PUBLIC: a role without the grant cannot call it
    with owner.begin() as conn:
        conn.execute(sa.text(f'REVOKE EXECUTE ON FUNCTION {table.function_signature(conn)} FROM "{role}"'))
    with pytest.raises(CheckpointError, match="SQLSTATE 42501"):
        CheckpointTable(audit).add(result.checkpoint)
    with owner.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pseudonymise_audit_checkpoint")).scalar() == 1
        definer = conn.execute(sa.text("SELECT prosecdef FROM pg_proc WHERE proname = 'pseudonymise_audit_checkpoint_add'"))
        assert definer.scalar() is True
    assert verify_against_witness(owned, witness, signer.public_keys()).ok
    # the server-side check refuses to hand the restricted role the head of a truncated chain
    make_uses(owned, issuer, ["reverse"], None)
    with owner.begin() as conn:  # the role may checkpoint again
        conn.execute(sa.text(f'GRANT EXECUTE ON FUNCTION {table.function_signature(conn)} TO "{role}"'))
    assert Checkpointer(audit, signer, [witness]).checkpoint().checkpoint.seq == 4  # type: ignore[union-attr]
    truncate(owned, 2)
    with pytest.raises(CheckpointContradictionError, match=r"the chain ends at row 2 but the checkpoint of .* witnessed row 4"):
        Checkpointer(audit, signer, [witness]).checkpoint()
    with owner.begin() as conn:  # the owner removed the witnessed checkpoints from the table too; put one back
        conn.execute(CheckpointTable(owned).table.insert().values(
            seq=2, key_id="k", row_hash="ab" * 32, signed_at=sa.func.now(), statement="{}", signature="x"))
    with pytest.raises(CheckpointContradictionError, match=r"row 2 does not have the row_hash that the checkpoint of "
                                                           r".* recorded in pseudonymise_audit_checkpoint"):
        Checkpointer(audit, signer, []).checkpoint()
