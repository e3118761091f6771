"""Published test vectors, checked in and run: RFC 8037 (EdDSA JWS) and RFC 9180 (HPKE).

RFC 4231 (HMAC-SHA256) runs in test_mac.py, the GCM specification's AES-256 cases and the escrow
suite's HPKE in test_sealer.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pseudonymise.core.errors import UnknownIssuerKeyError
from pseudonymise.core.tokens import (
    IssuerKey,
    TrustedKeys,
    b64url_decode,
    jwk_thumbprint,
    jws_sign,
    jws_verify,
    new_jti,
    sign_claims,
    verify_token,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


# --- RFC 8037 -----------------------------------------------------------------------------------
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_PAYLOAD = b"Example of Ed25519 signing"
RFC8037_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


def _rfc8037_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC8037_D))


def test_rfc8037_public_key_and_thumbprint() -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = _rfc8037_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert raw == b64url_decode(RFC8037_X)
    assert jwk_thumbprint(RFC8037_X) == RFC8037_THUMBPRINT


def test_rfc8037_jws_sign_reproduces_the_published_jws() -> None:
    assert jws_sign({"alg": "EdDSA"}, RFC8037_PAYLOAD, _rfc8037_key()) == RFC8037_JWS


def test_rfc8037_published_signature_verifies_with_the_raw_public_key() -> None:
    protected, payload, signature = RFC8037_JWS.split(".")
    public = Ed25519PublicKey.from_public_bytes(b64url_decode(RFC8037_X))
    public.verify(b64url_decode(signature), f"{protected}.{payload}".encode("ascii"))  # raises if invalid
    assert b64url_decode(payload) == RFC8037_PAYLOAD


def test_rfc8037_jws_without_kid_is_refused_by_jws_verify() -> None:
    keys = TrustedKeys.from_jwks({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X, "kid": RFC8037_THUMBPRINT})
    with pytest.raises(UnknownIssuerKeyError):
        jws_verify(RFC8037_JWS, keys)


def test_rfc8037_key_with_kid_signs_and_verifies() -> None:
    keys = TrustedKeys.from_jwks({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X, "kid": RFC8037_THUMBPRINT})
    token = jws_sign({"alg": "EdDSA", "kid": RFC8037_THUMBPRINT}, RFC8037_PAYLOAD, _rfc8037_key())
    header, payload = jws_verify(token, keys)
    assert header == {"alg": "EdDSA", "kid": RFC8037_THUMBPRINT}
    assert payload == RFC8037_PAYLOAD
    # the payload segment is the published one: only the header differs
    assert token.split(".")[1] == RFC8037_JWS.split(".")[1]


def test_rfc8037_key_signs_a_v1_token_that_verifies() -> None:
    key = IssuerKey(RFC8037_THUMBPRINT, _rfc8037_key().public_key())
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "rfc8037", "jti": new_jti(), "sub": "research-b", "kind": "pseudonymisation",
        "iat": now, "nbf": now, "exp": now + 600, "method": "irreversible", "treatment": "deterministic",
        "retention_until": "2099-01-01T00:00:00Z", "format": {"alphabet": "hex", "length": 32, "prefix": ""},
        "key": "A" * 43,
    }
    raw = sign_claims(claims, _rfc8037_key(), RFC8037_THUMBPRINT)
    token = verify_token(raw, TrustedKeys([key]), kind="pseudonymisation", project="research-b")
    assert token.kid == RFC8037_THUMBPRINT
    assert token.issuer == "rfc8037"
    assert token.jti == claims["jti"]
    assert token.key == bytes(32)
    assert token.expires_at == now + 600


# --- RFC 9180 -----------------------------------------------------------------------------------
HPKE_VECTORS: list[dict[str, Any]] = json.loads((VECTORS / "rfc9180-hpke-base-x25519-sha256.json").read_text())
_AEADS = {1: hpke.AEAD.AES_128_GCM, 2: hpke.AEAD.AES_256_GCM}


def test_rfc9180_file_holds_the_base_mode_x25519_suites() -> None:
    assert [(v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"]) for v in HPKE_VECTORS] == [(0, 32, 1, 1), (0, 32, 1, 2)]


@pytest.mark.parametrize("vector", HPKE_VECTORS, ids=lambda v: f"aead-{v['aead_id']}")
def test_rfc9180_first_encryption_decrypts(vector: dict[str, Any]) -> None:
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, _AEADS[vector["aead_id"]])
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(vector["skRm"]))
    first = vector["encryptions"][0]
    assert first["nonce"] == vector["base_nonce"]  # sequence 0: what single-shot HPKE uses
    plaintext = rust_openssl.hpke._decrypt_with_aad(
        suite, bytes.fromhex(vector["enc"]) + bytes.fromhex(first["ct"]), private,
        info=bytes.fromhex(vector["info"]), aad=bytes.fromhex(first["aad"]),
    )
    assert plaintext == bytes.fromhex(first["pt"])


@pytest.mark.parametrize("vector", HPKE_VECTORS, ids=lambda v: f"aead-{v['aead_id']}")
def test_rfc9180_wrong_aad_or_info_fails(vector: dict[str, Any]) -> None:
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, _AEADS[vector["aead_id"]])
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(vector["skRm"]))
    first = vector["encryptions"][0]
    sealed = bytes.fromhex(vector["enc"]) + bytes.fromhex(first["ct"])
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(suite, sealed, private, info=bytes.fromhex(vector["info"]),
                                            aad=bytes.fromhex(first["aad"]) + b"x")
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(suite, sealed, private, info=b"other", aad=bytes.fromhex(first["aad"]))
