"""DESIGN §4 written out again with the standard library: the independent expectations tests compare with.

Nothing here imports the package under test. A token is read by splitting its compact JWS and decoding
the payload (base64url JSON), never through the token verifier: the tests that use these functions have
already had the token accepted by the code under test, and only need its key and format.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import unicodedata
from collections.abc import Iterable
from typing import Any

LABEL = b"pseudonymise/v1\x00"
SECONDARY_LABEL = b"pseudonymise/v1/secondary\x00"
SECONDARY_KEY_INFO = b"pseudonymise/v1/secondary-key\x00"


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def claims(raw_token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified."""
    payload: dict[str, Any] = json.loads(b64url_decode(raw_token.strip().split(".")[1]))
    return payload


def canonical(value: str | int | bool | bytes | dt.date) -> bytes:
    """Step 2: ``str`` as NFC UTF-8, ``bool`` as ``true``/``false``, ``int`` as its decimal digits, dates and
    datetimes in ISO 8601 (``isoformat()``), bytes as is."""
    if isinstance(value, dt.date):
        return value.isoformat().encode("ascii")
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value).encode("utf-8")
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, bytes):
        return value
    raise AssertionError(f"the reference does not handle {type(value).__name__}")


def encode(mac: bytes, alphabet: str = "base32", length: int = 26, prefix: str = "") -> str:
    """Step 4: hex, base32 (lowercase, no padding), base64url (no padding) or digits; first ``length``
    characters; ``prefix`` in front."""
    if alphabet == "hex":
        text = mac.hex()
    elif alphabet == "base32":
        text = base64.b32encode(mac).decode("ascii").lower().rstrip("=")
    elif alphabet == "base64url":
        text = base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")
    elif alphabet == "digits":
        text = str(int.from_bytes(mac, "big") % 10**length).rjust(length, "0")
    else:
        raise AssertionError(f"the reference does not know the alphabet {alphabet!r}")
    return prefix + text[:length]


def pseudonym(key: bytes, value: str | int | bool | bytes | dt.date, *, domain: str = "", alphabet: str = "base32",
              length: int = 26, prefix: str = "") -> str:
    """Step 3 (deterministic) and 4: HMAC-SHA256(key, label + domain + NUL + canonical), encoded."""
    mac = hmac.new(key, LABEL + domain.encode("utf-8") + b"\x00" + canonical(value), hashlib.sha256).digest()
    return encode(mac, alphabet, length, prefix)


def secondary_pseudonym(key: bytes, first_level: str, *, alphabet: str = "base32", length: int = 26,
                        prefix: str = "") -> str:
    """Step 5: HMAC-SHA256(secondary key, secondary label + the first-level pseudonym), encoded."""
    mac = hmac.new(key, SECONDARY_LABEL + first_level.encode("utf-8"), hashlib.sha256).digest()
    return encode(mac, alphabet, length, prefix)


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32, salt: bytes = b"") -> bytes:
    """RFC 5869 written out with hmac (the secondary key of step 5 is HKDF with an empty salt)."""
    prk = hmac.new(salt or b"\x00" * 32, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def token_pseudonyms(raw_token: str, values: Iterable[str | int | bool | bytes | dt.date | None], *,
                     domain: str = "") -> list[str | None]:
    """What a pseudonymisation (or, by its kind, secondary) token makes of ``values``: its own key and
    format from its claims; ``None`` stays ``None`` (step 1)."""
    c = claims(raw_token)
    key, fmt = b64url_decode(c["key"]), c["format"]
    options = {"alphabet": fmt["alphabet"], "length": fmt["length"], "prefix": fmt.get("prefix", "")}
    if c["kind"] == "secondary":
        return [None if v is None else secondary_pseudonym(key, str(v), **options) for v in values]
    return [None if v is None else pseudonym(key, v, domain=domain, **options) for v in values]
