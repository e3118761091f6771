"""docs/design.md §4 written out again with the standard library: the independent expectations tests compare with.

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
from pathlib import Path
from typing import Any

LABEL = b"pseudonymise/v1\x00"
SECONDARY_LABEL = b"pseudonymise/v1/secondary\x00"
SECONDARY_KEY_INFO = b"pseudonymise/v1/secondary-key\x00"
VECTORS = Path(__file__).resolve().parent / "vectors"


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


def rfc4231_cases() -> list[dict[str, bytes]]:
    """The published HMAC-SHA256 vectors of RFC 4231 (tests/vectors/rfc-4231-sha256.txt), as Key/Msg/MD bytes."""
    cases: list[dict[str, bytes]] = []
    current: dict[str, bytes] = {}
    for line in (VECTORS / "rfc-4231-sha256.txt").read_text().splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name in ("Key", "Msg", "MD"):
            current[name] = bytes.fromhex(value.strip())
            if name == "MD":
                cases.append(current)
                current = {}
    return cases


# --- docs/design.md §4.7 and the de-identifying actions (docs/deidentification.md), with hmac and datetime -------------
DATE_SHIFT_LABEL = b"pseudonymise/v1/date-shift\x00"


def date_shift_offset(key: bytes, subject: str | int, max_days: int, domain: str = "") -> int:
    """§4.7: the first 8 bytes of HMAC-SHA256(key, label + domain + NUL + canonical(subject)), big-endian, modulo
    ``2 * max_days``, minus ``max_days``, plus one when not negative."""
    mac = hmac.new(key, DATE_SHIFT_LABEL + domain.encode("utf-8") + b"\x00" + canonical(subject), hashlib.sha256)
    offset = int.from_bytes(mac.digest()[:8], "big") % (2 * max_days) - max_days
    return offset + 1 if offset >= 0 else offset


def shift(value: dt.date | str | None, days: int | None) -> dt.date | str | None:
    """A date or timestamp moved by ``days`` whole days (a timestamp with an offset: its instant by ``days`` × 24 h,
    written in its own offset); ISO text stays ISO text. NULL value or NULL offset (NULL subject): NULL."""
    if value is None or days is None:
        return None
    if isinstance(value, str):
        if len(value) <= 10:
            return (dt.date.fromisoformat(value) + dt.timedelta(days=days)).isoformat()
        moment = dt.datetime.fromisoformat(value)
        return (moment + dt.timedelta(days=days)).isoformat(sep=value[10] if value[10] in "T " else "T")
    return value + dt.timedelta(days=days)


def generalise_date(value: dt.date | str | None, to: str) -> str | None:
    """``YYYY``, ``YYYY-MM`` or ISO ``YYYY-Www`` (the ISO year of the ISO week) of a date, a timestamp's own date,
    or ISO text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value) if len(value) > 10 else dt.date.fromisoformat(value)
    if isinstance(value, dt.datetime):
        value = value.date()
    if to == "year":
        return str(value.year).zfill(4)
    if to == "month":
        return str(value.year).zfill(4) + "-" + str(value.month).zfill(2)
    iso = value.isocalendar()
    return str(iso[0]).zfill(4) + "-W" + str(iso[1]).zfill(2)


def integer_band(value: int | str | None, width: int, bottom: int | None = None, top: int | None = None) -> str | None:
    """``"<bottom"``, ``">=top"``, else ``"lo-hi"`` with both ends in the band, bands of ``width`` counted from
    ``bottom`` (or 0); width 1 gives ``"lo"``."""
    if value is None:
        return None
    number = int(value)
    if bottom is not None and number < bottom:
        return f"<{bottom}"
    if top is not None and number >= top:
        return f">={top}"
    origin = 0 if bottom is None else bottom
    low = number - (number - origin) % width
    return str(low) if width == 1 else f"{low}-{low + width - 1}"


def text_prefix(value: str | int | None, length: int) -> str | None:
    return None if value is None else unicodedata.normalize("NFC", str(value))[:length]


def masked(value: str | int | None, char: str = "*", *, keep_first: int | None = None,
           keep_last: int | None = None) -> str | None:
    """All but the first/last N characters replaced by ``char``; a value of N characters or fewer, all of it."""
    if value is None:
        return None
    text = unicodedata.normalize("NFC", str(value))
    keep = keep_first if keep_first is not None else keep_last
    assert keep is not None
    if len(text) <= keep:
        return char * len(text)
    if keep_first is not None:
        return text[:keep] + char * (len(text) - keep)
    return char * (len(text) - keep) + text[len(text) - keep:]
