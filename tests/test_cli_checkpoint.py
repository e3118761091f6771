"""``pseudonymise audit keygen``, ``audit checkpoint`` and ``audit verify --witness``, run as real subprocesses
against SQLite, real PostgreSQL and real OpenBao; no private key ever appears in their output."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import hvac
import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.checkpoint import LocalSigner, SignedCheckpoint, Statement, sign_statement
from pseudonymise.core.issuer import Issuer

from tests.tampering import make_uses, rewrite_without, truncate

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, expect: int | None = 0,
        secrets_: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PSEUDONYMISE_", "VAULT_"))}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "pseudonymise.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=120, stdin=subprocess.DEVNULL)
    for secret in secrets_:
        assert secret not in proc.stdout and secret not in proc.stderr, f"a secret leaked from {args[:2]}"
    if expect is not None:
        assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    """A signing key made by `audit keygen`: the file, its private value and the public JWKS printed."""
    key = tmp_path / "audit-signing.jwk"
    proc = run("audit", "keygen", "--output", key, cwd=tmp_path)
    private = json.loads(key.read_text())
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = json.loads(proc.stdout)
    assert public["keys"][0]["kid"] == private["kid"] and "d" not in public["keys"][0]
    assert private["d"] not in proc.stdout + proc.stderr and "written to" in proc.stderr
    (tmp_path / "audit-public.jwks").write_text(proc.stdout)
    again = run("audit", "keygen", "--output", key, cwd=tmp_path, expect=1)
    assert "never overwritten" in again.stderr and json.loads(key.read_text()) == private
    return {"file": key, "d": private["d"], "public": tmp_path / "audit-public.jwks"}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_checkpoint_then_truncation_is_named_by_verify_with_a_witness(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path, issuer: Issuer, keys: dict[str, Any]) -> None:
    db = f"sqlite:///{tmp_path / 'pseudonymise.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    audit = AuditLog(sa.create_engine(db))
    witness = tmp_path / "witness.jsonl"
    hidden = (keys["d"],)
    make_uses(audit, issuer, ["pseudonymise"], None)
    proc = run("audit", "checkpoint", "--db", db, "--signing-key", keys["file"], "--witness", witness, cwd=tmp_path,
               secrets_=hidden)
    assert "of row 2 of " in proc.stdout and f"witnessed by file:{witness}" in proc.stdout
    assert "recorded in pseudonymise_audit_checkpoint" in proc.stdout
    make_uses(audit, issuer, ["reverse"], None)
    env = {"PSEUDONYMISE_AUDIT_SIGNING_KEY": keys["file"].read_text()}  # the key from the environment this time
    run("audit", "checkpoint", "--db", db, "--witness", witness, cwd=tmp_path, env=env, secrets_=hidden)
    ok = run("audit", "verify", "--db", db, "--witness", witness, "--public-keys", keys["public"], cwd=tmp_path,
             secrets_=hidden)
    assert "audit chain verified: 4 rows" in ok.stdout and "audit anchored: 2 witnessed checkpoint(s)" in ok.stdout

    truncate(audit, 2)  # the reversal is gone, the head set to row 2
    plain = run("audit", "verify", "--db", db, cwd=tmp_path)
    assert "audit chain verified: 2 rows" in plain.stdout  # the contrast: the chain alone says verified
    bad = run("audit", "verify", "--db", db, "--witness", witness, "--public-keys", keys["public"], cwd=tmp_path,
              expect=1, secrets_=hidden)
    assert "audit NOT anchored" in bad.stdout
    assert "the chain ends at row 2 but the checkpoint of " in bad.stdout and "witnessed row 4" in bad.stdout
    refused = run("audit", "checkpoint", "--db", db, "--signing-key", keys["file"], "--witness", witness, cwd=tmp_path,
                  expect=1, secrets_=hidden)
    assert "error: the chain ends at row 2 but the checkpoint of" in refused.stderr
    assert len(witness.read_text().splitlines()) == 2


def test_rewrite_and_a_forged_checkpoint_are_named(tmp_path: Path, issuer: Issuer, keys: dict[str, Any]) -> None:
    db = f"sqlite:///{tmp_path / 'pseudonymise.db'}"
    audit = AuditLog(sa.create_engine(db))
    witness = tmp_path / "witness.jsonl"
    for operation in ("pseudonymise", "reverse", "pseudonymise"):
        make_uses(audit, issuer, [operation], None)
        run("audit", "checkpoint", "--db", db, "--signing-key", keys["file"], "--witness", witness, cwd=tmp_path)
    rewrite_without(audit, "reverse")
    make_uses(audit, issuer, ["pseudonymise"], None)  # as many rows as before: only the hashes tell
    assert audit.verify().ok
    audit_id = SignedCheckpoint.from_json(witness.read_text().splitlines()[0]).audit_id
    forged = sign_statement(Statement(audit_id, 6, audit.recent(1)[0]["row_hash"], "2026-12-01T00:00:00.000000Z"),
                            LocalSigner.generate())  # the current head, "signed" under the real key's id
    with witness.open("a") as fh:
        fh.write(json.dumps({**forged.to_dict(), "kid": json.loads(keys["public"].read_text())["keys"][0]["kid"]}) + "\n")
    proc = run("audit", "verify", "--db", db, "--witness", witness, "--public-keys", keys["public"], cwd=tmp_path,
               expect=1, secrets_=(keys["d"],))
    assert "audit chain verified: 6 rows" in proc.stdout
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 3, proc.stdout
    assert lines[0].startswith("- row 4 has another row_hash than the checkpoint of ")
    assert lines[1].startswith("- the checkpoint of 2026-12-01T00:00:00Z for row 6 has a bad signature")
    assert lines[1].endswith("line 4]")
    assert lines[2].startswith("- row 6 has another row_hash than the checkpoint of ")


def test_missing_keys_and_bad_witness_specs_say_how_to_fix_them(tmp_path: Path, keys: dict[str, Any]) -> None:
    db = f"sqlite:///{tmp_path / 'pseudonymise.db'}"
    AuditLog(sa.create_engine(db)).create()  # an empty audit (a missing database is refused first: test_cli.py)
    proc = run("audit", "checkpoint", "--db", db, "--witness", tmp_path / "w.jsonl", cwd=tmp_path, expect=1)
    assert "no audit signing key: pass --signing-key FILE" in proc.stderr
    proc = run("audit", "verify", "--db", db, "--witness", tmp_path / "w.jsonl", cwd=tmp_path, expect=1)
    assert "--witness needs the audit public keys" in proc.stderr
    proc = run("audit", "checkpoint", "--db", db, "--signing-key", keys["file"], "--witness", "s3://bucket/w.jsonl",
               cwd=tmp_path, expect=1)
    assert "object-storage URIs are not supported" in proc.stderr
    proc = run("audit", "checkpoint", "--db", db, "--witness", "vault:secret/x", "--signing-key", keys["file"],
               cwd=tmp_path, expect=1)
    assert "needs VAULT_ADDR and VAULT_TOKEN" in proc.stderr
    (tmp_path / "bad.jwk").write_text(json.dumps({"kty": "OKP", "crv": "Ed25519", "d": keys["d"][:-3]}))
    proc = run("audit", "checkpoint", "--db", db, "--signing-key", tmp_path / "bad.jwk", cwd=tmp_path, expect=1)
    assert "is not a 32-byte base64url Ed25519 seed" in proc.stderr and keys["d"][:-3] not in proc.stderr
    proc = run("audit", "checkpoint", "--db", db, "--signing-key", keys["file"], cwd=tmp_path)
    assert "the audit is empty" in proc.stdout


@pytest.mark.vault
def test_transit_signing_and_a_vault_kv_witness(tmp_path: Path, issuer: Issuer, openbao: Any) -> None:
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + secrets.token_hex(4)
    client.sys.enable_secrets_engine("transit", path=mount)
    env = {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": openbao.token}
    key = f"{mount}/audit-signing"
    proc = run("audit", "keygen", "--transit-key", key, cwd=tmp_path, env=env)
    assert len(json.loads(proc.stdout)["keys"]) == 1 and "ed25519" in proc.stderr
    db = f"sqlite:///{tmp_path / 'pseudonymise.db'}"
    audit = AuditLog(sa.create_engine(db))
    kv = "vault:secret/checkpoints-" + secrets.token_hex(4)
    for operation in ("pseudonymise", "reverse"):
        make_uses(audit, issuer, [operation], None)
        proc = run("audit", "checkpoint", "--db", db, "--transit-key", key, "--witness", kv,
                   "--witness", tmp_path / "w.jsonl", cwd=tmp_path, env=env, secrets_=(openbao.token,))
        assert f"witnessed by {kv}, file:" in proc.stdout
    ok = run("audit", "verify", "--db", db, "--witness", kv, "--transit-key", key, cwd=tmp_path, env=env)
    assert "audit anchored: 2 witnessed checkpoint(s)" in ok.stdout  # both KV versions
    truncate(audit, 2)
    bad = run("audit", "verify", "--db", db, "--witness", kv, "--transit-key", key, cwd=tmp_path, env=env, expect=1)
    assert "the chain ends at row 2 but the checkpoint of " in bad.stdout and "witnessed row 4" in bad.stdout
    assert f"[vault:secret/{kv.split('/', 1)[1]} (" in bad.stdout
