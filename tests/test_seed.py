"""scripts/seed.py, which the compose file's init service and the plain-process stack run: on real OpenBao and
real PostgreSQL, twice, as every ``docker compose up`` does."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import hvac
import pytest
import sqlalchemy as sa

from scripts.seed import seed
from scripts.services import OpenBaoServer
from tests.reference import b64url_decode, claims, pseudonym

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "include/sample/patients.csv"
pytestmark = [pytest.mark.postgres, pytest.mark.vault]


def _cli(args: list[str], token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VAULT_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])
    if token is not None:
        env["VAULT_TOKEN"] = token
    return subprocess.run([sys.executable, str(ROOT / "scripts/seed.py"), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _connections(bao: OpenBaoServer, path: str) -> dict[str, dict]:
    client = hvac.Client(url=bao.addr, token=bao.token)
    names = client.secrets.kv.v2.list_secrets(path=path, mount_point="secret")["data"]["keys"]
    return {n: client.secrets.kv.v2.read_secret_version(path=f"{path}/{n}", mount_point="secret",
                                                         raise_on_deleted_version=True)["data"]["data"] for n in names}


def test_seed_twice_fills_vault_the_source_and_the_secrets_and_keeps_what_must_stay(
        openbao: OpenBaoServer, pg_url: str, tmp_path: Path) -> None:
    path = f"connections-{uuid.uuid4().hex[:8]}"
    store, secrets_dir = tmp_path / "issuer", tmp_path / "secrets"
    first = seed(vault_url=openbao.addr, vault_token=openbao.token, hospital_url=pg_url, issuer_store=store,
                 secrets_dir=secrets_dir, connections_path=path)
    conns = _connections(openbao, path)
    assert set(conns) == {"pseudonymise_research", "pseudonymise_research_reverse", "pseudonymise_vendor",
                          "pseudonymise_audit_signing"}
    kinds = {}
    for conn_id in ("pseudonymise_research", "pseudonymise_research_reverse", "pseudonymise_vendor"):
        conn = conns[conn_id]
        payload = claims(conn["password"])
        kinds[conn_id] = payload["kind"]
        assert conn["conn_type"] == "pseudonymise" and conn["extra"]["project"] == payload["sub"]
        jwks = json.loads(conn["extra"]["issuer_keys"])
        header = json.loads(b64url_decode(conn["password"].split(".")[0]))
        assert header["kid"] in {k["kid"] for k in jwks["keys"]}  # the connection trusts the key that signed it
        assert conn["password"] == first.tokens[conn_id]
    assert kinds == {"pseudonymise_research": "pseudonymisation", "pseudonymise_research_reverse": "reverse",
                     "pseudonymise_vendor": "secondary"}
    assert claims(conns["pseudonymise_research_reverse"]["password"])["max_uses"] == 1
    assert claims(conns["pseudonymise_vendor"]["password"])["source_project"] == "research-a"
    signing = json.loads(conns["pseudonymise_audit_signing"]["password"])
    assert signing["crv"] == "Ed25519" and signing["d"]

    jwt_secret, passwords = (secrets_dir / "jwt_secret").read_text(), json.loads((secrets_dir / "passwords.json").read_text())
    assert len(bytes.fromhex(jwt_secret)) >= 32
    assert len(passwords["admin"]) >= 16
    for secret_file in (secrets_dir / "jwt_secret", secrets_dir / "passwords.json", store / "audit-signing.jwk"):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600, secret_file

    with open(SAMPLE, newline="", encoding="utf-8") as fh:
        sample_rows = len(list(csv.DictReader(fh)))
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM patient_visits")).scalar() == sample_rows == first.rows_loaded

    # the second start: the CLI, as the compose service runs it
    proc = _cli(["--vault-url", openbao.addr, "--hospital-url", pg_url, "--issuer-store", str(store),
                 "--secrets-dir", str(secrets_dir), "--connections-path", path], openbao.token)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _connections(openbao, path)
    out = proc.stdout + proc.stderr
    for conn_id, conn in again.items():
        assert conn["password"] not in out
        if conn_id != "pseudonymise_audit_signing":
            assert claims(conn["password"])["jti"] in out  # named by its id only
    assert passwords["admin"] not in out and jwt_secret not in out
    assert "created" not in out  # issuer, projects, signing key, password and JWT secret were kept
    assert "already has rows, left as it is" in out and str(secrets_dir / "passwords.json") in out
    # the same project key: the deterministic examples give the same pseudonyms after a restart
    before, after = (claims(c["pseudonymise_research"]["password"]) for c in (conns, again))
    assert before["jti"] != after["jti"]
    assert pseudonym(b64url_decode(before["key"]), "P770839") == pseudonym(b64url_decode(after["key"]), "P770839")
    assert again["pseudonymise_audit_signing"] == conns["pseudonymise_audit_signing"]
    assert (secrets_dir / "jwt_secret").read_text() == jwt_secret
    assert json.loads((secrets_dir / "passwords.json").read_text()) == passwords
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM patient_visits")).scalar() == sample_rows
    engine.dispose()


def test_seed_names_what_is_missing(openbao: OpenBaoServer, tmp_path: Path) -> None:
    base = ["--vault-url", openbao.addr, "--hospital-url", "postgresql://nobody@127.0.0.1:1/x",
            "--issuer-store", str(tmp_path / "issuer"), "--secrets-dir", str(tmp_path / "secrets")]
    proc = _cli(base, None)
    assert proc.returncode == 2 and "set VAULT_TOKEN" in proc.stderr
    proc = _cli(base[2:], openbao.token)
    assert proc.returncode == 2 and "missing: --vault-url" in proc.stderr
    proc = _cli(base, "not-a-token")
    assert proc.returncode != 0 and "refused the token" in proc.stderr
    # nothing written before Vault accepted the token
    assert not (tmp_path / "secrets").exists() and not (tmp_path / "issuer").exists()
