"""Pseudonym output formats (DESIGN.md §4 step 4): encode a 32-byte MAC as text.

A format is an alphabet, a length and a prefix. Formats carrying fewer than 64 bits are refused,
so pseudonyms stay collision-resistant at any realistic table size.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pseudonymise.core.errors import PolicyError

#: alphabet -> (minimum length for 64 bits, maximum length a 32-byte MAC yields)
ALPHABETS: dict[str, tuple[int, int]] = {
    "hex": (16, 64),
    "base32": (13, 52),
    "base64url": (11, 43),
    "digits": (20, 77),
}
DEFAULT_ALPHABET = "base32"
DEFAULT_LENGTH = 26


def _hex(mac: bytes, length: int) -> str:
    return mac.hex()[:length]


def _base32(mac: bytes, length: int) -> str:
    return base64.b32encode(mac)[:length].decode("ascii").lower()


def _base64url(mac: bytes, length: int) -> str:
    return base64.urlsafe_b64encode(mac)[:length].decode("ascii")


def _digits(mac: bytes, length: int) -> str:
    return str(int.from_bytes(mac, "big") % 10**length).zfill(length)[:length]


_ENCODERS: dict[str, Callable[[bytes, int], str]] = {
    "hex": _hex,
    "base32": _base32,
    "base64url": _base64url,
    "digits": _digits,
}


@dataclass(frozen=True)
class PseudonymFormat:
    """How a pseudonym is written: ``alphabet``, ``length`` characters, then ``prefix`` in front."""

    alphabet: str = DEFAULT_ALPHABET
    length: int = DEFAULT_LENGTH
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.alphabet not in ALPHABETS:
            raise PolicyError(
                f"pseudonym alphabet {self.alphabet!r} is unknown; use one of {', '.join(ALPHABETS)}"
            )
        lo, hi = ALPHABETS[self.alphabet]
        if not isinstance(self.length, int) or isinstance(self.length, bool) or not lo <= self.length <= hi:
            raise PolicyError(
                f"pseudonym length {self.length!r} for alphabet {self.alphabet!r} must be between {lo} and {hi} "
                f"(fewer than {lo} characters carry under 64 bits)"
            )
        if not isinstance(self.prefix, str) or len(self.prefix) > 32 or any(c in self.prefix for c in "\x00\r\n\t"):
            raise PolicyError("pseudonym prefix must be text of at most 32 characters without control characters")

    @property
    def encoder(self) -> Callable[[bytes, int], str]:
        return _ENCODERS[self.alphabet]

    def encode(self, mac: bytes) -> str:
        return self.prefix + _ENCODERS[self.alphabet](mac, self.length)

    @property
    def width(self) -> int:
        """Total characters of a pseudonym, prefix included."""
        return len(self.prefix) + self.length

    def to_claim(self) -> dict[str, Any]:
        return {"alphabet": self.alphabet, "length": self.length, "prefix": self.prefix}

    @classmethod
    def from_claim(cls, claim: Mapping[str, Any] | None) -> PseudonymFormat:
        if claim is None:
            return cls()
        if not isinstance(claim, Mapping) or set(claim) - {"alphabet", "length", "prefix"}:
            raise PolicyError('pseudonym format must be {"alphabet": ..., "length": N, "prefix": ""}')
        return cls(
            alphabet=claim.get("alphabet", DEFAULT_ALPHABET),
            length=claim.get("length", DEFAULT_LENGTH),
            prefix=claim.get("prefix", ""),
        )
