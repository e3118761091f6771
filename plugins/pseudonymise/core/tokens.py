"""Token format v1: compact JWS (EdDSA/Ed25519) issue, parse and verify, failing closed.

docs/design.md §3. Verification checks, in this order: structure, header (``alg`` = EdDSA, no
``crit``, known ``kid``), signature, claim schema, ``nbf``/``exp``, then what the caller expects
(kind, project) and, for reverse tokens, the retention end. Header and payload are JSON objects
without duplicate members, at any depth. Each failure raises its own
:class:`~pseudonymise.core.errors.TokenError` subclass; no message ever contains the token.

:func:`secret_parts` says what to register with a log masker for any token, even one that will
be refused: the token, its payload segment and every key claim in every encoding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pseudonymise.core.errors import (
    MalformedTokenError,
    PolicyError,
    RetentionEndedError,
    TokenExpiredError,
    TokenKindError,
    TokenNotYetValidError,
    TokenProjectError,
    TokenSignatureError,
    UnknownIssuerKeyError,
)
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.instants import utc_seconds

KINDS: tuple[str, ...] = ("pseudonymisation", "reverse", "secondary")
METHODS: tuple[str, ...] = ("reversible", "irreversible")
TREATMENTS: tuple[str, ...] = ("deterministic", "randomised")
#: Clock skew tolerated on ``nbf``/``exp``, in seconds.
LEEWAY_SECONDS = 30
#: The longest token a consumer accepts (and the issuer issues).
MAX_TOKEN_LENGTH = 16_384
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: ``verify_keys`` member names: a key version, a positive integer in decimal without leading zeros.
_KEY_VERSION = re.compile(r"[1-9][0-9]{0,8}\Z")
#: Claims that hold secret key material (or, for the escrow public key, key material we mask anyway).
SECRET_CLAIMS: tuple[str, ...] = ("key", "escrow_private_key", "escrow_public_key", "verify_keys")
#: Key material shorter than this (decoded) is not registered with a masker: it would mask common text.
_MIN_SECRET_BYTES = 16
#: The last second a datetime can show (9999-12-31T23:59:59Z): later times would crash, not refuse.
_MAX_TIME = 253_402_300_799


def b64url_encode(data: bytes) -> str:
    """RFC 4648 §5 base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode canonical base64url without padding; raises ``ValueError`` on anything else.

    Strict on purpose: the standard decoder skips characters outside the alphabet and ignores
    the unused low bits of the last character, so many spellings would decode to one signature.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not unpadded base64url") from exc
    if b64url_encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


class _DuplicateMember(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses an object naming a member twice (the standard decoder keeps
    the last, another parser may keep the first: two readers, two tokens)."""
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise _DuplicateMember(name)
        members[name] = value
    return members


def _json_object(data: bytes, part: str) -> dict[str, Any]:
    """The JSON object of a token's ``part`` (header or payload), refusing duplicate members at any depth."""
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates)
    except _DuplicateMember as exc:
        raise MalformedTokenError(
            f"token {part} names the JSON member {exc.name[:40]!r} twice; a v1 token names every member once "
            "(RFC 7515 section 5.2): it was altered or made by a faulty issuer, ask the issuer for a new token"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise MalformedTokenError(f"token {part} is not JSON; it may be truncated or altered") from exc
    if not isinstance(value, dict):
        raise MalformedTokenError(f"token {part} is not a JSON object")
    return value


def fingerprint(token: str) -> str:
    """First 16 hex digits of SHA-256 of the token string: safe to log and audit."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def jwk_thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 OKP JWK with public value ``x``; used as the ``kid``."""
    members = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(members.encode()).digest())


# --- issuer keys ------------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuerKey:
    """A trusted issuer public key (an OKP/Ed25519 JWK) and its ``kid``."""

    kid: str
    public_key: Ed25519PublicKey

    def to_jwk(self) -> dict[str, str]:
        raw = self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw), "kid": self.kid, "alg": "EdDSA", "use": "sig"}

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> IssuerKey:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or not jwk.get("kid") or "x" not in jwk:
            raise MalformedTokenError(
                "issuer key is not an Ed25519 JWK with a kid: expected "
                '{"kty": "OKP", "crv": "Ed25519", "x": ..., "kid": ...}; '
                "print the right one with `pseudonymise issuer public-key`"
            )
        try:
            raw = b64url_decode(jwk["x"])
            return cls(kid=str(jwk["kid"]), public_key=Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise MalformedTokenError(f"issuer key {jwk.get('kid')!r} has an invalid 'x' (expected 32 bytes base64url)") from exc


class TrustedKeys:
    """The issuer public keys a consumer accepts, by ``kid`` (a JWKS)."""

    def __init__(self, keys: Iterable[IssuerKey] = ()) -> None:
        self._keys = {k.kid: k for k in keys}

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any] | str | list[Any]) -> TrustedKeys:
        """Accept a JWKS (``{"keys": [...]}``), a list of JWKs, one JWK, or their JSON text."""
        if isinstance(jwks, str):
            try:
                jwks = json.loads(jwks)
            except json.JSONDecodeError as exc:
                raise MalformedTokenError(
                    "trusted issuer keys are not valid JSON; paste the output of `pseudonymise issuer public-key`"
                ) from exc
        if isinstance(jwks, Mapping) and "keys" in jwks:
            items = jwks["keys"]
        elif isinstance(jwks, Mapping):
            items = [jwks]
        else:
            items = jwks
        if not isinstance(items, list):
            raise MalformedTokenError(
                'trusted issuer keys must be a JWKS ({"keys": [...]}), a list of JWKs or one JWK; '
                "paste the output of `pseudonymise issuer public-key`"
            )
        return cls(IssuerKey.from_jwk(k) for k in items)

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [k.to_jwk() for k in self._keys.values()]}

    def get(self, kid: str) -> IssuerKey | None:
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)


# --- low-level JWS ----------------------------------------------------------------------------
def jws_sign(header: Mapping[str, Any], payload: bytes, private_key: Ed25519PrivateKey) -> str:
    """Compact JWS serialisation (RFC 7515 §7.1) signed with EdDSA (RFC 8037)."""
    protected = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    signing_input = f"{protected}.{b64url_encode(payload)}"
    signature = private_key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(signature)}"


@dataclass(frozen=True)
class _ParsedJWS:
    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


def _parse_jws(token: str) -> _ParsedJWS:
    if not isinstance(token, str):
        raise MalformedTokenError("token must be text (a compact JWS); check where it is read from")
    token = token.strip()
    if not token:
        raise MalformedTokenError("token is empty; check the connection password, Vault secret or token file")
    if len(token) > MAX_TOKEN_LENGTH:
        raise MalformedTokenError(f"token is longer than {MAX_TOKEN_LENGTH} characters; it is not a v1 token")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedTokenError(
            f"token has {len(parts)} dot-separated part(s), a compact JWS has 3; "
            "it may be truncated: copy the whole token again"
        )
    try:
        header_bytes, payload, signature = (b64url_decode(p) for p in parts)
    except ValueError as exc:
        raise MalformedTokenError("token is not base64url-encoded JWS; it may be truncated or altered") from exc
    header = _json_object(header_bytes, "header")
    return _ParsedJWS(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def jws_verify(token: str, keys: TrustedKeys) -> tuple[dict[str, Any], bytes]:
    """Verify a compact EdDSA JWS against trusted keys; return (header, payload)."""
    jws = _parse_jws(token)
    if jws.header.get("alg") != "EdDSA":
        raise MalformedTokenError(
            f"token algorithm {str(jws.header.get('alg'))[:20]!r} is not accepted; v1 tokens are signed with EdDSA"
        )
    if "crit" in jws.header:
        # RFC 7515 §4.1.11: a recipient that does not understand every listed extension must refuse the
        # JWS, and v1 defines none. An empty or malformed list is refused too (§4.1.11 forbids both).
        raise MalformedTokenError(
            "token header has a 'crit' member (critical JWS extensions), and v1 tokens use none; "
            "the token was not issued for this consumer: ask the issuer for a v1 token"
        )
    kid = jws.header.get("kid")
    if kid is None and len(keys) == 0:
        raise UnknownIssuerKeyError("no trusted issuer keys are configured; add the issuer's JWKS to the connection")
    key = keys.get(str(kid)) if kid is not None else None
    if key is None:
        raise UnknownIssuerKeyError(
            f"token is signed by issuer key {str(kid)[:64]!r}, which is not among the trusted issuer keys; "
            "add that issuer's public key (`pseudonymise issuer public-key`) to the connection's issuer_keys"
        )
    if len(jws.signature) != 64:
        raise TokenSignatureError("token signature has the wrong length; the token is truncated or altered")
    try:
        key.public_key.verify(jws.signature, jws.signing_input)
    except InvalidSignature as exc:
        raise TokenSignatureError(
            f"token signature does not verify with issuer key {key.kid!r}; the token was altered or re-signed"
        ) from exc
    return jws.header, jws.payload


# --- the token --------------------------------------------------------------------------------
def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 instant (``Z`` or offset) into an aware UTC datetime."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("instant has no time zone")
    return dt.astimezone(UTC)


@dataclass(frozen=True, repr=False)
class Token:
    """A verified v1 token. ``repr`` and ``str`` never show the secret material."""

    raw: str = field(repr=False)
    issuer: str
    kid: str
    jti: str
    project: str
    kind: str
    issued_at: int
    not_before: int
    expires_at: int
    method: str
    treatment: str
    retention_until: datetime
    format: PseudonymFormat
    key: bytes | None = field(default=None, repr=False)
    escrow_public_key: X25519PublicKey | None = field(default=None, repr=False)
    escrow_private_key: X25519PrivateKey | None = field(default=None, repr=False)
    source_project: str | None = None
    key_version: int = 1
    #: For keys held in Vault Transit: ``{"engine": "transit", "mount": ..., "name": ...}`` instead of ``key``.
    key_ref: dict[str, str] | None = None
    #: Reverse tokens of deterministic projects (v1.1): the project's HMAC key of every key version,
    #: ``{key_version: 32-byte key}``, to recompute a pseudonym from an opened escrow value. ``None``
    #: when the token has none (tokens issued before v1.1, projects whose key is in Vault Transit).
    verify_keys: dict[int, bytes] | None = field(default=None, repr=False)
    #: Secondary tokens (v1.1): the source project's pseudonym format; input must match it.
    source_format: PseudonymFormat | None = None
    #: How many uses the consumer allows (v1.1), counted in the audit; ``None``: any number until expiry.
    max_uses: int | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    @property
    def reversible(self) -> bool:
        return self.method == "reversible"

    @property
    def expires(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)

    def public_claims(self) -> dict[str, Any]:
        """The claims without any secret: safe to print, log or audit."""
        return {
            "iss": self.issuer,
            "kid": self.kid,
            "jti": self.jti,
            "sub": self.project,
            "kind": self.kind,
            "iat": self.issued_at,
            "nbf": self.not_before,
            "exp": self.expires_at,
            "method": self.method,
            "treatment": self.treatment,
            "retention_until": utc_seconds(self.retention_until),
            "format": self.format.to_claim(),
            **({"source_project": self.source_project} if self.source_project else {}),
            **({"source_format": self.source_format.to_claim()} if self.source_format else {}),
            "key_version": self.key_version,
            **({"key_ref": self.key_ref} if self.key_ref else {}),
            **({"verify_key_versions": sorted(self.verify_keys)} if self.verify_keys else {}),
            **({"max_uses": self.max_uses} if self.max_uses is not None else {}),
            "fingerprint": self.fingerprint,
        }

    def secret_parts(self) -> list[str]:
        """What a log masker must hide for this token (see :func:`secret_parts`)."""
        return secret_parts(self.raw)

    def __repr__(self) -> str:
        return f"Token(jti={self.jti!r}, project={self.project!r}, kind={self.kind!r}, fingerprint={self.fingerprint!r})"

    __str__ = __repr__


def _time_claim(claims: Mapping[str, Any], name: str) -> int:
    value = _claim(claims, name, int)
    if not 0 <= value <= _MAX_TIME:
        raise MalformedTokenError(f"token claim {name!r} is not a time between 1970 and 9999")
    return value


def _key_ref_claim(claims: Mapping[str, Any]) -> dict[str, str]:
    ref = claims.get("key_ref")
    if not isinstance(ref, dict) or ref.get("engine") != "transit" or \
            not all(isinstance(ref.get(k), str) and ref.get(k) for k in ("mount", "name")):
        raise MalformedTokenError('token claim \'key_ref\' must be {"engine": "transit", "mount": ..., "name": ...}')
    return {"engine": "transit", "mount": ref["mount"], "name": ref["name"]}


def _key_version(claims: Mapping[str, Any]) -> int:
    """The key version (rotation); tokens issued before rotation existed carry none: version 1."""
    if "key_version" not in claims:
        return 1
    value = _claim(claims, "key_version", int)
    if value < 1:
        raise MalformedTokenError("token claim 'key_version' must be a positive integer")
    return value


def _max_uses(claims: Mapping[str, Any]) -> int | None:
    """How many uses the token allows (v1.1); ``None``: no limit but its lifetime."""
    if "max_uses" not in claims:
        return None
    value = _claim(claims, "max_uses", int)
    if value < 1:
        raise MalformedTokenError("token claim 'max_uses' must be a positive integer")
    return value


def _claim(claims: Mapping[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    value = claims.get(name)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise MalformedTokenError(f"token claim {name!r} is missing or of the wrong type; the token is not a v1 token")
    return value


def _key_claim(claims: Mapping[str, Any], name: str) -> bytes:
    try:
        raw = b64url_decode(_claim(claims, name, str))
    except ValueError as exc:
        raise MalformedTokenError(f"token claim {name!r} is not base64url") from exc
    if len(raw) != 32:
        raise MalformedTokenError(f"token claim {name!r} must hold 32 bytes, it holds {len(raw)}")
    return raw


def _verify_keys_claim(claims: Mapping[str, Any]) -> dict[int, bytes]:
    """``verify_keys``: ``{"<key version>": "<base64url of a 32-byte HMAC key>", ...}``, at least one."""
    value = claims.get("verify_keys")
    if not isinstance(value, dict) or not value:
        raise MalformedTokenError(
            "token claim 'verify_keys' must map key versions to keys, e.g. {\"1\": \"<base64url key>\"}; "
            "ask the issuer for a new reverse token"
        )
    keys: dict[int, bytes] = {}
    for version, key in value.items():
        if not _KEY_VERSION.match(version):
            raise MalformedTokenError(
                f"token claim 'verify_keys' names key version {version[:20]!r}; key versions are positive "
                "integers written in decimal, like \"1\""
            )
        try:
            raw = b64url_decode(key) if isinstance(key, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise MalformedTokenError(
                f"token claim 'verify_keys' holds no 32-byte base64url key for key version {version}; "
                "ask the issuer for a new reverse token"
            )
        keys[int(version)] = raw
    return keys


def _source_format_claim(claims: Mapping[str, Any]) -> PseudonymFormat:
    if "source_format" not in claims:
        raise MalformedTokenError(
            "this secondary token was issued before token format v1.1: it has no 'source_format' and carries "
            "its project's own key; ask the issuer to re-issue it (`pseudonymise token issue --kind secondary "
            "--source-project ...`), whose pseudonyms then differ from the old token's"
        )
    try:
        return PseudonymFormat.from_claim(_claim(claims, "source_format", dict))
    except PolicyError as exc:
        raise MalformedTokenError(f"token claim 'source_format' is invalid: {exc}") from exc


def token_from_claims(raw: str, header: Mapping[str, Any], claims: Mapping[str, Any]) -> Token:
    """Check the v1 claim schema and build a :class:`Token` (no time or expectation checks)."""
    kind = _claim(claims, "kind", str)
    if kind not in KINDS:
        raise MalformedTokenError(f"token kind {kind[:32]!r} is unknown; expected one of {', '.join(KINDS)}")
    method = _claim(claims, "method", str)
    treatment = _claim(claims, "treatment", str)
    if method not in METHODS or treatment not in TREATMENTS:
        raise MalformedTokenError("token claims 'method'/'treatment' hold unknown values")
    try:
        retention_until = parse_instant(_claim(claims, "retention_until", str))
    except ValueError as exc:
        raise MalformedTokenError("token claim 'retention_until' is not an ISO 8601 UTC instant") from exc
    try:
        uuid.UUID(_claim(claims, "jti", str))
    except ValueError as exc:
        raise MalformedTokenError("token claim 'jti' is not a UUID") from exc
    try:
        fmt = PseudonymFormat.from_claim(_claim(claims, "format", dict))
    except PolicyError as exc:
        raise MalformedTokenError(f"token claim 'format' is invalid: {exc}") from exc
    key = escrow_public = escrow_private = key_ref = None
    if kind in ("pseudonymisation", "secondary"):
        if "key_ref" in claims:
            key_ref = _key_ref_claim(claims)
        else:
            key = _key_claim(claims, "key")
    if kind == "pseudonymisation" and method == "reversible":
        escrow_public = X25519PublicKey.from_public_bytes(_key_claim(claims, "escrow_public_key"))
    if kind == "reverse":
        if method != "reversible":
            raise MalformedTokenError("a reverse token for an irreversible project is invalid")
        escrow_private = X25519PrivateKey.from_private_bytes(_key_claim(claims, "escrow_private_key"))
    source_project = source_format = verify_keys = None
    if kind == "secondary":
        source_project = _claim(claims, "source_project", str)
        source_format = _source_format_claim(claims)
    if "verify_keys" in claims:
        if kind != "reverse" or treatment != "deterministic":
            raise MalformedTokenError(
                "token claim 'verify_keys' belongs to reverse tokens of deterministic projects only; "
                "this token should not carry keys it has no use for: ask the issuer for a new token"
            )
        verify_keys = _verify_keys_claim(claims)
    return Token(
        raw=raw,
        issuer=_claim(claims, "iss", str),
        kid=str(header.get("kid")),
        jti=claims["jti"],
        project=_claim(claims, "sub", str),
        kind=kind,
        issued_at=_time_claim(claims, "iat"),
        not_before=_time_claim(claims, "nbf"),
        expires_at=_time_claim(claims, "exp"),
        method=method,
        treatment=treatment,
        retention_until=retention_until,
        format=fmt,
        key=key,
        escrow_public_key=escrow_public,
        escrow_private_key=escrow_private,
        source_project=source_project,
        key_version=_key_version(claims),
        key_ref=key_ref,
        verify_keys=verify_keys,
        source_format=source_format,
        max_uses=_max_uses(claims),
    )


def verify_token(
    raw: str,
    keys: TrustedKeys,
    *,
    kind: str | None = None,
    project: str | None = None,
    now: float | None = None,
) -> Token:
    """Verify ``raw`` completely and return the :class:`Token`; raise a specific TokenError otherwise."""
    header, payload = jws_verify(raw, keys)
    claims = _json_object(payload, "payload")
    token = token_from_claims(raw.strip(), header, claims)
    now = time.time() if now is None else now
    if now + LEEWAY_SECONDS < token.not_before:
        raise TokenNotYetValidError(
            f"token {token.jti} is not valid before {utc_seconds(datetime.fromtimestamp(token.not_before, UTC))}; "
            "wait, or ask the issuer for a token valid now"
        )
    if now - LEEWAY_SECONDS >= token.expires_at:
        raise TokenExpiredError(
            f"token {token.jti} for project {token.project!r} expired at {utc_seconds(token.expires)}; "
            "ask the issuer for a new token and update the connection"
        )
    if kind is not None and token.kind != kind:
        raise TokenKindError(
            f"token {token.jti} is a {token.kind!r} token but this operation needs a {kind!r} token; "
            "use a connection that holds the right kind"
        )
    if project is not None and token.project != project:
        raise TokenProjectError(
            f"token {token.jti} belongs to project {token.project!r}, not {project!r}; use that project's token"
        )
    if token.kind == "reverse" and now >= token.retention_until.timestamp():
        raise RetentionEndedError(
            f"project {token.project!r}'s retention ended at {utc_seconds(token.retention_until)}; "
            "reversal is no longer possible"
        )
    return token


def peek_claims(raw: str) -> dict[str, Any]:
    """Unverified, non-secret claims (jti, sub, kind, iss) for auditing a denied use; ``{}`` if unreadable
    (a payload naming a member twice is unreadable: which of the two would be the claim?)."""
    try:
        claims = _json_object(_parse_jws(raw).payload, "payload")
    except Exception:
        return {}
    return {k: str(claims[k])[:200] for k in ("jti", "sub", "kind", "iss", "source_project") if k in claims}


def key_encodings(data: bytes) -> list[str]:
    """Every text form the code (or a user copying it) may give key material: base64url and standard
    base64, with and without padding, and hex in lower and upper case. Register them all with a masker."""
    url, std = base64.urlsafe_b64encode(data).decode("ascii"), base64.b64encode(data).decode("ascii")
    return [url.rstrip("="), url, std, std.rstrip("="), data.hex(), data.hex().upper()]


def _lenient_b64decode(text: str) -> bytes | None:
    """Bytes of base64 or base64url text, padded or not; ``None`` if it is neither."""
    compact = text.strip().rstrip("=")
    if not compact or not re.fullmatch(r"[A-Za-z0-9+/_-]+", compact):
        return None
    try:
        return base64.b64decode(compact.replace("-", "+").replace("_", "/") + "=" * (-len(compact) % 4))
    except (binascii.Error, ValueError):
        return None


def _secret_strings(value: Any) -> list[str]:
    """The strings in a (possibly nested) secret claim value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secret_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _secret_strings(v)]
    return []


def _all_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` keeping every value of a member named twice (a masker hides them all)."""
    members: dict[str, Any] = {}
    for name, value in pairs:
        members[name] = [members[name], value] if name in members else value
    return members


def secret_parts(raw: str) -> list[str]:
    """What a log masker must hide for the token ``raw``, which need not be valid, verified or even
    a token: the text as given and stripped; its payload segment (the middle base64url part, which
    holds the keys in clear); and every key claim (``key``, ``escrow_public_key``,
    ``escrow_private_key``, each ``verify_keys`` value) in every encoding the code produces
    (base64url and standard base64, padded or not, hex in lower and upper case).

    Nothing here trusts the token: it is not verified, a claim named twice gives both values, and
    nothing raises. Parts shorter than 16 bytes of key material are left out, so junk claims cannot
    make a masker hide common text. Longest first, so a masker replaces the whole before a piece.
    """
    if not isinstance(raw, str) or not raw.strip():
        return []
    parts = {raw, raw.strip()}
    segments = raw.strip().split(".")
    if len(segments) == 3 and len(raw) <= 4 * MAX_TOKEN_LENGTH:
        payload = segments[1]
        if len(payload) >= 16:
            parts.add(payload)
        decoded = _lenient_b64decode(payload)
        claims: Any = None
        if decoded is not None:
            try:
                claims = json.loads(decoded, object_pairs_hook=_all_members)
            except (ValueError, RecursionError):
                claims = None
        if isinstance(claims, dict):
            for name in SECRET_CLAIMS:
                for text in _secret_strings(claims.get(name)):
                    material = _lenient_b64decode(text)
                    if material is None or len(material) < _MIN_SECRET_BYTES:
                        continue
                    parts.add(text)
                    parts.update(key_encodings(material))
    return sorted(parts, key=lambda part: (-len(part), part))


def sign_claims(claims: Mapping[str, Any], private_key: Ed25519PrivateKey, kid: str) -> str:
    """Sign v1 claims into a compact JWS (used by the issuer)."""
    header = {"alg": "EdDSA", "typ": "JWT", "kid": kid}
    return jws_sign(header, json.dumps(dict(claims), separators=(",", ":"), sort_keys=True).encode(), private_key)


def new_jti() -> str:
    return str(uuid.uuid4())
