"""Token format v1 (docs/design.md §3): issue every kind, and one specific error per reason a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pseudonymise.core.errors import (
    IssuerError,
    MalformedTokenError,
    RetentionEndedError,
    TokenError,
    TokenExpiredError,
    TokenKindError,
    TokenNotYetValidError,
    TokenProjectError,
    TokenSignatureError,
    UnknownIssuerKeyError,
)
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.tokens import (
    LEEWAY_SECONDS,
    TrustedKeys,
    b64url_decode,
    b64url_encode,
    fingerprint,
    jws_sign,
    peek_claims,
    secret_parts,
    sign_claims,
    verify_token,
)

from tests.reference import hkdf_sha256


def _claims(raw: str) -> dict[str, Any]:
    return json.loads(b64url_decode(raw.split(".")[1]))


def _header(raw: str) -> dict[str, Any]:
    return json.loads(b64url_decode(raw.split(".")[0]))


def _resign(issuer: Issuer, claims: dict[str, Any]) -> str:
    """Sign edited claims with the issuer's own key: a token the issuer could have issued."""
    return sign_claims(claims, issuer._private, issuer.kid)


def _refused(raw: str, keys: TrustedKeys, error: type[TokenError], secrets: tuple[str, ...] = (),
             **kwargs: Any) -> TokenError:
    with pytest.raises(error) as info:
        verify_token(raw, keys, **kwargs)
    assert type(info.value) is error
    message = str(info.value)
    assert message  # says what is wrong
    for secret in (raw, raw.strip(), *secrets):
        if secret:
            assert secret not in message
            assert secret not in repr(info.value)
    return info.value


# --- issuing --------------------------------------------------------------------------------
def test_pseudonymisation_token_of_a_reversible_project(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    token = verify_token(raw, issuer.public_keys(), kind="pseudonymisation", project="research-a")
    project = issuer.project("research-a")
    assert token.kind == "pseudonymisation"
    assert token.project == "research-a"
    assert token.issuer == "test-issuer"
    assert token.kid == issuer.kid
    assert token.key == project.key
    assert token.escrow_public_key is not None and token.escrow_private_key is None
    assert token.method == "reversible" and token.treatment == "deterministic"
    assert token.retention_until == project.retention_until
    assert token.format == project.format
    assert token.fingerprint == hashlib.sha256(raw.encode()).hexdigest()[:16]
    assert _header(raw) == {"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}
    claims = _claims(raw)
    assert set(claims) == {"iss", "jti", "sub", "kind", "iat", "nbf", "exp", "method", "treatment",
                           "retention_until", "format", "key", "escrow_public_key", "key_version"}
    assert claims["key_version"] == token.key_version == 1
    assert claims["exp"] - claims["iat"] == 30 * 86400


def test_pseudonymisation_token_of_an_irreversible_project_has_no_escrow_key(issuer: Issuer) -> None:
    raw = issuer.issue("research-b", "pseudonymisation", expires_in=timedelta(hours=1))
    token = verify_token(raw, issuer.public_keys())
    assert token.method == "irreversible"
    assert token.escrow_public_key is None and token.escrow_private_key is None
    assert "escrow_public_key" not in _claims(raw)
    assert token.expires_at - token.issued_at == 3600


def test_reverse_token(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "reverse", expires_in=timedelta(days=1))
    token = verify_token(raw, issuer.public_keys(), kind="reverse", project="research-a")
    assert token.key is None and token.escrow_public_key is None
    assert token.escrow_private_key is not None
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    raw_private = token.escrow_private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert raw_private == issuer.project("research-a").escrow_private_key


def test_hkdf_reference_gives_the_rfc5869_vectors() -> None:
    """RFC 5869 appendix A.1 and A.3 (A.3: empty salt and info, as the secondary key's salt)."""
    ikm = bytes.fromhex("0b" * 22)
    assert hkdf_sha256(ikm, bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42, bytes.fromhex("000102030405060708090a0b0c")) \
        == bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    assert hkdf_sha256(ikm, b"", 42) == bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_secondary_token(issuer: Issuer) -> None:
    """v1.1: the key is the vendor project's key through HKDF (docs/design.md §4 step 5), never a project's own
    key, and the token says which format its input must have."""
    raw = issuer.issue("vendor-x", "secondary", source_project="research-a")
    token = verify_token(raw, issuer.public_keys(), kind="secondary", project="vendor-x")
    vendor, source = issuer.project("vendor-x"), issuer.project("research-a")
    assert token.source_project == "research-a"
    assert token.key == hkdf_sha256(vendor.key, b"pseudonymise/v1/secondary-key\x00research-a")
    assert token.key != vendor.key and token.key != source.key
    other = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-b"), issuer.public_keys())
    assert other.key == hkdf_sha256(vendor.key, b"pseudonymise/v1/secondary-key\x00research-b") != token.key
    assert token.source_format == source.format
    assert _claims(raw)["source_format"] == source.format.to_claim()
    assert token.public_claims()["source_project"] == "research-a"
    assert token.public_claims()["source_format"] == source.format.to_claim()
    assert token.verify_keys is None


def test_secondary_token_carries_the_source_projects_own_format(issuer: Issuer) -> None:
    issuer.create_project("research-hex", format=PseudonymFormat("hex", 20, "R-"))
    token = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-hex"), issuer.public_keys())
    assert token.source_format == PseudonymFormat("hex", 20, "R-")
    assert token.format == issuer.project("vendor-x").format != token.source_format


def test_secondary_token_issued_before_v1_1_is_refused(issuer: Issuer) -> None:
    """A secondary token as the issuer made them before v1.1: the project's own key, no source_format.
    It is signed by the trusted issuer key, so the refusal is about what it is, not its signature."""
    claims = _claims(issuer.issue("vendor-x", "secondary", source_project="research-a"))
    del claims["source_format"]
    claims["key"] = b64url_encode(issuer.project("vendor-x").key)
    error = _refused(_resign(issuer, claims), issuer.public_keys(), MalformedTokenError, (claims["key"],))
    assert "source_format" in str(error) and "re-issue" in str(error)


@pytest.mark.parametrize("bad", [None, "base32", {"alphabet": "hex", "length": 4, "prefix": ""},
                                 {"alphabet": "hex", "length": 16, "prefix": "", "extra": 1}])
def test_secondary_token_with_an_invalid_source_format_is_malformed(issuer: Issuer, bad: Any) -> None:
    claims = {**_claims(issuer.issue("vendor-x", "secondary", source_project="research-a")), "source_format": bad}
    error = _refused(_resign(issuer, claims), issuer.public_keys(), MalformedTokenError)
    assert "source_format" in str(error)


# --- verify_keys (docs/design.md §5.1) ------------------------------------------------------------------
def test_reverse_token_of_a_deterministic_project_carries_every_key_version(issuer: Issuer) -> None:
    first = issuer.project("research-a").key
    token = verify_token(issuer.issue("research-a", "reverse"), issuer.public_keys())
    assert token.verify_keys == {1: first}
    issuer.rotate_key("research-a")
    issuer.rotate_key("research-a")
    project = issuer.project("research-a")
    raw = issuer.issue("research-a", "reverse")
    token = verify_token(raw, issuer.public_keys())
    assert token.verify_keys == {1: first, 2: project.previous_keys[2], 3: project.key}
    assert all(type(v) is int for v in token.verify_keys) and all(len(k) == 32 for k in token.verify_keys.values())
    assert _claims(raw)["verify_keys"] == {str(v): b64url_encode(k) for v, k in token.verify_keys.items()}
    assert token.public_claims()["verify_key_versions"] == [1, 2, 3]
    shown = [repr(token), str(token), json.dumps(token.public_claims())]
    for key in token.verify_keys.values():
        for form in (b64url_encode(key), key.hex(), base64.b64encode(key).decode()):
            assert not any(form in text for text in shown)


def test_reverse_token_of_a_randomised_project_and_other_kinds_carry_no_verify_keys(issuer: Issuer) -> None:
    assert verify_token(issuer.issue("random-r", "reverse"), issuer.public_keys()).verify_keys is None
    assert "verify_keys" not in _claims(issuer.issue("random-r", "reverse"))
    for project, kind, extra in (("research-a", "pseudonymisation", {}),
                                 ("vendor-x", "secondary", {"source_project": "research-a"})):
        raw = issuer.issue(project, kind, **extra)
        assert "verify_keys" not in _claims(raw)
        assert verify_token(raw, issuer.public_keys()).verify_keys is None


def test_reverse_token_issued_before_v1_1_still_verifies_without_verify_keys(issuer: Issuer) -> None:
    """Reversal decides what a reverse token without verify_keys may do (docs/design.md §5.1); parsing keeps it."""
    claims = _claims(issuer.issue("research-a", "reverse"))
    del claims["verify_keys"]
    assert verify_token(_resign(issuer, claims), issuer.public_keys()).verify_keys is None


_KEY = b64url_encode(bytes(range(32)))


@pytest.mark.parametrize("bad", [
    {}, [], _KEY, {"1": _KEY[:-1]}, {"1": b64url_encode(bytes(31))}, {"1": b64url_encode(bytes(33))},
    {"1": _KEY + "="}, {"1": _KEY[:-1] + "B"}, {"1": base64.b64encode(bytes([251] * 32)).decode()}, {"1": 5},
    {"1": None}, {"0": _KEY}, {"01": _KEY}, {"-1": _KEY}, {"1.0": _KEY}, {"one": _KEY}, {" 1": _KEY},
    {"1\n": _KEY}, {"1": _KEY, "x": _KEY}, {"12345678901": _KEY}, {"\u0661": _KEY},
], ids=lambda b: json.dumps(b)[:40])
def test_signed_reverse_token_with_invalid_verify_keys_is_malformed(issuer: Issuer, bad: Any) -> None:
    claims = {**_claims(issuer.issue("research-a", "reverse")), "verify_keys": bad}
    error = _refused(_resign(issuer, claims), issuer.public_keys(), MalformedTokenError, (_KEY,))
    assert "verify_keys" in str(error)


@pytest.mark.parametrize(("project", "kind", "extra"), [
    ("research-a", "pseudonymisation", {}), ("vendor-x", "secondary", {"source_project": "research-a"}),
    ("random-r", "reverse", {})])
def test_verify_keys_on_a_token_that_has_no_use_for_them_is_malformed(issuer: Issuer, project: str, kind: str,
                                                                     extra: dict[str, str]) -> None:
    claims = {**_claims(issuer.issue(project, kind, **extra)), "verify_keys": {"1": _KEY}}  # type: ignore[arg-type]
    error = _refused(_resign(issuer, claims), issuer.public_keys(), MalformedTokenError, (_KEY,))
    assert "verify_keys" in str(error)


def test_every_issued_token_has_a_fresh_jti(issuer: Issuer) -> None:
    jtis = {verify_token(issuer.issue("research-b", "pseudonymisation"), issuer.public_keys()).jti for _ in range(5)}
    assert len(jtis) == 5


def test_reverse_token_never_outlives_the_retention_end(issuer: Issuer) -> None:
    project = issuer.create_project("short-lived", method="reversible", retention=timedelta(days=2))
    raw = issuer.issue("short-lived", "reverse", expires_in=timedelta(days=365))
    claims = _claims(raw)
    assert claims["exp"] <= project.retention_until.timestamp()
    assert claims["exp"] == int(project.retention_until.timestamp())
    token = verify_token(raw, issuer.public_keys())
    assert token.expires <= token.retention_until
    # shorter lifetimes than the retention are kept as asked
    short = _claims(issuer.issue("short-lived", "reverse", expires_in=timedelta(hours=1)))
    assert short["exp"] - short["iat"] == 3600


def test_reverse_token_refused_for_an_irreversible_project(issuer: Issuer) -> None:
    with pytest.raises(IssuerError, match="irreversible"):
        issuer.issue("research-b", "reverse")


def test_secondary_token_needs_an_existing_other_source_project(issuer: Issuer) -> None:
    with pytest.raises(IssuerError, match="source-project"):
        issuer.issue("vendor-x", "secondary")
    with pytest.raises(IssuerError, match="does not exist"):
        issuer.issue("vendor-x", "secondary", source_project="no-such-project")
    with pytest.raises(IssuerError, match="another project"):
        issuer.issue("vendor-x", "secondary", source_project="vendor-x")


def test_issue_refuses_unknown_kind_project_and_lifetime(issuer: Issuer) -> None:
    with pytest.raises(IssuerError, match="unknown"):
        issuer.issue("research-a", "admin")
    with pytest.raises(IssuerError, match="does not exist"):
        issuer.issue("nope", "pseudonymisation")
    with pytest.raises(IssuerError, match="positive"):
        issuer.issue("research-a", "pseudonymisation", expires_in=timedelta(0))


def test_token_repr_and_public_claims_hold_no_secret(issuer: Issuer) -> None:
    for project, kind, extra in (("research-a", "pseudonymisation", {}), ("research-a", "reverse", {}),
                                 ("vendor-x", "secondary", {"source_project": "research-a"})):
        raw = issuer.issue(project, kind, **extra)
        token = verify_token(raw, issuer.public_keys())
        claims = _claims(raw)
        secrets = [raw, raw.split(".")[1], raw.split(".")[2]] + \
            [claims[k] for k in ("key", "escrow_public_key", "escrow_private_key") if k in claims] + \
            list(claims.get("verify_keys", {}).values())
        shown = [repr(token), str(token), json.dumps(token.public_claims())]
        for text in shown:
            for secret in secrets:
                assert secret not in text
        assert token.jti in repr(token)
        assert token.fingerprint in repr(token)


# --- refusals, one per reason ---------------------------------------------------------------
@pytest.fixture
def raw(issuer: Issuer) -> str:
    return issuer.issue("research-a", "pseudonymisation")


@pytest.fixture
def key_claim(raw: str) -> str:
    return _claims(raw)["key"]


@pytest.mark.parametrize("garbage", ["", "   ", "not a token", "a.b.c.d", "....", "x" * 20_000])
def test_malformed_garbage(issuer: Issuer, garbage: str) -> None:
    _refused(garbage, issuer.public_keys(), MalformedTokenError)


def test_malformed_two_parts(issuer: Issuer, raw: str, key_claim: str) -> None:
    header, payload, _sig = raw.split(".")
    error = _refused(f"{header}.{payload}", issuer.public_keys(), MalformedTokenError, (key_claim, payload))
    assert "2 dot-separated" in str(error)


def test_malformed_bad_base64(issuer: Issuer, raw: str, key_claim: str) -> None:
    header, payload, sig = raw.split(".")
    for bad in (f"{header}.{payload}!.{sig}", f"{header}.{payload}.{sig}=", f"{header}+.{payload}.{sig}",
                f"{header}.{payload[:-1]}é.{sig}"):
        _refused(bad, issuer.public_keys(), MalformedTokenError, (key_claim,))


def test_malformed_non_json_header(issuer: Issuer, raw: str, key_claim: str) -> None:
    _h, payload, sig = raw.split(".")
    for header in (b"not json", b"\xff\xfe\x00", b"[1, 2]", b'"EdDSA"'):
        _refused(f"{b64url_encode(header)}.{payload}.{sig}", issuer.public_keys(), MalformedTokenError, (key_claim,))


def test_malformed_deeply_nested_header(issuer: Issuer, raw: str) -> None:
    _h, payload, sig = raw.split(".")
    _refused(f"{b64url_encode(b'[' * 10_000)}.{payload}.{sig}", issuer.public_keys(), MalformedTokenError)


def test_alg_none_is_refused(issuer: Issuer, raw: str, key_claim: str) -> None:
    _h, payload, _sig = raw.split(".")
    header = b64url_encode(json.dumps({"alg": "none", "kid": issuer.kid}).encode())
    error = _refused(f"{header}.{payload}.", issuer.public_keys(), MalformedTokenError, (key_claim,))
    assert "'none'" in str(error)


def test_alg_hs256_is_refused(issuer: Issuer, raw: str, key_claim: str) -> None:
    _h, payload, _sig = raw.split(".")
    header = b64url_encode(json.dumps({"alg": "HS256", "kid": issuer.kid}).encode())
    # the classic confusion attack: HMAC keyed with the issuer's public key
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = issuer.public_keys().get(issuer.kid).public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)  # type: ignore[union-attr]
    mac = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    error = _refused(f"{header}.{payload}.{b64url_encode(mac)}", issuer.public_keys(), MalformedTokenError, (key_claim,))
    assert "'HS256'" in str(error)


def test_truncated_token(issuer: Issuer, raw: str, key_claim: str) -> None:
    assert len(raw.rsplit(".", 1)[1]) == 86  # 64 bytes
    for cut in (2, 6, 86):  # whole bytes missing: a short signature
        error = _refused(raw[:-cut], issuer.public_keys(), TokenSignatureError, (key_claim,))
        assert "truncated" in str(error)
    for cut in (1, 5):  # one character of a byte left over is never base64url
        error = _refused(raw[:-cut], issuer.public_keys(), MalformedTokenError, (key_claim,))
        assert "truncated" in str(error)
    _refused(raw[: raw.rindex(".")], issuer.public_keys(), MalformedTokenError, (key_claim,))
    _refused(raw[: len(raw) // 3], issuer.public_keys(), MalformedTokenError, (key_claim,))


def test_unknown_kid(issuer: Issuer, raw: str, key_claim: str, tmp_path: Any) -> None:
    other = Issuer.init(DirectoryStore(tmp_path / "other-store"), "other-issuer")
    error = _refused(raw, other.public_keys(), UnknownIssuerKeyError, (key_claim,))
    assert issuer.kid in str(error)
    _refused(raw, TrustedKeys(), UnknownIssuerKeyError, (key_claim,))


def test_signature_of_another_issuer_under_the_same_kid(issuer: Issuer, raw: str, key_claim: str) -> None:
    forged = sign_claims(_claims(raw), Ed25519PrivateKey.generate(), issuer.kid)
    assert _header(forged)["kid"] == issuer.kid
    _refused(forged, issuer.public_keys(), TokenSignatureError, (key_claim,))


def test_tampered_claim_keeps_no_signature(issuer: Issuer, raw: str, key_claim: str) -> None:
    header, _payload, sig = raw.split(".")
    for edit in ({"sub": "research-b"}, {"exp": 4_102_444_800}, {"kind": "reverse"}):
        claims = {**_claims(raw), **edit}
        payload = b64url_encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        _refused(f"{header}.{payload}.{sig}", issuer.public_keys(), TokenSignatureError, (key_claim,))


def test_signature_bit_flip(issuer: Issuer, raw: str, key_claim: str) -> None:
    header, payload, sig = raw.split(".")
    raw_sig = bytearray(b64url_decode(sig))
    raw_sig[10] ^= 0x01
    _refused(f"{header}.{payload}.{b64url_encode(bytes(raw_sig))}", issuer.public_keys(), TokenSignatureError,
             (key_claim,))


def test_expired(issuer: Issuer, raw: str, key_claim: str) -> None:
    exp = _claims(raw)["exp"]
    verify_token(raw, issuer.public_keys(), now=exp + LEEWAY_SECONDS - 1)  # within the tolerated skew
    _refused(raw, issuer.public_keys(), TokenExpiredError, (key_claim,), now=exp + LEEWAY_SECONDS)
    error = _refused(raw, issuer.public_keys(), TokenExpiredError, (key_claim,), now=exp + 86_400)
    assert "expired" in str(error)


def test_expired_by_the_clock(issuer: Issuer) -> None:
    token = issuer.issue("research-b", "pseudonymisation", expires_in=timedelta(seconds=1))
    _refused(token, issuer.public_keys(), TokenExpiredError, now=time.time() + LEEWAY_SECONDS + 2)


def test_not_yet_valid(issuer: Issuer) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    raw = issuer.issue("research-a", "pseudonymisation", not_before=later)
    key_claim = _claims(raw)["key"]
    _refused(raw, issuer.public_keys(), TokenNotYetValidError, (key_claim,))
    nbf = _claims(raw)["nbf"]
    verify_token(raw, issuer.public_keys(), now=nbf - LEEWAY_SECONDS)  # within the tolerated skew
    _refused(raw, issuer.public_keys(), TokenNotYetValidError, (key_claim,), now=nbf - LEEWAY_SECONDS - 1)


def test_wrong_kind(issuer: Issuer, raw: str, key_claim: str) -> None:
    error = _refused(raw, issuer.public_keys(), TokenKindError, (key_claim,), kind="reverse")
    assert "'pseudonymisation'" in str(error) and "'reverse'" in str(error)
    _refused(raw, issuer.public_keys(), TokenKindError, (key_claim,), kind="secondary")


def test_wrong_project(issuer: Issuer, raw: str, key_claim: str) -> None:
    error = _refused(raw, issuer.public_keys(), TokenProjectError, (key_claim,), project="research-b")
    assert "research-a" in str(error) and "research-b" in str(error)


def test_reverse_token_after_retention_end(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "reverse")
    token = verify_token(raw, issuer.public_keys())
    end = token.retention_until.timestamp()
    assert token.expires_at <= end
    verify_token(raw, issuer.public_keys(), now=end - 1)
    secret = _claims(raw)["escrow_private_key"]
    # inside the clock-skew leeway of exp, retention still refuses
    _refused(raw, issuer.public_keys(), RetentionEndedError, (secret,), now=end)
    _refused(raw, issuer.public_keys(), RetentionEndedError, (secret,), now=end + LEEWAY_SECONDS - 1)


def test_reverse_token_outliving_retention_is_refused_after_it(issuer: Issuer) -> None:
    """A portal that does not cap ``exp`` at the retention end: the consumer still refuses."""
    claims = _claims(issuer.issue("research-a", "reverse"))
    end = datetime.fromisoformat(claims["retention_until"].replace("Z", "+00:00")).timestamp()
    claims["exp"] = int(end) + 365 * 86400
    raw = _resign(issuer, claims)
    verify_token(raw, issuer.public_keys(), now=end - 10)
    error = _refused(raw, issuer.public_keys(), RetentionEndedError, (claims["escrow_private_key"],), now=end + 86400)
    assert "retention" in str(error)


def test_pseudonymisation_token_ignores_retention(issuer: Issuer) -> None:
    """Retention ends reversal, not pseudonymisation (the escrow rows then carry a past retention)."""
    claims = _claims(issuer.issue("research-a", "pseudonymisation"))
    claims["exp"] = 4_102_444_800
    token = verify_token(_resign(issuer, claims), issuer.public_keys(), now=4_000_000_000)
    assert token.kind == "pseudonymisation"


@pytest.mark.parametrize(
    ("edit", "claim"),
    [
        ({"kind": "admin"}, "kind"),
        ({"jti": "not-a-uuid"}, "jti"),
        ({"exp": "tomorrow"}, "exp"),
        ({"exp": True}, "exp"),
        ({"retention_until": "2030-01-01T00:00:00"}, "retention_until"),
        ({"key": "c2hvcnQ"}, "key"),
        ({"method": "magic"}, "method"),
        ({"format": {"alphabet": "hex", "length": 4, "prefix": ""}}, "format"),
        ({"format": {"alphabet": "emoji", "length": 30, "prefix": ""}}, "format"),
        ({"format": "base32"}, "format"),
    ],
)
def test_signed_token_with_invalid_claims_is_malformed(issuer: Issuer, raw: str, edit: dict[str, Any],
                                                       claim: str) -> None:
    error = _refused(_resign(issuer, {**_claims(raw), **edit}), issuer.public_keys(), MalformedTokenError)
    assert claim in str(error)


@pytest.mark.parametrize("claim", ["iat", "nbf", "exp"])
@pytest.mark.parametrize("value", [10**20, -(10**20), 253_402_300_800])
def test_signed_token_with_out_of_range_times_is_malformed(issuer: Issuer, raw: str, claim: str, value: int) -> None:
    """Times no calendar can show are refused as malformed, not as an arithmetic crash."""
    _refused(_resign(issuer, {**_claims(raw), claim: value}), issuer.public_keys(), MalformedTokenError)


def test_signed_reverse_token_of_an_irreversible_project_is_malformed(issuer: Issuer) -> None:
    claims = _claims(issuer.issue("research-a", "reverse"))
    claims["method"] = "irreversible"
    _refused(_resign(issuer, claims), issuer.public_keys(), MalformedTokenError)


def test_payload_that_is_not_a_json_object(issuer: Issuer) -> None:
    for payload in (b"[]", b"not json", b"\xff"):
        raw = jws_sign({"alg": "EdDSA", "kid": issuer.kid}, payload, issuer._private)
        _refused(raw, issuer.public_keys(), MalformedTokenError)


# --- crit and duplicate members (v1.1): refused as malformed, even when signed by the issuer ----
def _sign_raw(issuer: Issuer, header: bytes, payload: bytes) -> str:
    """A compact JWS over exactly these header and payload bytes, signed with the trusted issuer key."""
    signing_input = f"{b64url_encode(header)}.{b64url_encode(payload)}"
    return f"{signing_input}.{b64url_encode(issuer._private.sign(signing_input.encode()))}"


def _payload(raw: str) -> bytes:
    return b64url_decode(raw.split(".")[1])


@pytest.mark.parametrize("crit", [["exp"], ["b64"], [], "exp", None, ["crit"]], ids=json.dumps)
def test_header_with_crit_is_malformed(issuer: Issuer, raw: str, key_claim: str, crit: Any) -> None:
    """RFC 7515 §4.1.11: v1 understands no extension, so any ``crit`` makes the token invalid. The
    token is signed by the trusted issuer key: without the check it would verify."""
    header = {"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}
    assert verify_token(_sign_raw(issuer, json.dumps(header).encode(), _payload(raw)), issuer.public_keys())
    signed = _sign_raw(issuer, json.dumps({**header, "crit": crit}).encode(), _payload(raw))
    error = _refused(signed, issuer.public_keys(), MalformedTokenError, (key_claim,))
    assert "'crit'" in str(error)


@pytest.mark.parametrize("header", [
    '{"alg":"EdDSA","typ":"JWT","kid":"KID","kid":"KID"}',
    '{"alg":"none","alg":"EdDSA","typ":"JWT","kid":"KID"}',
    '{"alg":"EdDSA","typ":"JWT","kid":"KID","x":{"a":1,"a":1}}',
    '{"alg":"EdDSA","typ":"JWT","kid":"KID","\\u0061lg":"EdDSA"}',
], ids=["kid", "alg", "nested", "escaped-name"])
def test_header_with_a_duplicate_member_is_malformed(issuer: Issuer, raw: str, key_claim: str, header: str) -> None:
    signed = _sign_raw(issuer, header.replace("KID", issuer.kid).encode(), _payload(raw))
    error = _refused(signed, issuer.public_keys(), MalformedTokenError, (key_claim,))
    assert "twice" in str(error) and "header" in str(error)


def _duplicated(raw: str, name: str, value: Any, nested_in: str | None = None) -> bytes:
    """The token's payload with member ``name`` written a second time (inside ``nested_in`` if given)."""
    claims = _claims(raw)
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True)
    extra = f"{json.dumps(name)}:{json.dumps(value)}"
    if nested_in is None:
        return (body[:-1] + "," + extra + "}").encode()
    inner = json.dumps(claims[nested_in], separators=(",", ":"), sort_keys=True)
    assert body.count(inner) == 1
    return body.replace(inner, inner[:-1] + "," + extra + "}").encode()


@pytest.mark.parametrize(("name", "value", "nested_in"), [
    ("sub", "research-b", None),
    ("kind", "reverse", None),
    ("jti", "00000000-0000-4000-8000-000000000000", None),
    ("exp", 4_102_444_800, None),
    ("key", b64url_encode(bytes(32)), None),
    ("length", 64, "format"),
    ("alphabet", "hex", "format"),
], ids=lambda v: str(v)[:20])
def test_payload_with_a_duplicate_member_is_malformed(issuer: Issuer, raw: str, key_claim: str, name: str,
                                                      value: Any, nested_in: str | None) -> None:
    """The standard decoder keeps the last of two members, another parser the first: the payload is
    refused rather than read one way here and another way elsewhere. Signed by the trusted issuer key."""
    header = json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}).encode()
    payload = _duplicated(raw, name, value, nested_in)
    assert json.loads(payload)  # the standard decoder takes it (last one wins)
    signed = _sign_raw(issuer, header, payload)
    error = _refused(signed, issuer.public_keys(), MalformedTokenError, (key_claim, str(value)))
    assert "twice" in str(error) and "payload" in str(error) and repr(name) in str(error)
    assert peek_claims(signed) == {}  # nor are its claims read for the audit


def test_duplicate_member_deep_in_verify_keys_is_malformed(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "reverse")
    header = json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}).encode()
    signed = _sign_raw(issuer, header, _duplicated(raw, "1", b64url_encode(bytes(32)), "verify_keys"))
    error = _refused(signed, issuer.public_keys(), MalformedTokenError, (_claims(raw)["escrow_private_key"],))
    assert "'1'" in str(error) and "twice" in str(error)


def test_same_value_named_twice_is_still_malformed(issuer: Issuer, raw: str) -> None:
    header = json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": issuer.kid}).encode()
    signed = _sign_raw(issuer, header, _duplicated(raw, "sub", "research-a"))
    _refused(signed, issuer.public_keys(), MalformedTokenError)


# --- what a log masker must hide ----------------------------------------------------------------
def _forms(key: bytes) -> set[str]:
    return {b64url_encode(key), base64.urlsafe_b64encode(key).decode(), base64.b64encode(key).decode(),
            base64.b64encode(key).decode().rstrip("="), key.hex(), key.hex().upper()}


def test_secret_parts_of_every_kind(issuer: Issuer) -> None:
    issuer.rotate_key("research-a")
    for project, kind, extra in (("research-a", "pseudonymisation", {}), ("research-a", "reverse", {}),
                                 ("vendor-x", "secondary", {"source_project": "research-a"})):
        raw = issuer.issue(project, kind, **extra)
        token = verify_token(raw, issuer.public_keys())
        parts = set(secret_parts(f"  {raw}\n"))
        assert parts == set(token.secret_parts()) | {f"  {raw}\n"}
        assert {raw, raw.split(".")[1]} <= parts
        keys = [token.key] if token.key else []
        if token.escrow_private_key is not None:
            from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

            keys.append(token.escrow_private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        if token.escrow_public_key is not None:
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            keys.append(token.escrow_public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
        keys += list((token.verify_keys or {}).values())
        assert len(keys) == {"pseudonymisation": 2, "reverse": 3, "secondary": 1}[kind]
        for key in keys:
            assert _forms(key) <= parts, kind
        assert raw.split(".")[0] not in parts  # the header holds no secret
        lengths = [len(p) for p in secret_parts(raw)]
        assert lengths == sorted(lengths, reverse=True)  # a masker replaces the whole before a piece


def test_secret_parts_of_an_unverified_token(issuer: Issuer, raw: str) -> None:
    """Masking happens before verification: a token with a bad signature, duplicate key claims or
    an unknown issuer still has every key form masked; junk never raises."""
    header, _payload_segment, sig = raw.split(".")
    first, second = bytes(range(32)), bytes(range(32, 64))
    payload = (json.dumps(_claims(raw))[:-1] + f', "key": "{b64url_encode(second)}"}}').replace(
        _claims(raw)["key"], b64url_encode(first))
    forged = f"{header}.{b64url_encode(payload.encode())}.{sig}"
    parts = set(secret_parts(forged))
    assert _forms(first) <= parts and _forms(second) <= parts
    assert {forged, b64url_encode(payload.encode())} <= parts
    for junk in ("", "   ", "a.b.c", "x" * 100_000, "...", f"{header}.!!!.{sig}", f"{header}.{b64url_encode(b'[1]')}.x"):
        assert all(len(p) >= 3 for p in secret_parts(junk))
    short = f"{header}.{b64url_encode(json.dumps({'key': 'c2hvcnQ', 'verify_keys': {'1': 'AAAA'}}).encode())}.x"
    assert "c2hvcnQ" not in secret_parts(short) and "AAAA" not in secret_parts(short)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-=.]{0,60}", fullmatch=True))
def test_fuzz_secret_parts_never_raises(text: str) -> None:
    parts = secret_parts(text)
    assert all(isinstance(p, str) and p for p in parts)


def test_surrounding_whitespace_is_tolerated(issuer: Issuer, raw: str) -> None:
    token = verify_token(f"\n  {raw}\n", issuer.public_keys())
    assert token.raw == raw
    assert token.fingerprint == fingerprint(raw)


def test_peek_claims_reads_ids_only(issuer: Issuer, raw: str, key_claim: str) -> None:
    peek = peek_claims(raw)
    assert peek == {"jti": _claims(raw)["jti"], "sub": "research-a", "kind": "pseudonymisation", "iss": "test-issuer"}
    assert key_claim not in json.dumps(peek)
    assert peek_claims("garbage") == {}
    assert peek_claims(f"{b64url_encode(b'{}')}.{b64url_encode(b'[1]')}.x") == {}


def test_trusted_keys_round_trip_and_refuse_bad_jwks(issuer: Issuer, raw: str) -> None:
    jwks = issuer.public_keys().to_jwks()
    for form in (jwks, json.dumps(jwks), jwks["keys"], jwks["keys"][0]):
        assert verify_token(raw, TrustedKeys.from_jwks(form)).project == "research-a"  # type: ignore[arg-type]
    with pytest.raises(MalformedTokenError):
        TrustedKeys.from_jwks("{not json")
    with pytest.raises(MalformedTokenError):
        TrustedKeys.from_jwks({"kty": "RSA", "kid": "k", "x": "AA"})
    with pytest.raises(MalformedTokenError):
        TrustedKeys.from_jwks({"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "AAAA"})


@pytest.mark.parametrize("junk", ["[1]", "5", '"text"', '{"keys": 5}', '{"keys": ["x"]}', "null"])
def test_trusted_keys_refuse_json_that_is_no_jwks(junk: str) -> None:
    with pytest.raises(MalformedTokenError):
        TrustedKeys.from_jwks(junk)


# --- fuzzing ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TrustedKeys]:
    issuer = Issuer.init(DirectoryStore(tmp_path_factory.mktemp("fuzz") / "store"), "fuzz-issuer")
    issuer.create_project("research-a", method="reversible")
    return issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400) | st.from_regex(r"[A-Za-z0-9_\-]{0,60}\.[A-Za-z0-9_\-=.]{0,60}", fullmatch=True))
def test_fuzz_arbitrary_text_only_raises_token_errors(fuzz_target: tuple[str, TrustedKeys], text: str) -> None:
    _raw, keys = fuzz_target
    with pytest.raises(TokenError):
        verify_token(text, keys)


def _b64_json(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit"]),
                              st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers()))),
       payload=st.binary(max_size=64), sig=st.binary(max_size=70))
def test_fuzz_structured_jws_only_raises_token_errors(fuzz_target: tuple[str, TrustedKeys], header: dict[str, Any],
                                                     payload: bytes, sig: bytes) -> None:
    _raw, keys = fuzz_target
    with pytest.raises(TokenError):
        verify_token(f"{_b64_json(header)}.{b64url_encode(payload)}.{b64url_encode(sig)}", keys)


@st.composite
def mutations(draw: st.DrawFn, raw: str) -> str:
    position = draw(st.integers(0, len(raw) - 1))
    char = draw(st.characters() | st.sampled_from("AQgw_-=.+/ \r\x00"))
    how = draw(st.sampled_from(["replace", "insert", "delete", "swap", "truncate"]))
    if how == "replace":
        return raw[:position] + char + raw[position + 1 :]
    if how == "insert":
        return raw[:position] + char + raw[position:]
    if how == "delete":
        return raw[:position] + raw[position + 1 :]
    if how == "swap":
        other = draw(st.integers(0, len(raw) - 1))
        chars = list(raw)
        chars[position], chars[other] = chars[other], chars[position]
        return "".join(chars)
    return raw[:position]


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_token_is_never_accepted(fuzz_target: tuple[str, TrustedKeys], data: st.DataObject) -> None:
    raw, keys = fuzz_target
    mutated = data.draw(mutations(raw))
    assume(mutated.strip() != raw)
    with pytest.raises(TokenError) as info:
        verify_token(mutated, keys)
    assert raw not in str(info.value)


@settings(max_examples=200, deadline=None)
@given(last=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
def test_fuzz_signature_last_character_is_canonical(fuzz_target: tuple[str, TrustedKeys], last: str) -> None:
    """The 86th character of a signature carries 2 bits and 4 padding bits: only one spelling is valid."""
    raw, keys = fuzz_target
    mutated = raw[:-1] + last
    assume(mutated != raw)
    with pytest.raises(TokenError):
        verify_token(mutated, keys)


# --- max_uses (docs/design.md §3, v1.1) -------------------------------------------------------------------
def test_max_uses_is_carried_and_shown(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "reverse", max_uses=3)
    assert _claims(raw)["max_uses"] == 3
    token = verify_token(raw, issuer.public_keys())
    assert token.max_uses == 3 and token.public_claims()["max_uses"] == 3
    unlimited = verify_token(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys())
    assert unlimited.max_uses is None and "max_uses" not in unlimited.public_claims()


@pytest.mark.parametrize("value", [0, -1, "1", 1.0, True, None])
def test_a_malformed_max_uses_is_refused(issuer: Issuer, value: Any) -> None:
    claims = _claims(issuer.issue("research-a", "reverse"))
    claims["max_uses"] = value
    with pytest.raises(MalformedTokenError, match="max_uses"):
        verify_token(_resign(issuer, claims), issuer.public_keys())


@pytest.mark.parametrize("value", [0, -2, True, 1.5])
def test_the_issuer_refuses_a_bad_max_uses(issuer: Issuer, value: Any) -> None:
    with pytest.raises(IssuerError, match="max_uses must be a positive whole number"):
        issuer.issue("research-a", "reverse", max_uses=value)
