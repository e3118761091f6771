"""Pseudonym output formats (docs/design.md §4 step 4): encode a 32-byte MAC as text.

A format is an alphabet, a length and a prefix. Formats carrying fewer than 64 bits are refused,
so pseudonyms stay collision-resistant at any realistic table size. Whole batches are encoded at
once (:meth:`PseudonymFormat.encode_many`) with array arithmetic for the bit-slicing alphabets;
the per-value encoders below are the definition those are tested against.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
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
#: The characters each alphabet's pseudonyms are written with (exactly those the encoders produce).
SYMBOLS: dict[str, str] = {
    "hex": "0123456789abcdef",
    "base32": "abcdefghijklmnopqrstuvwxyz234567",
    "base64url": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    "digits": "0123456789",
}


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


class _BitSlicer:
    """Encodes many MACs at once for an alphabet of ``2**bits`` symbols read from the MAC's leading bits.

    Symbol ``j`` is bits ``[bits*j, bits*j + bits)`` of the MAC (RFC 4648 order, zero bits past the
    end), read from the 16-bit big-endian window starting at its first byte; symbols become ASCII by
    adding each run's offset (``runs``: first symbol and character of each contiguous run of the
    alphabet). The per-value encoders are the definition; the tests check these equal them.
    """

    def __init__(self, bits: int, runs: Sequence[tuple[int, str]]) -> None:
        self.bits = bits
        self.runs = [(first, ord(char) - first) for first, char in runs]

    def __call__(self, macs: bytes, count: int, length: int) -> list[str]:
        if count == 0:
            return []
        import numpy as np  # here: the command line reads formats before it needs numpy

        j = np.arange(length)
        start = self.bits * j // 8
        raw = np.zeros((count, int(start[-1]) + 2), dtype=np.uint8)
        used = min(32, raw.shape[1])
        raw[:, :used] = np.frombuffer(macs, dtype=np.uint8).reshape(count, 32)[:, :used]
        window = (raw[:, start].astype(np.uint16) << 8) | raw[:, start + 1]
        symbols = ((window >> (16 - self.bits - self.bits * j % 8).astype(np.uint16))
                   & ((1 << self.bits) - 1)).astype(np.int16)
        chars = np.empty((count, length + 1), dtype=np.uint8)
        ascii_ = symbols + self.runs[0][1]
        for (first, offset), (_, previous) in zip(self.runs[1:], self.runs, strict=False):
            ascii_ += (symbols >= first) * np.int16(offset - previous)
        chars[:, :length] = ascii_
        chars[:, length] = ord("\n")  # a separator no symbol uses: one split gives every pseudonym
        return chars.tobytes().decode("ascii").split("\n")[:count]


#: Batch twins of the per-value encoders; an encoder without one is applied value by value.
_SLICERS: dict[Callable[[bytes, int], str], _BitSlicer] = {
    _hex: _BitSlicer(4, [(0, "0"), (10, "a")]),
    _base32: _BitSlicer(5, [(0, "a"), (26, "2")]),
    _base64url: _BitSlicer(6, [(0, "A"), (26, "a"), (52, "0"), (62, "-"), (63, "_")]),
}


#: Per alphabet, its symbols as bytes (for checking whole batches at once).
_SYMBOL_BYTES: dict[str, bytes] = {name: symbols.encode("ascii") for name, symbols in SYMBOLS.items()}


@lru_cache(maxsize=64)
def _pattern(alphabet: str, length: int, prefix: str) -> re.Pattern[str]:
    return re.compile(f"{re.escape(prefix)}[{re.escape(SYMBOLS[alphabet])}]{{{length}}}")


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

    def encode_many(self, macs: bytes | Sequence[bytes]) -> list[str]:
        """The pseudonyms of many 32-byte MACs (a list, or all of them one after the other), in order:
        ``[self.encode(m) for m in macs]``, faster."""
        blob = macs if isinstance(macs, bytes) else b"".join(macs)
        count = len(blob) // 32
        encoder = _ENCODERS[self.alphabet]
        slicer = _SLICERS.get(encoder)
        if slicer is not None:
            encoded = slicer(blob, count, self.length)
        else:
            pieces = [blob[i : i + 32] for i in range(0, 32 * count, 32)]
            encoded = list(map(encoder, pieces, repeat(self.length)))
        return list(map(self.prefix.__add__, encoded)) if self.prefix else encoded

    @property
    def spells_leading_bits(self) -> bool:
        """Whether a pseudonym spells the MAC's leading bits (hex, base32, base64url): equal pseudonyms
        then share at least the MAC's first 64 bits, as every format carries 64 bits or more."""
        return _ENCODERS[self.alphabet] in _SLICERS

    def matches(self, value: str) -> bool:
        """Whether ``value`` is written like a pseudonym of this format: the prefix, then ``length``
        characters of the alphabet (it says nothing of whether a key made it)."""
        return isinstance(value, str) and _pattern(self.alphabet, self.length, self.prefix).fullmatch(value) is not None

    def count_mismatches(self, values: Sequence[str]) -> int:
        """How many of ``values`` (text) are not written like pseudonyms of this format (:meth:`matches`).

        The common case, all of them are, is checked on the whole batch at once, with no Python step per
        value: the values' UTF-8 joined by newlines must be rows of ``prefix + length symbols + newline``
        (no symbol and no prefix holds a newline, so rows that line up are exactly the values): every
        row's newline and prefix bytes in place (strided slices), and no byte other than those and the
        alphabet's symbols (``bytes.translate``). Only a batch that fails is checked value by value.
        """
        count = len(values)
        if count == 0:
            return 0
        prefix = self.prefix.encode("utf-8")
        stride = len(prefix) + self.length + 1
        joined = "\n".join(values).encode("utf-8", "surrogatepass") + b"\n"
        symbols = _SYMBOL_BYTES[self.alphabet]
        if (len(joined) == count * stride
                and joined[stride - 1::stride] == b"\n" * count
                and all(joined[i::stride] == bytes((byte,)) * count for i, byte in enumerate(prefix))
                and len(joined.translate(None, symbols)) == count * (1 + len(prefix.translate(None, symbols)))):
            return 0
        return sum(1 for value in values if not self.matches(value))

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
