"""The MAC primitives (docs/design.md §4 steps 3 and 5): the only code that computes with a pseudonymisation key.

A pseudonym is ``HMAC-SHA256(key, label + message)``: ``PRIMARY_LABEL + domain NUL`` for first-level
pseudonyms, ``SECONDARY_LABEL`` for second-level ones. The key is used here and nowhere else: in
:class:`Keyed` (precomputed HMAC states, the pure-Python definition), in the C engine's twin of it
(:func:`keyed`), or in Vault Transit (:class:`TransitKeyed`, when the key never leaves Vault).
Randomised projects draw their MACs from the OS instead (:func:`random_macs`). A secondary token's
key is derived from its project's key here too (:func:`derive_secondary_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pseudonymise.core import native
from pseudonymise.core.errors import TokenKindError
from pseudonymise.core.tokens import Token

if TYPE_CHECKING:
    from pseudonymise.core.transit import TransitMac

PRIMARY_LABEL = b"pseudonymise/v1\x00"
SECONDARY_LABEL = b"pseudonymise/v1/secondary\x00"
#: HKDF ``info`` prefix of a secondary key (docs/design.md §4 step 5, v1.1); the source project id follows.
SECONDARY_KEY_INFO = b"pseudonymise/v1/secondary-key\x00"


def primary_label(domain: str) -> bytes:
    """What precedes a value's canonical bytes in a first-level MAC: ``PRIMARY_LABEL + domain NUL``."""
    return PRIMARY_LABEL + domain.encode("utf-8") + b"\x00"


class Macs(Protocol):
    """MACs of whole batches of messages under one key and label, 32 bytes each, one after the other."""

    def mac_many(self, messages: Sequence[bytes]) -> bytes: ...


class Keyed:
    """HMAC-SHA256(key, label + message) with the inner/outer states computed once (RFC 2104)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, label: bytes) -> None:
        block = key.ljust(64, b"\x00") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block) + label)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def mac(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def mac_many(self, messages: Sequence[bytes]) -> bytes:
        """The MACs of ``messages``, 32 bytes each, one after the other (the method lookups hoisted
        out of the loop: this loop is where a run spends most of its time)."""
        inner_copy, outer_copy = self._inner.copy, self._outer.copy
        out: list[bytes] = []
        append = out.append
        for message in messages:
            inner = inner_copy()
            inner.update(message)
            outer = outer_copy()
            outer.update(inner.digest())
            append(outer.digest())
        return b"".join(out)


def keyed(key: bytes, label: bytes) -> Keyed | native.Keyed:
    """:class:`Keyed`, or its C twin with the same ``mac``/``mac_many`` when the C engine is there."""
    return native.keyed(key, label) if native.available() else Keyed(key, label)


class TransitKeyed:
    """The same messages as :class:`Keyed`, HMAC'd by Vault Transit in whole batches."""

    def __init__(self, transit: TransitMac, label: bytes) -> None:
        self._transit, self._label = transit, label

    def mac_many(self, messages: Sequence[bytes]) -> bytes:
        label = self._label
        return b"".join(self._transit.macs([label + m for m in messages]))


def check_custody(token: Token, transit: TransitMac | None) -> None:
    """Refuse a token whose key is in Vault Transit without a Transit client, or the other way round."""
    if token.key_ref is not None and transit is None:
        raise TokenKindError(
            f"token {token.jti}'s key is held in Vault Transit ({token.key_ref['mount']}/{token.key_ref['name']}); "
            "give the connection a transit_vault_conn_id so HMACs can be computed there"
        )
    if token.key_ref is None and transit is not None:
        raise TokenKindError(f"token {token.jti} carries its key; it does not use Vault Transit")


def token_macs(token: Token, transit: TransitMac | None, label: bytes) -> Keyed | native.Keyed | TransitKeyed:
    """The MACs of ``token``'s key under ``label``: in Vault Transit when it holds the key, else here
    (in C when the C engine is there). Call :func:`check_custody` first."""
    if transit is not None:
        return TransitKeyed(transit, label)
    return keyed(token.key, label)  # type: ignore[arg-type]


def random_macs(count: int) -> bytes:
    """``count`` MACs of 32 bytes from the OS CSPRNG (randomised treatment: a fresh one per occurrence)."""
    return os.urandom(32 * count)


def pseudonym_mac(key: bytes, domain: str, canonical: bytes) -> bytes:
    """The first-level MAC of one canonical value, computed from scratch (used to check escrow rows)."""
    return hmac.new(key, primary_label(domain) + canonical, hashlib.sha256).digest()


def derive_secondary_key(project_key: bytes, source_project: str) -> bytes:
    """The key a secondary token carries (docs/design.md §4 step 5, v1.1): ``HKDF-SHA256(project_key, salt=b"",
    info=b"pseudonymise/v1/secondary-key\\x00" + source_project, 32 bytes)``.

    ``project_key`` is the key of the project the token is issued for (the vendor's), never the
    source project's. One key per (project, source project, key version): it cannot make that
    project's first-level pseudonyms, and two source projects get unrelated secondary keys.
    """
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"",
                info=SECONDARY_KEY_INFO + source_project.encode("utf-8"))
    return hkdf.derive(project_key)


__all__ = ["PRIMARY_LABEL", "SECONDARY_KEY_INFO", "SECONDARY_LABEL", "Keyed", "Macs", "TransitKeyed", "check_custody",
           "derive_secondary_key", "keyed", "primary_label", "pseudonym_mac", "random_macs", "token_macs"]
