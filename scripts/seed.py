"""Seed a stack so that the example DAGs run: the issuer and its projects, the token connections in Vault,
Airflow's login password and JWT secret, and the sample source table.

The compose file's ``airflow-seed`` service runs it before Airflow starts, and the plain-process stack
(``scripts/full_stack.py``, the stack tests) runs the same :func:`seed`, so the tests prove the seeding.
It can run again at every start: the issuer, its projects, the audit signing key, the login password and
the JWT secret are created once and kept (so the deterministic examples give the same pseudonyms after a
restart), the tokens are issued afresh (a dev Vault forgets its secrets when it stops), and the sample
rows are loaded only into an empty table.

What it seeds (the connection ids the example DAGs name), under ``<mount>/<connections path>/`` in KV v2,
where Airflow's ``VaultBackend`` reads connections:

* ``pseudonymise_research``: a pseudonymisation token of ``research-a`` (reversible, deterministic);
* ``pseudonymise_research_reverse``: a reverse token of ``research-a``, usable once;
* ``pseudonymise_vendor``: a secondary token of ``vendor-x`` over ``research-a``'s pseudonyms;
* ``pseudonymise_audit_signing``: the audit signing key (the hourly checkpoint DAG).

Nothing secret is printed: tokens appear as their ids, the password as the file that holds it.

    python scripts/seed.py --vault-url http://vault:8200 --hospital-url postgresql://u:p@postgres/hospital \\
        --issuer-store /opt/airflow/issuer --secrets-dir /opt/airflow/secrets
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import hvac
import sqlalchemy as sa
from pseudonymise.core.checkpoint import LocalSigner
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.tokens import verify_token

ROOT = Path(__file__).resolve().parent.parent
ISSUER_ID = "example-hospital"
RESEARCH, VENDOR = "research-a", "vendor-x"
SOURCE_TABLE = "patient_visits"
#: the Airflow user the compose file and the plain-process stack sign in as
LOGIN_USER = "admin"


@dataclass
class SeedResult:
    """What :func:`seed` did. ``tokens`` holds the secrets it issued, for the caller's own checks: never log it."""

    issuer: Issuer
    tokens: dict[str, str] = field(repr=False)
    passwords_file: Path
    jwt_secret_file: Path
    rows_loaded: int
    created: list[str]


def _secret_file(path: Path, make: str) -> bool:
    """Write ``make`` to ``path`` (mode 0600) unless it exists; True when it was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(make)
    return True


def _issuer(store_dir: Path, created: list[str]) -> Issuer:
    store = DirectoryStore(store_dir)
    if store.read("issuer") is None:
        Issuer.init(store, ISSUER_ID)
        created.append(f"issuer {ISSUER_ID} in {store_dir}")
    issuer = Issuer(store)
    if store.read(f"projects/{RESEARCH}") is None:
        issuer.create_project(RESEARCH, method="reversible", treatment="deterministic", retention=timedelta(days=365))
        created.append(f"project {RESEARCH} (reversible, deterministic, retention 365 days)")
    if store.read(f"projects/{VENDOR}") is None:
        issuer.create_project(VENDOR, method="irreversible", treatment="deterministic")
        created.append(f"project {VENDOR} (irreversible, for secondary pseudonyms over {RESEARCH})")
    return issuer


def _load_source(hospital_url: str, sample: Path) -> int:
    """The sample visits into ``patient_visits`` (PostgreSQL), when the table is new or empty."""
    engine = sa.create_engine(hospital_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                f"CREATE TABLE IF NOT EXISTS {SOURCE_TABLE} (visit_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " patient_id text, name text, birth_year integer, visit_date date, diagnosis_code text, ward text)"))
            if conn.execute(sa.text(f"SELECT EXISTS (SELECT 1 FROM {SOURCE_TABLE})")).scalar():
                return 0
            with open(sample, encoding="utf-8", newline="") as fh:
                rows = [{k: (v or None) for k, v in r.items()} for r in csv.DictReader(fh)]
            conn.execute(sa.text(
                f"INSERT INTO {SOURCE_TABLE} (patient_id, name, birth_year, visit_date, diagnosis_code, ward)"
                " VALUES (:patient_id, :name, CAST(:birth_year AS int), CAST(:visit_date AS date), :diagnosis_code,"
                " :ward)"), rows)
            return len(rows)
    finally:
        engine.dispose()


def seed(*, vault_url: str, vault_token: str, hospital_url: str, issuer_store: Path, secrets_dir: Path,
         sample: Path = ROOT / "include/sample/patients.csv", mount: str = "secret",
         connections_path: str = "connections", token_days: int = 30) -> SeedResult:
    """Seed Vault, the secrets folder and the hospital database; see the module's docstring."""
    client = hvac.Client(url=vault_url, token=vault_token, timeout=30)
    if not client.is_authenticated():
        raise SystemExit(f"seed: Vault at {vault_url} refused the token; give a token that may write {mount}/")
    created: list[str] = []
    issuer = _issuer(Path(issuer_store), created)
    jwks = json.dumps(issuer.public_keys().to_jwks())
    lifetime = timedelta(days=token_days)
    tokens = {
        "pseudonymise_research": issuer.issue(RESEARCH, "pseudonymisation", expires_in=lifetime),
        "pseudonymise_research_reverse": issuer.issue(RESEARCH, "reverse", expires_in=lifetime, max_uses=1),
        "pseudonymise_vendor": issuer.issue(VENDOR, "secondary", expires_in=lifetime, source_project=RESEARCH),
    }
    projects = {"pseudonymise_research": RESEARCH, "pseudonymise_research_reverse": RESEARCH,
                "pseudonymise_vendor": VENDOR}
    signing_key = Path(issuer_store) / "audit-signing.jwk"
    if _secret_file(signing_key, json.dumps(LocalSigner.generate().private_jwk()) + "\n"):
        created.append(f"audit signing key in {signing_key}")

    for conn_id, token in tokens.items():
        doc = {"conn_type": "pseudonymise", "password": token, "extra": {"issuer_keys": jwks, "project": projects[conn_id]}}
        client.secrets.kv.v2.create_or_update_secret(path=f"{connections_path}/{conn_id}", secret=doc, mount_point=mount)
    client.secrets.kv.v2.create_or_update_secret(
        path=f"{connections_path}/pseudonymise_audit_signing", mount_point=mount,
        secret={"conn_type": "generic", "password": signing_key.read_text().strip()})

    secrets_dir = Path(secrets_dir)
    passwords, jwt_secret = secrets_dir / "passwords.json", secrets_dir / "jwt_secret"
    if _secret_file(passwords, json.dumps({LOGIN_USER: secrets.token_urlsafe(16)})):
        created.append(f"the password of Airflow's {LOGIN_USER!r} user in {passwords}")
    # 64 random bytes, hex: the JWT library's HMAC key, well past the 32 bytes it asks for
    if _secret_file(jwt_secret, secrets.token_hex(64)):
        created.append(f"Airflow's JWT secret in {jwt_secret}")
    rows = _load_source(hospital_url, Path(sample))
    return SeedResult(issuer, tokens, passwords, jwt_secret, rows, created)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vault-url", default=env("VAULT_ADDR"), help="Vault or OpenBao address (default VAULT_ADDR)")
    parser.add_argument("--hospital-url", default=env("SEED_HOSPITAL_URL"),
                        help="SQLAlchemy URL of the hospital (source) database, PostgreSQL (default SEED_HOSPITAL_URL)")
    parser.add_argument("--issuer-store", default=env("PSEUDONYMISE_STORE"),
                        help="folder of the issuer and its projects, kept between runs (default PSEUDONYMISE_STORE)")
    parser.add_argument("--secrets-dir", default=env("SEED_SECRETS_DIR"),
                        help="folder for Airflow's passwords.json and jwt_secret (default SEED_SECRETS_DIR)")
    parser.add_argument("--sample", default=str(ROOT / "include/sample/patients.csv"), help="the sample visits (CSV)")
    parser.add_argument("--mount", default="secret", help="the KV v2 mount of Airflow's VaultBackend (default secret)")
    parser.add_argument("--connections-path", default="connections",
                        help="the VaultBackend's connections_path (default connections)")
    parser.add_argument("--token-days", type=int, default=30, help="lifetime of the issued tokens in days (default 30)")
    args = parser.parse_args(argv)
    missing = [name for name in ("vault_url", "hospital_url", "issuer_store", "secrets_dir") if not getattr(args, name)]
    if missing:
        parser.error("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    vault_token = env("VAULT_TOKEN")
    if not vault_token:
        parser.error("set VAULT_TOKEN to a Vault token that may write the connections (never passed as an argument)")
    result = seed(vault_url=args.vault_url, vault_token=vault_token, hospital_url=args.hospital_url,
                  issuer_store=Path(args.issuer_store), secrets_dir=Path(args.secrets_dir), sample=Path(args.sample),
                  mount=args.mount, connections_path=args.connections_path, token_days=args.token_days)
    for line in result.created:
        print(f"created {line}")
    keys = result.issuer.public_keys()
    for conn_id, token in result.tokens.items():
        claims = verify_token(token, keys)
        print(f"connection {conn_id}: {claims.kind} token {claims.jti} of project {claims.project}, "
              f"expires {claims.expires.isoformat()}")
    print("connection pseudonymise_audit_signing: the audit signing key")
    print(f"source table {SOURCE_TABLE}: {result.rows_loaded} sample rows loaded" if result.rows_loaded
          else f"source table {SOURCE_TABLE}: already has rows, left as it is")
    print(f"sign in as {LOGIN_USER!r} with the password in {result.passwords_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
