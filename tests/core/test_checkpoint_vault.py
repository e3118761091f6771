"""Checkpoints signed by Vault Transit (``ed25519``, the key never leaves it) and witnessed in Vault KV v2
with check-and-set, on real OpenBao."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

import hvac
import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.checkpoint import (
    CheckpointContradictionError,
    Checkpointer,
    LocalSigner,
    SignedCheckpoint,
    SigningUnavailableError,
    Statement,
    TransitSigner,
    VaultKVWitness,
    WitnessUnreachableError,
    audit_id_of,
    sign_statement,
    verify_against_witness,
)
from pseudonymise.core.issuer import Issuer

from tests.tampering import make_uses, truncate

pytestmark = pytest.mark.vault


@pytest.fixture
def vault(openbao: Any) -> tuple[hvac.Client, str, str]:
    """A client, a fresh Transit mount and a fresh KV path."""
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + secrets.token_hex(4)
    client.sys.enable_secrets_engine("transit", path=mount)
    return client, mount, "checkpoints-" + secrets.token_hex(4)


def test_transit_signs_checkpoints_and_rotation_keeps_old_ones_verifiable(
        vault: tuple[hvac.Client, str, str], sqlite_url: str, issuer: Issuer) -> None:
    client, mount, path = vault
    signer = TransitSigner.create(client, mount, "audit-signing")
    assert TransitSigner.create(client, mount, "audit-signing").public_keys().to_jwks() == signer.public_keys().to_jwks()
    audit = AuditLog(sa.create_engine(sqlite_url))
    witness = VaultKVWitness(client, "secret", path)
    make_uses(audit, issuer, ["pseudonymise"], None)
    first = Checkpointer(audit, signer, [witness]).checkpoint()
    assert first is not None and first.witnessed_by == [f"vault:secret/{path}"]
    client.secrets.transit.rotate_key(name="audit-signing", mount_point=mount)
    make_uses(audit, issuer, ["reverse"], None)
    second = Checkpointer(audit, signer, [witness]).checkpoint()
    assert second is not None and second.checkpoint.kid != first.checkpoint.kid
    keys = signer.public_keys()
    assert len(keys) == 2
    result = verify_against_witness(audit, witness, keys)
    assert result.ok, str(result)
    assert result.checkpoints_checked == 2  # both KV versions are checked
    # the key stayed in Vault: the export of an ed25519 Transit key is refused (not exportable)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        client.secrets.transit.export_key(name="audit-signing", key_type="signing-key", mount_point=mount)


def test_a_transit_key_of_another_type_is_refused(vault: tuple[hvac.Client, str, str]) -> None:
    client, mount, _ = vault
    client.secrets.transit.create_key(name="hmac-key", key_type="aes256-gcm96", mount_point=mount)
    with pytest.raises(SigningUnavailableError, match=r"of type 'aes256-gcm96'; audit checkpoints need an ed25519 key"):
        TransitSigner.create(client, mount, "hmac-key")
    nowhere = TransitSigner(hvac.Client(url="http://127.0.0.1:9", token="x"), mount, "audit")
    with pytest.raises(SigningUnavailableError, match="could not sign") as info:
        nowhere.sign(b"statement")
    assert type(info.value).__name__ == "SigningUnreachableError"


def _checkpoint(signer: LocalSigner, audit_id: str, seq: int, row_hash: str | None = None) -> SignedCheckpoint:
    return sign_statement(Statement(audit_id, seq, row_hash or f"{seq:064x}", f"2026-11-30T10:00:{seq % 60:02d}.000000Z"),
                          signer)


def test_kv_witness_keeps_the_latest_and_never_goes_back(vault: tuple[hvac.Client, str, str]) -> None:
    client, _, path = vault
    signer = LocalSigner.generate()
    trusted = signer.public_keys().trusts
    witness = VaultKVWitness(client, "secret", path)
    audit_id = "postgresql/research/-/pseudonymise_audit"
    assert witness.record(_checkpoint(signer, audit_id, 4), trusted) is True
    assert witness.record(_checkpoint(signer, audit_id, 2), trusted) is False  # lower: not written
    assert witness.record(_checkpoint(signer, audit_id, 4), trusted) is False  # the same: already witnessed
    with pytest.raises(CheckpointContradictionError, match="another row_hash"):
        witness.record(_checkpoint(signer, audit_id, 4, "ab" * 32), trusted)
    assert witness.record(_checkpoint(signer, audit_id, 9), trusted) is True
    latest = witness.latest_trusted(audit_id, trusted)
    assert latest is not None and latest.seq == 9
    assert [e.checkpoint.seq for e in witness.entries(audit_id) if e.checkpoint] == [4, 9]
    assert witness.secret_path(audit_id) == f"{path}/postgresql/research/-/pseudonymise_audit"
    # a forged entry (another key) at the top does not block the witness: it is overwritten, and kept as a version
    forged = _checkpoint(LocalSigner.generate(), audit_id, 10**9)
    client.secrets.kv.v2.create_or_update_secret(path=witness.secret_path(audit_id), secret=forged.to_dict(),
                                                 mount_point="secret")
    assert witness.latest_trusted(audit_id, trusted).seq == 9  # type: ignore[union-attr]
    assert witness.record(_checkpoint(signer, audit_id, 11), trusted) is True
    seqs = [e.checkpoint.seq for e in witness.entries(audit_id) if e.checkpoint]
    assert seqs == [4, 9, 10**9, 11]


def test_concurrent_writers_retry_on_check_and_set_conflicts(vault: tuple[hvac.Client, str, str], openbao: Any) -> None:
    """Eight writers at once, five rounds: every write is a check-and-set, so the KV versions only ever go up
    (a plain write would let a slower writer put a lower checkpoint over a higher one)."""
    _, _, path = vault
    signer = LocalSigner.generate()
    trusted = signer.public_keys().trusts
    audit_id = "sqlite/store.db/-/pseudonymise_audit"
    witnesses = [VaultKVWitness(hvac.Client(url=openbao.addr, token=openbao.token), "secret", path) for _ in range(8)]
    errors: list[BaseException] = []
    for round_ in range(5):
        barrier = threading.Barrier(len(witnesses))

        def write(i: int, w: VaultKVWitness, base: int = round_ * 10, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                w.record(_checkpoint(signer, audit_id, base + i + 1), trusted)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i, w)) for i, w in enumerate(witnesses)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    seqs = [e.checkpoint.seq for e in witnesses[0].entries(audit_id) if e.checkpoint]
    assert seqs == sorted(set(seqs)), seqs  # strictly increasing, version after version
    assert seqs[-1] == 48
    assert sum(w.conflicts for w in witnesses) > 0  # the writers did race, and retried


def test_kv_witness_names_a_truncation(vault: tuple[hvac.Client, str, str], sqlite_url: str, issuer: Issuer) -> None:
    client, mount, path = vault
    signer = TransitSigner.create(client, mount, "audit-signing")
    audit = AuditLog(sa.create_engine(sqlite_url))
    witness = VaultKVWitness(client, "secret", path)
    checkpointer = Checkpointer(audit, signer, [witness])
    make_uses(audit, issuer, ["pseudonymise"], lambda a: checkpointer.checkpoint() and None)
    make_uses(audit, issuer, ["reverse"], lambda a: checkpointer.checkpoint() and None)
    truncate(audit, 2)
    assert audit.verify().ok
    result = verify_against_witness(audit, witness, signer.public_keys())
    assert [(c.kind, c.seq) for c in result.contradictions] == [("truncated", 4)]
    assert "the chain ends at row 2 but the checkpoint of" in str(result)
    assert f"vault:secret/{path}" in result.contradictions[0].where
    with pytest.raises(CheckpointContradictionError, match="witnessed row 4"):
        checkpointer.checkpoint()
    assert audit_id_of(audit) == "sqlite/store.db/-/pseudonymise_audit"


def test_unreachable_kv_witness_is_retryable_and_the_table_still_gets_the_checkpoint(
        sqlite_url: str, issuer: Issuer, tmp_path: Path) -> None:
    from pseudonymise.core.checkpoint import CheckpointTable

    audit = AuditLog(sa.create_engine(sqlite_url))
    make_uses(audit, issuer, ["pseudonymise"], None)
    witness = VaultKVWitness(hvac.Client(url="http://127.0.0.1:9", token="x"), "secret", "checkpoints")
    with pytest.raises(WitnessUnreachableError, match=r"could not read the metadata \(ConnectionError\)"):
        Checkpointer(audit, LocalSigner.generate(), [witness]).checkpoint()
    latest = CheckpointTable(audit).latest()
    assert latest is not None and latest["seq"] == 2 and latest["witnessed_by"] is None
