"""The issuer and its project stores: a private directory, or OpenBao / Vault KV v2."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pseudonymise.core.errors import IssuerError, PolicyError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.issuer import DirectoryStore, Issuer, Project, VaultStore
from pseudonymise.core.mac import derive_secondary_key
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser
from pseudonymise.core.tokens import MAX_TOKEN_LENGTH, b64url_decode, b64url_encode, verify_token
from pseudonymise.core.transit import TransitMac

from scripts.services import OpenBaoServer, free_port
from tests.reference import hkdf_sha256


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


# --- v1.1: secondary keys of their own, verify_keys ------------------------------------------------
def test_secondary_key_is_hkdf_of_the_issuing_projects_key(issuer: Issuer) -> None:
    """docs/design.md §4 step 5: HKDF-SHA256(key of the project the token is issued for, salt b"", info
    b"pseudonymise/v1/secondary-key\\x00" + source project, 32 bytes): checked against the cryptography
    package's HKDF and RFC 5869 written out with hmac; it is neither project's key."""
    vendor, source = issuer.project("vendor-x"), issuer.project("research-a")
    derived = derive_secondary_key(vendor.key, "research-a")
    info = b"pseudonymise/v1/secondary-key\x00research-a"
    assert derived == HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=info).derive(vendor.key)
    assert derived == hkdf_sha256(vendor.key, info)
    assert len(derived) == 32 and derived not in (vendor.key, source.key)
    token = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-a"), issuer.public_keys())
    assert token.key == derived
    assert derive_secondary_key(source.key, "vendor-x") != derived  # whose key: the issuing project's


def test_secondary_key_follows_the_key_version(issuer: Issuer) -> None:
    first = issuer.project("vendor-x").key
    rotated = issuer.rotate_key("vendor-x")
    keys = issuer.public_keys()
    old = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-a", key_version=1), keys)
    new = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-a"), keys)
    assert (old.key_version, new.key_version) == (1, 2)
    assert old.key == derive_secondary_key(first, "research-a")
    assert new.key == derive_secondary_key(rotated.key, "research-a") != old.key


def test_a_secondary_token_cannot_make_first_level_pseudonyms(issuer: Issuer) -> None:
    """Issue 11 item 5: the secondary token carried its project's own key, so its holder could make that
    project's first-level pseudonyms (its key used as a pseudonymisation token's). Not any more."""
    raw = issuer.issue("vendor-x", "secondary", source_project="research-a")
    assert json.loads(b64url_decode(raw.split(".")[1]))["key"] not in {b64url_encode(p.key) for p in issuer.projects()}
    keys, rule = issuer.public_keys(), ColumnPolicy.pseudonymise("id").rules["id"]
    genuine = verify_token(issuer.issue("vendor-x", "pseudonymisation"), keys)
    stolen = dataclasses.replace(verify_token(raw, keys), kind="pseudonymisation", source_project=None,
                                 source_format=None)
    first_level = Pseudonymiser(genuine, ColumnPolicy.pseudonymise("id")).pseudonymise_values(["P100000"], rule)
    assert Pseudonymiser(stolen, ColumnPolicy.pseudonymise("id")).pseudonymise_values(["P100000"], rule) != first_level


def test_issuer_refuses_a_token_longer_than_consumers_accept(issuer: Issuer) -> None:
    """verify_keys grows with every key version: the issuer refuses to issue what no consumer reads."""
    project = issuer.project("research-a")
    many = {v: os.urandom(32) for v in range(1, 400)}
    issuer.store.write("projects/research-a", {**project.to_document(), "key_version": 400,
                                               "previous_keys": {str(v): b64url_encode(k) for v, k in many.items()}})
    with pytest.raises(IssuerError, match=str(MAX_TOKEN_LENGTH)):
        issuer.issue("research-a", "reverse")
    assert verify_token(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()).key_version == 400


@pytest.fixture
def transit_issuer(openbao: OpenBaoServer, tmp_path: Path) -> tuple[Issuer, hvac.Client, str]:
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + uuid.uuid4().hex[:8]
    client.sys.enable_secrets_engine("transit", path=mount)
    issuer = Issuer.init(DirectoryStore(tmp_path / "transit-store"), "transit-issuer")
    issuer.transit_client = client
    issuer.create_project("research-a", method="reversible", retention=timedelta(days=30))
    issuer.create_project("tr", method="reversible", custody="transit", transit_mount=mount)
    return issuer, client, mount


@pytest.mark.vault
def test_transit_projects_reverse_tokens_carry_no_verify_keys(transit_issuer: tuple[Issuer, hvac.Client, str]) -> None:
    """Their key never leaves Vault Transit, so it cannot travel in a reverse token either."""
    issuer, _client, _mount = transit_issuer
    raw = issuer.issue("tr", "reverse")
    assert "verify_keys" not in json.loads(b64url_decode(raw.split(".")[1]))
    assert verify_token(raw, issuer.public_keys()).verify_keys is None


@pytest.mark.vault
def test_transit_secondary_token_checks_its_input_before_any_transit_request(
        transit_issuer: tuple[Issuer, hvac.Client, str]) -> None:
    """A Transit project's secondary token carries a key reference (HKDF cannot run inside Vault) and the
    source format: raw identifiers are refused before one of them is sent to Vault."""
    issuer, client, mount = transit_issuer
    token = verify_token(issuer.issue("tr", "secondary", source_project="research-a"), issuer.public_keys())
    assert token.key is None and token.key_ref == {"engine": "transit", "mount": mount, "name": "pseudonymise-tr"}
    assert token.source_format == issuer.project("research-a").format
    mac = TransitMac(client, mount, "pseudonymise-tr", key_version=token.key_version)
    engine = SecondaryPseudonymiser(token, ColumnPolicy.pseudonymise("id"), mac)
    with pytest.raises(PolicyError, match="'id': 2 of 3 values"):
        engine.pseudonymise_values(["P100000", "a" * 26, "P100001"], "id")
    assert mac.requests == 0
    assert len(engine.pseudonymise_values(["a" * 26, "b" * 26], "id")) == 2 and mac.requests == 1
