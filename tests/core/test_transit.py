"""Key custody in Vault Transit (real OpenBao): the key never leaves Vault, pseudonyms are the
docs/design.md §4 message HMAC'd by Transit, batches respect request limits, rotation pins versions."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import hvac
import pytest
from pseudonymise.core import transit as transit_module
from pseudonymise.core.errors import TokenKindError
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.tokens import verify_token
from pseudonymise.core.transit import TransitMac, TransitUnavailableError

pytestmark = pytest.mark.vault


@pytest.fixture
def transit(openbao: Any, tmp_path: Path) -> tuple[Issuer, hvac.Client, str]:
    client = hvac.Client(url=openbao.addr, token=openbao.token)
    mount = "transit-" + secrets.token_hex(4)
    client.sys.enable_secrets_engine("transit", path=mount)
    issuer = Issuer.init(DirectoryStore(tmp_path / "store"), "transit-issuer")
    issuer.transit_client = client
    issuer.create_project("tr", custody="transit", transit_mount=mount)
    return issuer, client, mount


def _independent(client: hvac.Client, mount: str, message: bytes, version: int | None = None,
                 key: str = "pseudonymise-tr") -> str:
    """One plain Transit call per value, base32-encoded as docs/design.md §4 says."""
    resp = client.secrets.transit.generate_hmac(name=key, hash_input=base64.b64encode(message).decode(),
                                                algorithm="sha2-256", mount_point=mount, key_version=version)
    mac = base64.b64decode(resp["data"]["hmac"].split(":", 2)[2])
    return base64.b32encode(mac).decode().lower()[:26]


def test_token_carries_a_reference_not_the_key(transit: tuple[Issuer, hvac.Client, str]) -> None:
    issuer, _client, mount = transit
    token = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    assert token.key is None
    assert token.key_ref == {"engine": "transit", "mount": mount, "name": "pseudonymise-tr"}
    assert issuer.project("tr").settings()["custody"] == "transit"
    with pytest.raises(TokenKindError, match="held in Vault Transit"):
        Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))


def test_pseudonyms_are_transit_hmacs_of_the_design_message(transit: tuple[Issuer, hvac.Client, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    issuer, client, mount = transit
    monkeypatch.setattr(transit_module, "MAX_ITEMS", 7)  # force several requests per batch
    token = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    policy = ColumnPolicy({"id": ColumnRule("id", domain="visits")}, "keep")
    mac = TransitMac(client, mount, "pseudonymise-tr", key_version=token.key_version)
    values = [f"P{i}" for i in range(30)] + [None, 42]
    out = Pseudonymiser(token, policy, mac).pseudonymise_batch({"id": values}).columns["id"]
    assert mac.requests == 5
    assert out[30] is None
    for value, pseudonym in [(values[0], out[0]), (values[29], out[29]), ("42", out[31])]:
        assert pseudonym == _independent(client, mount, b"pseudonymise/v1\x00visits\x00" + value.encode())
    again = Pseudonymiser(token, policy, TransitMac(client, mount, "pseudonymise-tr")).pseudonymise_batch(
        {"id": values}).columns["id"]
    assert again == out  # deterministic across runs and clients


def test_rotation_pins_key_versions(transit: tuple[Issuer, hvac.Client, str]) -> None:
    issuer, client, mount = transit
    old = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    issuer.rotate_key("tr")
    new = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    assert (old.key_version, new.key_version) == (1, 2)
    policy = ColumnPolicy.pseudonymise("id")

    def run(token: Any) -> list[Any]:
        mac = TransitMac(client, mount, "pseudonymise-tr", key_version=token.key_version)
        return Pseudonymiser(token, policy, mac).pseudonymise_batch({"id": ["P1"]}).columns["id"]

    assert run(old) == [_independent(client, mount, b"pseudonymise/v1\x00\x00P1", 1)]
    assert run(new) == [_independent(client, mount, b"pseudonymise/v1\x00\x00P1", 2)]
    assert run(old) != run(new)


def test_unreachable_or_forbidden_transit_is_a_clear_error(transit: tuple[Issuer, hvac.Client, str],
                                                           openbao: Any) -> None:
    issuer, _client, mount = transit
    token = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    policy = ColumnPolicy.pseudonymise("id")
    denied = TransitMac(hvac.Client(url=openbao.addr, token="not-a-token"), mount, "pseudonymise-tr")
    with pytest.raises(TransitUnavailableError, match="pseudonymise-tr"):
        Pseudonymiser(token, policy, denied).pseudonymise_batch({"id": ["P1"]})
    gone = TransitMac(hvac.Client(url="http://127.0.0.1:9", token="x", timeout=2), mount, "pseudonymise-tr")
    with pytest.raises(TransitUnavailableError, match="reachable"):
        Pseudonymiser(token, policy, gone).pseudonymise_batch({"id": ["P1"]})


def test_batches_larger_than_the_servers_json_limit(transit: tuple[Issuer, hvac.Client, str]) -> None:
    """OpenBao refuses a request of 500 items; 1,200 values must still go through, in several requests."""
    issuer, client, mount = transit
    token = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    mac = TransitMac(client, mount, "pseudonymise-tr", key_version=token.key_version)
    out = Pseudonymiser(token, ColumnPolicy.pseudonymise("id"), mac).pseudonymise_batch(
        {"id": [f"V{i}" for i in range(1200)]}).columns["id"]
    assert len(set(out)) == 1200 and mac.requests == 3


def test_date_shift_offsets_are_transit_hmacs_of_the_design_message(transit: tuple[Issuer, hvac.Client, str]) -> None:
    """docs/design.md §4.7 with the key in Vault Transit: the offset is computed from Transit's HMAC of the date-shift
    message (one plain Transit call per subject here, the offset formula in the standard library)."""
    import datetime as dt

    issuer, client, mount = transit
    token = verify_token(issuer.issue("tr", "pseudonymisation"), issuer.public_keys())
    policy = ColumnPolicy.from_mapping({"columns": {"id": "pseudonymise", "d": {
        "action": "date_shift", "subject": "id", "max_days": 45, "domain": "visits"}}})
    mac = TransitMac(client, mount, "pseudonymise-tr", key_version=token.key_version)
    subjects = ["P1", "P2", None, 42]
    out = Pseudonymiser(token, policy, mac).pseudonymise_batch(
        {"id": subjects, "d": [dt.date(2024, 2, 29)] * 4}).columns["d"]
    for subject, shifted in zip(subjects, out, strict=True):
        if subject is None:
            assert shifted is None
            continue
        resp = client.secrets.transit.generate_hmac(
            name="pseudonymise-tr", algorithm="sha2-256", mount_point=mount, hash_input=base64.b64encode(
                b"pseudonymise/v1/date-shift\x00visits\x00" + str(subject).encode()).decode())
        first = int.from_bytes(base64.b64decode(resp["data"]["hmac"].split(":", 2)[2])[:8], "big") % 90 - 45
        days = first + 1 if first >= 0 else first
        assert shifted == dt.date(2024, 2, 29) + dt.timedelta(days=days)


def test_a_reversible_project_in_transit_escrows_and_reveals(transit: tuple[Issuer, hvac.Client, str],
                                                             pg_url: str) -> None:
    """A reversible project whose key is held in Transit: its pseudonymisation token carries the key's reference
    *and* the escrow public key (the escrow keys are the issuer's), so a run pseudonymises through Transit,
    seals escrow, and a reverse token reveals the originals (their batches proven by the audit)."""
    import sqlalchemy as sa
    from pseudonymise.core.pipeline import Store, run_pseudonymisation, run_reversal
    from pseudonymise.core.plan import SinkFactory, plan_transfer
    from pseudonymise.core.use import GivenToken

    from tests.core.conftest import Collect, Rows

    issuer, client, mount = transit
    issuer.create_project("trrev", custody="transit", transit_mount=mount, method="reversible")
    raw = issuer.issue("trrev", "pseudonymisation")
    token = verify_token(raw, issuer.public_keys())
    assert token.key is None and token.key_ref is not None and token.escrow_public_key is not None
    store = Store(sa.create_engine(pg_url))
    values = ["P1", "P2", "P1", None]
    out = Collect()
    policy = ColumnPolicy.pseudonymise("pid", default="keep")
    summary = run_pseudonymisation(store, GivenToken(raw, issuer.public_keys(), transit=client), policy,
                                   plan_transfer(Rows({"pid": values}), SinkFactory(lambda c, conn: out), policy))
    assert summary.counts["escrow_rows"] == 2
    expected = [_independent(client, mount, b"pseudonymise/v1\x00\x00" + v.encode(), key="pseudonymise-trrev")
                if v is not None else None for v in values]
    assert out.rows["pid"] == expected and expected[0] == expected[2]
    revealed = Collect()
    run_reversal(store, GivenToken(issuer.issue("trrev", "reverse"), issuer.public_keys()), ["pid"],
                 plan_transfer(Rows({"pid": out.rows["pid"]}), SinkFactory(lambda c, conn: revealed)))
    assert revealed.rows["pid"] == values
    store.engine.dispose()
