"""The issuer and its project stores: a private directory, or OpenBao / Vault KV v2."""

from __future__ import annotations

import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pseudonymise.core.errors import IssuerError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.issuer import DirectoryStore, Issuer, Project, VaultStore
from pseudonymise.core.tokens import verify_token

from tests.services import OpenBaoServer, free_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the directory store -------------------------------------------------------------------------
def test_directory_store_files_are_private(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    store.write("issuer", {"a": 1})
    store.write("projects/p1", {"b": 2})
    assert mode(tmp_path / "store") == 0o700
    assert mode(tmp_path / "store" / "issuer.json") == 0o600
    assert mode(tmp_path / "store" / "projects" / "p1.json") == 0o600
    assert mode(tmp_path / "store" / "projects") == 0o700
    assert store.read("issuer") == {"a": 1}
    assert store.read("missing") is None
    assert store.names("projects") == ["projects/p1"]
    assert store.names("nothing") == []
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["issuer.json", "projects"]


def test_directory_store_tightens_an_existing_directory(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    DirectoryStore(folder).write("issuer", {"a": 1})
    assert mode(folder) == 0o700


def test_directory_store_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    for i in range(3):
        store.write("issuer", {"i": i})
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["issuer.json"]
    assert store.read("issuer") == {"i": 2}


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o660, 0o620])
def test_directory_store_refuses_a_file_others_can_read(tmp_path: Path, loose: int) -> None:
    store = DirectoryStore(tmp_path / "store")
    store.write("issuer", {"a": 1})
    file = tmp_path / "store" / "issuer.json"
    os.chmod(file, loose)
    with pytest.raises(IssuerError, match="chmod 600"):
        store.read("issuer")
    os.chmod(file, 0o600)
    assert store.read("issuer") == {"a": 1}


def test_issuer_files_hold_secrets_only_their_owner_reads(tmp_path: Path) -> None:
    issuer = Issuer.init(DirectoryStore(tmp_path / "store"), "org")
    project = issuer.create_project("p1", method="reversible")
    for file in (tmp_path / "store").rglob("*.json"):
        assert mode(file) == 0o600
    doc = json.loads((tmp_path / "store" / "projects" / "p1.json").read_text())
    assert set(doc) == {"id", "method", "treatment", "retention_until", "format", "created_at", "key",
                        "escrow_private_key", "key_version", "previous_keys", "custody"}
    assert (doc["key_version"], doc["previous_keys"]) == (1, {})
    assert "key" not in project.settings() and "escrow_private_key" not in project.settings()
    assert doc["key"] not in repr(project)


# --- the issuer -------------------------------------------------------------------------------
def test_issuer_init_refuses_to_overwrite(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    first = Issuer.init(store, "org")
    before = (tmp_path / "store" / "issuer.json").read_bytes()
    with pytest.raises(IssuerError, match="refusing to overwrite"):
        Issuer.init(store, "org")
    with pytest.raises(IssuerError, match="refusing to overwrite"):
        Issuer.init(store, "another-org")
    assert (tmp_path / "store" / "issuer.json").read_bytes() == before
    assert Issuer(store).kid == first.kid


def test_issuer_id_and_missing_issuer(tmp_path: Path) -> None:
    with pytest.raises(IssuerError, match="1 to 200"):
        Issuer.init(DirectoryStore(tmp_path / "a"), "")
    with pytest.raises(IssuerError, match="1 to 200"):
        Issuer.init(DirectoryStore(tmp_path / "b"), "x" * 201)
    with pytest.raises(IssuerError, match="issuer init"):
        Issuer(DirectoryStore(tmp_path / "empty"))


def test_kid_is_the_jwk_thumbprint(issuer: Issuer) -> None:
    from pseudonymise.core.tokens import jwk_thumbprint

    jwk = issuer.public_keys().to_jwks()["keys"][0]
    assert jwk["kid"] == issuer.kid == jwk_thumbprint(jwk["x"])
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert "d" not in jwk


@pytest.mark.parametrize("project_id", ["", "Research", "-x", ".x", "a b", "a/b", "x" * 101, "é", "a\n"])
def test_project_id_validation(issuer: Issuer, project_id: str) -> None:
    with pytest.raises(IssuerError, match="invalid"):
        issuer.create_project(project_id)


def test_project_settings_validation(issuer: Issuer) -> None:
    with pytest.raises(IssuerError, match="method"):
        issuer.create_project("p1", method="two-way")
    with pytest.raises(IssuerError, match="treatment"):
        issuer.create_project("p1", treatment="sometimes")
    with pytest.raises(IssuerError, match="future"):
        issuer.create_project("p1", retention_until=datetime.now(UTC) - timedelta(days=1))
    with pytest.raises(IssuerError, match="future"):
        issuer.create_project("p1", retention=timedelta(0))
    with pytest.raises(IssuerError, match="already exists"):
        issuer.create_project("research-a")
    with pytest.raises(IssuerError, match="does not exist"):
        issuer.project("p1")  # nothing was created by the refusals above


def test_project_is_stored_and_read_back(issuer: Issuer) -> None:
    until = datetime(2099, 1, 1, tzinfo=UTC)
    created = issuer.create_project("p-1.x_y", method="reversible", treatment="randomised", retention_until=until,
                                    format=PseudonymFormat("hex", 32, "H-"))
    again = Issuer(issuer.store).project("p-1.x_y")
    assert again.key == created.key and len(again.key) == 32
    assert again.escrow_private_key == created.escrow_private_key and len(again.escrow_private_key or b"") == 32
    assert (again.method, again.treatment, again.retention_until, again.format) == (
        "reversible", "randomised", until, PseudonymFormat("hex", 32, "H-"))
    assert issuer.project("research-b").escrow_private_key is None
    assert [p.id for p in issuer.projects()] == ["p-1.x_y", "random-r", "research-a", "research-b", "vendor-x"]
    other = issuer.create_project("p2")
    assert other.key != created.key
    assert Project.from_document(created.to_document()).key == created.key


def test_default_retention_is_a_year(issuer: Issuer) -> None:
    project = issuer.create_project("p1")
    assert timedelta(days=364) < project.retention_until - datetime.now(UTC) <= timedelta(days=365)
    assert (project.method, project.treatment, project.format) == ("irreversible", "deterministic", PseudonymFormat())


# --- the Vault / OpenBao store ------------------------------------------------------------------
def test_vault_store_round_trip(openbao: OpenBaoServer) -> None:
    path = f"pseudonymise-{uuid.uuid4().hex[:8]}"
    store = VaultStore(openbao.addr, openbao.token, mount="secret", path=path)
    issuer = Issuer.init(store, "vault-org")
    created = issuer.create_project("research-v", method="reversible", retention=timedelta(days=10))
    with pytest.raises(IssuerError, match="refusing to overwrite"):
        Issuer.init(store, "vault-org")
    raw = issuer.issue("research-v", "pseudonymisation")

    again = Issuer(VaultStore(openbao.addr, openbao.token, mount="secret", path=path))
    assert again.kid == issuer.kid
    token = verify_token(raw, again.public_keys(), kind="pseudonymisation", project="research-v")
    assert token.key == created.key == again.project("research-v").key
    assert again.project("research-v").escrow_private_key == created.escrow_private_key
    assert [p.id for p in again.projects()] == ["research-v"]
    assert store.read("projects/absent") is None
    assert store.names("nothing-here") == []
    assert str(store).startswith("vault:")


def test_vault_store_refuses_a_bad_vault_token(openbao: OpenBaoServer) -> None:
    store = VaultStore(openbao.addr, "not-a-valid-token", path="pseudonymise-denied")
    with pytest.raises(IssuerError, match="permission denied") as info:
        store.read("issuer")
    assert "not-a-valid-token" not in str(info.value)


def test_unreachable_vault() -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    store = VaultStore(addr, "root-token-value", timeout=2)
    with pytest.raises(IssuerError) as info:
        Issuer(store)
    assert "unreachable" in str(info.value) and addr in str(info.value)
    assert "root-token-value" not in str(info.value)
    with pytest.raises(IssuerError, match="unreachable"):
        store.write("issuer", {"a": 1})
