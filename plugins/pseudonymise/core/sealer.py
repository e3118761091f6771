"""Sealing escrow values (docs/design.md §5): what to seal, each batch's data key and its HPKE seal, nonces, associated data.

The pipeline holds only the escrow *public* key, so it can seal and never open. Per batch a fresh
data key (``dek``) is sealed with HPKE (RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
AES-256-GCM) to the project's escrow public key (:class:`BatchSealer`); per value, the type tag and
canonical bytes are encrypted with AES-256-GCM under ``dek`` with a counter nonce and ``project NUL
pseudonym NUL domain NUL key_version NUL retention_until`` as associated data, so a ciphertext moved
to another pseudonym, domain, key version or retention end fails to open (:class:`BatchOpener`).

The values to seal come from the pseudonym engine column-wise (:class:`EscrowItems`) or, from the
C engine's COPY path, as blocks of bytes (:class:`EscrowBlock`); a block is sealed by the C engine
(OpenSSL's AES-256-GCM) into the same rows the Python path makes, without an object per value.
Storing, revealing and purging escrow is ``escrow.py``'s job.
"""

from __future__ import annotations

import hashlib
import struct
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import overload

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pseudonymise.core import native
from pseudonymise.core.copytext import _pg_text, build_rows, encode_column
from pseudonymise.core.errors import EscrowError, EscrowIntegrityError, TokenKindError
from pseudonymise.core.instants import utc_seconds
from pseudonymise.core.tokens import Token

HPKE_INFO = b"pseudonymise/v1/escrow"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
#: ``ad_version`` of batches written from v1.1 on; NULL marks a v1 batch.
AD_VERSION = 2
#: The escrow rows the sealer writes in COPY text, field by field.
ROW_COLUMNS = ("project", "pseudonym", "batch_id", "nonce", "ciphertext", "retention_until")
#: PostgreSQL's binary COPY format: the signature, no flags, no header extension; and the end of the data.
BINARY_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
BINARY_COPY_TRAILER = struct.pack(">h", -1)
#: ``timestamptz`` counts microseconds from this instant.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


# --- the data key -----------------------------------------------------------------------------
def seal_key(dek: bytes, public_key: X25519PublicKey) -> bytes:
    """HPKE-seal a data key to the escrow public key (``enc || ciphertext``)."""
    return SUITE.encrypt(dek, public_key, info=HPKE_INFO)


def open_key(sealed: bytes, private_key: X25519PrivateKey) -> bytes:
    try:
        return SUITE.decrypt(sealed, private_key, info=HPKE_INFO)
    except Exception as exc:
        raise EscrowIntegrityError(
            "an escrow batch key does not open with this reverse token: it was sealed for another "
            "project's escrow key, or it was altered"
        ) from exc


# --- nonces and associated data ---------------------------------------------------------------
class _CounterNonces:
    """Nonces 0 … count-1 (96-bit big-endian counters) and their COPY text; every batch has its own key,
    so every batch uses the same ones, computed once per process."""

    def __init__(self) -> None:
        self._raw: list[bytes] = []
        self._text: list[str] = []

    @staticmethod
    def check(count: int) -> None:
        """Refuse a batch of more values than its 64-bit counters can number."""
        if count >= 2**64:
            raise EscrowError("an escrow batch is limited to 2**64 values; use a smaller batch size")

    def __call__(self, count: int) -> tuple[list[bytes], list[str]]:
        self.check(count)
        if len(self._raw) < count:
            size = max(count, 2 * len(self._raw), 1024)
            raw = list(map(int.to_bytes, range(size), repeat(12), repeat("big")))
            self._raw, self._text = raw, list(map("\\\\x".__add__, map(bytes.hex, raw)))
        return self._raw[:count], self._text[:count]


counter_nonces = _CounterNonces()


def associated_data(project: str, pseudonym: str, domain: str | None = None, key_version: int | None = None,
                    retention_until: datetime | None = None) -> bytes:
    """The AES-GCM associated data of one escrow value: v1 (``project NUL pseudonym``) when ``domain`` is
    None, else v1.1 (``… NUL domain NUL key_version NUL retention_until``)."""
    head = project.encode("utf-8") + b"\x00" + pseudonym.encode("utf-8")
    if domain is None:
        return head
    return head + ad_suffix(domain, key_version, retention_until)


def ad_suffix(domain: str, key_version: int | None, retention_until: datetime | None) -> bytes:
    """What v1.1 associated data adds after the pseudonym: ``NUL domain NUL key_version NUL retention_until``."""
    if key_version is None or retention_until is None:
        raise ValueError("v1.1 associated data needs the key version and the retention end")
    return (b"\x00" + domain.encode("utf-8") + b"\x00" + str(int(key_version)).encode("ascii") + b"\x00"
            + utc_seconds(retention_until).encode("ascii"))


def row_hash(pseudonym: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    """One escrow row's hash in its batch's digest: ``SHA-256(len(p) || p || nonce || len(c) || c)`` (p the UTF-8
    pseudonym, c the ciphertext with its tag, lengths 4-byte big-endian; ``escrow.batch_digest`` folds them)."""
    return hashlib.sha256(len(pseudonym).to_bytes(4, "big") + pseudonym + nonce + len(ciphertext).to_bytes(4, "big")
                          + ciphertext).digest()


# --- what to seal -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EscrowItem:
    """What escrow must seal for one pseudonym: the value's type tag and canonical bytes, and the column's
    pseudonymisation domain (bound into the escrow's associated data, and needed to recompute the pseudonym)."""

    pseudonym: str
    type_tag: str
    canonical: bytes = field(repr=False)
    domain: str = ""


class _Items(Sequence[EscrowItem]):
    """A sequence of :class:`EscrowItem` made on demand from column-wise storage (``_item``)."""

    __slots__ = ()

    @abstractmethod
    def _item(self, index: int) -> EscrowItem:
        """Item ``index`` (already checked to be in range)."""

    @overload
    def __getitem__(self, index: int) -> EscrowItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[EscrowItem]: ...

    def __getitem__(self, index: int | slice) -> EscrowItem | list[EscrowItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._item(range(len(self))[index])


class EscrowItems(_Items):
    """The :class:`EscrowItem` of a batch held column by column (no object per value until one is asked for)."""

    __slots__ = ("canonicals", "domains", "pseudonyms", "type_tags")

    def __init__(self) -> None:
        self.pseudonyms: list[str] = []
        self.type_tags: list[str] = []
        self.canonicals: list[bytes] = []
        self.domains: list[str] = []

    def add(self, pseudonyms: Sequence[str], type_tags: Sequence[str], canonicals: Sequence[bytes],
            domain: str = "") -> None:
        self.pseudonyms.extend(pseudonyms)
        self.type_tags.extend(type_tags)
        self.canonicals.extend(canonicals)
        self.domains.extend([domain] * len(pseudonyms))

    def __len__(self) -> int:
        return len(self.pseudonyms)

    def _item(self, index: int) -> EscrowItem:
        return EscrowItem(self.pseudonyms[index], self.type_tags[index], self.canonicals[index], self.domains[index])

    def __iter__(self) -> Iterator[EscrowItem]:
        return map(EscrowItem, self.pseudonyms, self.type_tags, self.canonicals, self.domains)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EscrowItems({len(self)} items)"


class EscrowBlock(_Items):
    """What escrow must seal for a block of COPY text rows, without an object per value: the pseudonyms
    (UTF-8, ``width`` bytes each, one after the other), the canonical bytes one after the other with
    their ``ends`` (``ends[i]:ends[i+1]`` is value ``i``; ``ends[0] == 0``), and one type tag and one
    pseudonymisation domain for all.

    ``repeats`` says whether the block may hold a value that an earlier block of the same run already
    handed to escrow: ``False`` only when the engine knows every value listed before (its exact set of
    sealed MACs had not overflowed); the escrow writer then need not look for them in escrow."""

    __slots__ = ("canonicals", "domain", "ends", "pseudonyms", "repeats", "type_tag", "width")

    def __init__(self, pseudonyms: bytes, width: int, canonicals: bytes, ends: np.ndarray, type_tag: str = "str",
                 domain: str = "", *, repeats: bool = True) -> None:
        self.pseudonyms, self.width, self.canonicals, self.type_tag = pseudonyms, width, canonicals, type_tag
        self.domain, self.repeats = domain, repeats
        self.ends = np.asarray(ends, dtype=np.uint64)
        if len(self.ends) != len(pseudonyms) // max(width, 1) + 1 or len(pseudonyms) % max(width, 1):
            raise ValueError("an escrow block needs n pseudonyms of `width` bytes and n + 1 ends")

    @classmethod
    def concat(cls, blocks: Sequence[EscrowBlock]) -> EscrowBlock:
        """One block of blocks that share their width, type tag and domain."""
        first = blocks[0]
        if len(blocks) == 1:
            return first
        if any((b.width, b.type_tag, b.domain) != (first.width, first.type_tag, first.domain) for b in blocks):
            raise ValueError("escrow blocks of different widths, types or domains cannot be concatenated")
        offsets = np.cumsum([0] + [len(b.canonicals) for b in blocks[:-1]], dtype=np.uint64)
        ends = np.concatenate([blocks[0].ends[:1]] + [b.ends[1:] + o for b, o in zip(blocks, offsets, strict=True)])
        return cls(b"".join(b.pseudonyms for b in blocks), first.width, b"".join(b.canonicals for b in blocks),
                   ends, first.type_tag, first.domain, repeats=any(b.repeats for b in blocks))

    def take(self, positions: Sequence[int] | np.ndarray) -> EscrowBlock:
        """The values at ``positions`` (in that order)."""
        positions = np.asarray(positions, dtype=np.intp)
        starts = self.ends[:-1][positions].astype(np.int64)
        lengths = self.ends[1:][positions].astype(np.int64) - starts
        ends = np.zeros(len(positions) + 1, dtype=np.uint64)
        np.cumsum(lengths, out=ends[1:])
        # every byte taken, at once: byte j of value k comes from starts[k] + j
        gather = np.repeat(starts - ends[:-1].astype(np.int64), lengths) + np.arange(int(ends[-1]), dtype=np.int64)
        canonicals = np.frombuffer(self.canonicals, dtype=np.uint8)[gather].tobytes()
        names = (np.frombuffer(self.pseudonyms, dtype=f"S{self.width}")[positions].tobytes()
                 if self.width and len(positions) else b"")
        return EscrowBlock(names, self.width, canonicals, ends, self.type_tag, self.domain, repeats=self.repeats)

    def names(self) -> np.ndarray:
        """The pseudonyms as a NumPy array of ``width``-byte strings (no copy)."""
        return np.frombuffer(self.pseudonyms, dtype=f"S{self.width}")

    def first_occurrences(self) -> EscrowBlock:
        """The block without repeated pseudonyms: the first occurrence of each, in order."""
        _, first = np.unique(self.names(), return_index=True)
        return self.take(np.sort(first)) if len(first) < len(self) else self

    def in_pseudonym_order(self, *, distinct: bool) -> EscrowBlock:
        """The block sorted by pseudonym (byte order, which is PostgreSQL's ``C`` collation of UTF-8), with only the
        first occurrence of each pseudonym when ``distinct``: rows inserted in key order cost the primary key's
        index a fraction of rows in random order."""
        names = self.names()
        if distinct:
            _, order = np.unique(names, return_index=True)
        else:
            order = np.argsort(names, kind="stable")
        return self.take(order)

    def __len__(self) -> int:
        return len(self.ends) - 1

    def _item(self, index: int) -> EscrowItem:
        pseudonym = self.pseudonyms[index * self.width:(index + 1) * self.width].decode("utf-8")
        return EscrowItem(pseudonym, self.type_tag, self.canonicals[int(self.ends[index]):int(self.ends[index + 1])],
                          self.domain)

    def items(self) -> EscrowItems:
        """The same values as :class:`EscrowItems` (for a store other than PostgreSQL)."""
        out = EscrowItems()
        bounds = self.ends.tolist()
        out.add([self.pseudonyms[i:i + self.width].decode("utf-8") for i in range(0, len(self.pseudonyms), self.width)],
                [self.type_tag] * len(self),
                list(map(self.canonicals.__getitem__, map(slice, bounds[:-1], bounds[1:]))), self.domain)
        return out

    def __repr__(self) -> str:
        return f"EscrowBlock({len(self)} items)"


class EscrowBlocks:
    """The escrow blocks of one batch, one per pseudonymised column (each with its own domain).

    ``len`` counts values, as for the other escrow item sequences."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: Sequence[EscrowBlock]) -> None:
        self.blocks = [b for b in blocks if len(b)]

    def __iter__(self) -> Iterator[EscrowBlock]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return sum(map(len, self.blocks))

    def __repr__(self) -> str:
        return f"EscrowBlocks({len(self.blocks)} blocks, {len(self)} items)"


# --- sealing and opening ----------------------------------------------------------------------
class BatchSealer:
    """One escrow batch of one pseudonymisation domain: a fresh data key, sealed to the project's escrow
    public key (:attr:`sealed_dek`, stored with the batch), and the batch's values sealed under it.

    :meth:`seal` and :meth:`copy_rows` seal with the ``cryptography`` package; :meth:`copy_block_rows`
    gives the same rows through the C engine when it is there. A sealer seals one list of values: nonces
    count from 0 in every batch, which is safe only because every batch has its own key. After either,
    :attr:`row_hashes` holds each row's hash in the batch digest (:func:`row_hash`, 32 bytes per row, in
    nonce order), so the writer knows the digest of what it staged without reading escrow back.
    """

    def __init__(self, token: Token, domain: str) -> None:
        if token.kind != "pseudonymisation" or token.escrow_public_key is None:
            raise TokenKindError(
                f"token {token.jti} carries no escrow public key; escrow needs a pseudonymisation token "
                "of a reversible project"
            )
        self.domain = domain
        self._project = token.project
        self._retention = token.retention_until
        self._ad_prefix = associated_data(token.project, "")
        self._ad_suffix = ad_suffix(domain, token.key_version, token.retention_until)
        dek = AESGCM.generate_key(bit_length=256)
        self._aead: AESGCM | None = AESGCM(dek)
        self._dek: bytes | None = dek
        self.sealed_dek = seal_key(dek, token.escrow_public_key)
        self.row_hashes = b""

    def _take_key(self) -> tuple[AESGCM, bytes]:
        if self._aead is None or self._dek is None:
            raise EscrowError("an escrow batch key seals one list of values; start a new batch for more")
        aead, dek = self._aead, self._dek
        self._aead = self._dek = None
        return aead, dek

    def _seal(self, pseudonyms: Sequence[str], tags: Sequence[str],
              canonicals: Sequence[bytes]) -> tuple[list[bytes], list[str], list[bytes]]:
        nonces, nonces_text = counter_nonces(len(pseudonyms))
        aead, _dek = self._take_key()
        if len(set(tags)) == 1:
            plaintexts = list(map((tags[0].encode("ascii") + b"\x00").__add__, canonicals))
        else:
            plaintexts = [t.encode("ascii") + b"\x00" + c for t, c in zip(tags, canonicals, strict=True)]
        prefix, suffix = self._ad_prefix, self._ad_suffix
        ads = [prefix + p.encode("utf-8") + suffix for p in pseudonyms]
        return nonces, nonces_text, list(map(aead.encrypt, nonces, plaintexts, ads))

    def seal(self, pseudonyms: Sequence[str], tags: Sequence[str],
             canonicals: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
        """``(nonces, ciphertexts)`` of the values (type tag NUL canonical bytes), in order."""
        nonces, _text, ciphertexts = self._seal(pseudonyms, tags, canonicals)
        return nonces, ciphertexts

    def copy_rows(self, batch_id: str, pseudonyms: Sequence[str], tags: Sequence[str],
                  canonicals: Sequence[bytes]) -> bytes:
        """The values sealed as escrow rows (:data:`ROW_COLUMNS`) in PostgreSQL's COPY text."""
        count = len(pseudonyms)
        nonces, nonces_text, ciphertexts = self._seal(pseudonyms, tags, canonicals)
        self.row_hashes = b"".join(map(row_hash, (p.encode("utf-8") for p in pseudonyms), nonces, ciphertexts))
        columns = [encode_column([self._project]) * count, encode_column(pseudonyms), [batch_id] * count, nonces_text,
                   list(map("\\\\x".__add__, map(bytes.hex, ciphertexts))),
                   [self._retention.astimezone(UTC).isoformat()] * count]
        return build_rows(columns)

    def copy_block_rows(self, batch_id: str, block: EscrowBlock) -> bytes:
        """:meth:`copy_rows` of a block: sealed by the C engine when it is there and the pseudonyms need
        no COPY escaping, else in Python; the same rows either way."""
        if block.domain != self.domain:
            raise ValueError("an escrow block is sealed in the batch of its own domain")
        if not native.available() or b"\\" in block.pseudonyms:
            items = block.items()
            return self.copy_rows(batch_id, items.pseudonyms, items.type_tags, items.canonicals)
        retention = self._retention.astimezone(UTC).isoformat()
        return self._native_rows(block, (_pg_text(self._project) + "\t").encode("utf-8"),
                                 f"\t{batch_id}\t".encode("ascii"), f"\t{retention}\n".encode("ascii"), binary=False)

    def _native_rows(self, block: EscrowBlock, start: bytes, middle: bytes, end: bytes, *, binary: bool) -> bytes:
        """The block sealed by the C engine into rows framed by ``start``, ``middle`` and ``end``
        (:func:`native.seal_rows`), keeping the rows' hashes."""
        counter_nonces.check(len(block))  # the same limit as the Python path
        _aead, dek = self._take_key()
        hashes = bytearray(32 * len(block))
        rows = native.seal_rows(
            dek, ad_prefix=self._ad_prefix, plain_prefix=block.type_tag.encode("ascii") + b"\x00",
            pseudonyms=block.pseudonyms, width=block.width, canonicals=block.canonicals, ends=block.ends.tobytes(),
            row_start=start, row_middle=middle, row_end=end, ad_suffix=self._ad_suffix, row_hashes=hashes,
            binary=binary)
        self.row_hashes = bytes(hashes)
        return rows

    def binary_block_rows(self, batch_id: str, block: EscrowBlock) -> bytes:
        """The block's values sealed as escrow rows (:data:`ROW_COLUMNS`) in PostgreSQL's binary COPY format (the
        rows alone: the data is :data:`BINARY_COPY_HEADER`, the rows, :data:`BINARY_COPY_TRAILER`): no text for
        PostgreSQL to parse, the retention end as the microseconds ``timestamptz`` is. The C engine seals when
        it is there, else ``cryptography``: the same bytes either way, and the same nonces, ciphertexts and :attr:`row_hashes` as
        :meth:`copy_block_rows`."""
        if block.domain != self.domain:
            raise ValueError("an escrow block is sealed in the batch of its own domain")
        project = self._project.encode("utf-8")
        retention = (self._retention - _PG_EPOCH) // timedelta(microseconds=1)
        start = struct.pack(">hi", len(ROW_COLUMNS), len(project)) + project + struct.pack(">i", block.width)
        middle = struct.pack(">i", len(batch_id)) + batch_id.encode("ascii") + struct.pack(">i", 12)
        end = struct.pack(">iq", 8, retention)
        if native.available():
            return self._native_rows(block, start, middle, end, binary=True)
        items = block.items()
        nonces, _text, ciphertexts = self._seal(items.pseudonyms, items.type_tags, items.canonicals)
        names = [block.pseudonyms[i:i + block.width] for i in range(0, len(block.pseudonyms), block.width)]
        self.row_hashes = b"".join(map(row_hash, names, nonces, ciphertexts))
        return b"".join(start + name + middle + nonce + struct.pack(">i", len(sealed)) + sealed + end
                        for name, nonce, sealed in zip(names, nonces, ciphertexts, strict=True))


class BatchOpener:
    """Opens the values of one escrow batch: its data key opened with a reverse token's escrow private key."""

    def __init__(self, sealed_dek: bytes, private_key: X25519PrivateKey) -> None:
        self._aead = AESGCM(open_key(sealed_dek, private_key))

    def open(self, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes | None:
        """The plaintext (type tag NUL canonical bytes), or ``None`` when the value fails authentication."""
        try:
            return self._aead.decrypt(nonce, ciphertext, associated)
        except InvalidTag:
            return None


__all__ = ["AD_VERSION", "HPKE_INFO", "ROW_COLUMNS", "SUITE", "BatchOpener", "BatchSealer", "EscrowBlock",
           "EscrowBlocks", "EscrowItem", "EscrowItems", "ad_suffix", "associated_data", "counter_nonces",
           "open_key", "row_hash", "seal_key"]
