"""Sealing escrow (docs/design.md §5): the HPKE suite, counter nonces, associated data, AES-256-GCM in Python and in the
C engine, each checked against the GCM specification's vectors or the ``cryptography`` package's AES-GCM, and
the escrow item containers."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pseudonymise.core import native
from pseudonymise.core.errors import EscrowError, EscrowIntegrityError, TokenKindError
from pseudonymise.core.sealer import (
    AD_VERSION,
    BINARY_COPY_HEADER,
    BINARY_COPY_TRAILER,
    HPKE_INFO,
    SUITE,
    BatchOpener,
    BatchSealer,
    EscrowBlock,
    EscrowItems,
    ad_suffix,
    associated_data,
    counter_nonces,
    open_key,
    seal_key,
)
from pseudonymise.core.tokens import Token

from tests.core.conftest import Mint

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
needs_native = pytest.mark.skipif(not native.available(),
                                  reason="PSEUDONYMISE_PURE_PYTHON=1: the C engine is switched off")


# --- the data key: HPKE (RFC 9180) ----------------------------------------------------------------
def test_escrow_seal_open_round_trip() -> None:
    private = X25519PrivateKey.generate()
    dek = bytes(range(32))
    sealed = seal_key(dek, private.public_key())
    assert len(sealed) == 32 + 32 + 16  # enc (X25519 public key) || AES-256-GCM(dek) with tag
    assert open_key(sealed, private) == dek
    # the escrow suite is the one docs/design.md §5 fixes, with its info string
    assert SUITE.decrypt(sealed, private, info=HPKE_INFO) == dek
    assert seal_key(dek, private.public_key()) != sealed  # a fresh ephemeral key every time


def test_escrow_sealed_key_interoperates_with_the_raw_binding() -> None:
    private = X25519PrivateKey.generate()
    dek = b"\x07" * 32
    sealed = seal_key(dek, private.public_key())
    opened = rust_openssl.hpke._decrypt_with_aad(SUITE, sealed, private, info=b"pseudonymise/v1/escrow", aad=b"")
    assert opened == dek


def test_escrow_open_with_another_key_or_altered_seal_fails() -> None:
    private = X25519PrivateKey.generate()
    sealed = seal_key(b"\x01" * 32, private.public_key())
    with pytest.raises(EscrowIntegrityError):
        open_key(sealed, X25519PrivateKey.generate())
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(EscrowIntegrityError):
        open_key(altered, private)


# --- nonces and associated data -------------------------------------------------------------------
def test_counter_nonces_are_96_bit_big_endian_counters() -> None:
    raw, text = counter_nonces(3000)
    assert raw == [i.to_bytes(12, "big") for i in range(3000)]
    assert text == ["\\\\x" + i.to_bytes(12, "big").hex() for i in range(3000)]
    assert counter_nonces(2) == (raw[:2], text[:2]) and counter_nonces(0) == ([], [])
    with pytest.raises(EscrowError, match="2\\*\\*64"):
        counter_nonces(2**64)


def test_associated_data_layouts() -> None:
    end = dt.datetime(2027, 1, 2, 3, 4, 5, 678, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert associated_data("proj", "P-é") == b"proj\x00P-\xc3\xa9"  # v1
    assert associated_data("proj", "P-é", "visits", 3, end) == b"proj\x00P-\xc3\xa9\x00visits\x003\x002027-01-02T01:04:05Z"
    assert ad_suffix("", 1, end) == b"\x00\x001\x002027-01-02T01:04:05Z"
    with pytest.raises(ValueError, match="key version"):
        associated_data("proj", "p", "d", None, end)
    assert AD_VERSION == 2


# --- AES-256-GCM: the GCM specification's vectors --------------------------------------------------
def _gcm_cases() -> list[dict[str, bytes]]:
    cases, current = [], {}
    for line in (VECTORS / "gcm-spec-aes256-zero-iv.txt").read_text().splitlines():
        name, sep, value = line.partition(" =")
        if sep and name in ("K", "P", "IV", "C", "T"):
            current[name] = bytes.fromhex(value.strip())
            if name == "T":
                cases.append(current)
                current = {}
    return cases


def test_gcm_vector_file_holds_the_two_cases() -> None:
    cases = _gcm_cases()
    assert len(cases) == 2 and cases[1]["T"].hex() == "d0d1c8a799996bf0265b98b5d48ab919"
    for case in cases:  # and the reference implementation agrees
        assert AESGCM(case["K"]).encrypt(case["IV"], case["P"], None) == case["C"] + case["T"]


@needs_native
@pytest.mark.parametrize("case", _gcm_cases(), ids=["case13", "case14"])
def test_seal_rows_gives_the_gcm_vectors(case: dict[str, bytes]) -> None:
    # value 0 of a batch has the all-zero nonce; an empty prefix, pseudonym and label leave P and no AAD
    rows = native.seal_rows(case["K"], ad_prefix=b"", plain_prefix=b"", pseudonyms=b"", width=0, canonicals=case["P"],
                            ends=np.array([0, len(case["P"])], np.uint64).tobytes(), row_start=b"", row_middle=b"\t",
                            row_end=b"\n")
    nonce, sealed = rows.decode().rstrip("\n").split("\t")[1:]
    assert nonce == "\\\\x" + case["IV"].hex() and sealed == "\\\\x" + (case["C"] + case["T"]).hex()


@needs_native
def test_seal_rows_equals_aesgcm_of_the_escrow_layout() -> None:
    rng = random.Random(11)
    dek, n, width = os.urandom(32), 3000, 28
    names = [f"P-{rng.randbytes(13).hex()}"[:width].encode() for _ in range(n)]
    values = [rng.randbytes(rng.randrange(0, 300)) for _ in range(n)]
    ends = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.uint64)
    rows = native.seal_rows(dek, ad_prefix=b"proj\x00", plain_prefix=b"str\x00", pseudonyms=b"".join(names),
                            width=width, canonicals=b"".join(values), ends=ends.tobytes(), row_start=b"proj\t",
                            row_middle=b"\tB\t", row_end=b"\tR\n")
    aead = AESGCM(dek)
    lines = rows.decode().split("\n")
    assert lines[-1] == "" and len(lines) == n + 1
    for i, line in enumerate(lines[:-1]):
        project, name, batch, nonce, sealed, retention = line.split("\t")
        assert (project, name, batch, retention) == ("proj", names[i].decode(), "B", "R")
        assert nonce == "\\\\x" + i.to_bytes(12, "big").hex()
        assert bytes.fromhex(sealed[3:]) == aead.encrypt(i.to_bytes(12, "big"), b"str\x00" + values[i],
                                                          b"proj\x00" + names[i])
    # what the C engine refuses (ValueError there) is the plugin's EscrowError here
    with pytest.raises(EscrowError, match="32-byte key") as info:
        native.seal_rows(dek[:16], ad_prefix=b"", plain_prefix=b"", pseudonyms=b"ab", width=2, canonicals=b"",
                         ends=np.zeros(2, np.uint64).tobytes(), row_start=b"", row_middle=b"", row_end=b"")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(EscrowError, match="ends") as info:  # the ends must cover the values exactly
        native.seal_rows(dek, ad_prefix=b"", plain_prefix=b"", pseudonyms=b"ab", width=2, canonicals=b"xyz",
                         ends=np.array([0, 2], np.uint64).tobytes(), row_start=b"", row_middle=b"", row_end=b"")
    assert isinstance(info.value.__cause__, ValueError)


def _digest_hash(pseudonym: bytes, nonce: bytes, sealed: bytes) -> bytes:
    """One row's hash in its batch digest, as docs/design-notes.md defines it (written here with hashlib alone)."""
    return hashlib.sha256(struct.pack(">I", len(pseudonym)) + pseudonym + nonce + struct.pack(">I", len(sealed))
                          + sealed).digest()


def _hashes_of_rows(rows: bytes) -> bytes:
    """The digest hashes of COPY text escrow rows, from the rows' own fields."""
    out = b""
    for line in rows.decode("utf-8").split("\n")[:-1]:
        _project, name, _batch, nonce, sealed, _retention = line.split("\t")
        name = name.replace("\\\\", "\\")  # COPY text escapes a backslash; the digest hashes the pseudonym
        out += _digest_hash(name.encode("utf-8"), bytes.fromhex(nonce[3:]), bytes.fromhex(sealed[3:]))
    return out


@needs_native
def test_seal_rows_gives_each_rows_digest_hash() -> None:
    """The C engine hashes each row it seals into ``row_hashes`` (what the writer's batch digests are made of)."""
    rng = random.Random(17)
    dek, n, width = os.urandom(32), 700, 26
    names = [rng.randbytes(13).hex()[:width].encode() for _ in range(n)]
    values = [rng.randbytes(rng.randrange(0, 200)) for _ in range(n)]
    ends = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.uint64)
    hashes = bytearray(32 * n)
    rows = native.seal_rows(dek, ad_prefix=b"proj\x00", plain_prefix=b"str\x00", pseudonyms=b"".join(names),
                            width=width, canonicals=b"".join(values), ends=ends.tobytes(), row_start=b"proj\t",
                            row_middle=b"\tB\t", row_end=b"\tR\n", row_hashes=hashes)
    assert bytes(hashes) == _hashes_of_rows(rows) and len(set(bytes(hashes[i:i + 32]) for i in range(0, 32 * n, 32))) == n
    with pytest.raises(EscrowError, match="32 bytes per value"):
        native.seal_rows(dek, ad_prefix=b"", plain_prefix=b"", pseudonyms=b"ab", width=2, canonicals=b"",
                         ends=np.zeros(2, np.uint64).tobytes(), row_start=b"", row_middle=b"", row_end=b"",
                         row_hashes=bytearray(31))


@pytest.mark.parametrize("prefix", ["P-", "P\\"], ids=["plain", "escaped-by-python"])
def test_a_sealer_knows_the_digest_hash_of_every_row_it_sealed(mint: Mint, prefix: str) -> None:
    """``row_hashes`` after ``copy_rows`` (Python) and ``copy_block_rows`` (C when it is there) is each row's hash,
    computed here from the rows themselves (COPY escaping undone)."""
    token = mint("research-a")
    rng = random.Random(23)
    names = [f"{prefix}{rng.randbytes(12).hex()}" for _ in range(300)]
    values = [rng.randbytes(rng.randrange(0, 60)) for _ in range(300)]
    python, block = BatchSealer(token, "d"), BatchSealer(token, "d")
    for sealer, rows in ((python, python.copy_rows("B-1", names, ["str"] * 300, values)),
                         (block, block.copy_block_rows("B-1", _block(names, values, "d")))):
        assert sealer.row_hashes == _hashes_of_rows(rows)


# --- a batch: the Python path and the C engine give the same rows ----------------------------------
def _open_rows(rows: bytes, dek: bytes, token: Token, domain: str, plaintexts: list[bytes], names: list[str]) -> None:
    """Every row is the escrow layout of value ``i``, its ciphertext AES-256-GCM under ``dek`` as docs/design.md §5 says."""
    aead = AESGCM(dek)
    lines = rows.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(names) + 1
    retention = token.retention_until.astimezone(dt.UTC).isoformat()
    for i, line in enumerate(lines[:-1]):
        project, name, batch, nonce, sealed, end = line.split("\t")
        assert (project, batch, end) == (token.project, "B-1", retention)
        assert name.replace("\\\\", "\\") == names[i]
        assert nonce == "\\\\x" + i.to_bytes(12, "big").hex()
        ad = associated_data(token.project, names[i], domain, token.key_version, token.retention_until)
        assert bytes.fromhex(sealed[3:]) == aead.encrypt(i.to_bytes(12, "big"), plaintexts[i], ad)


def _block(names: list[str], values: list[bytes], domain: str) -> EscrowBlock:
    ends = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.uint64)
    return EscrowBlock("".join(names).encode(), len(names[0].encode()), b"".join(values), ends, domain=domain)


@pytest.mark.parametrize("prefix", ["P-", "P\\"], ids=["plain", "escaped-by-python"])
def test_a_batch_seals_the_same_rows_in_python_and_in_c(mint: Mint, prefix: str) -> None:
    """``copy_rows`` (Python) and ``copy_block_rows`` (the C engine when it is there and the pseudonyms need no
    COPY escaping) both give the escrow layout, each value opening to ``tag NUL canonical`` under its own
    associated data; the batch key opens with the project's reverse token."""
    token, private = mint("research-a"), mint("research-a", "reverse").escrow_private_key
    rng = random.Random(5)
    names = [f"{prefix}{rng.randbytes(12).hex()}" for _ in range(500)]
    values = [rng.randbytes(rng.randrange(0, 80)) for _ in range(500)]
    python, c = BatchSealer(token, "visits"), BatchSealer(token, "visits")
    by_python = python.copy_rows("B-1", names, ["str"] * 500, values)
    by_block = c.copy_block_rows("B-1", _block(names, values, "visits"))
    for sealer, rows in ((python, by_python), (c, by_block)):
        _open_rows(rows, open_key(sealer.sealed_dek, private), token, "visits", [b"str\x00" + v for v in values], names)
    mixed = BatchSealer(token, "")
    nonces, ciphertexts = mixed.seal(names[:3], ["str", "bytes", "int"], [b"a", b"\x00", b"42"])
    assert nonces == [i.to_bytes(12, "big") for i in range(3)]
    opener = BatchOpener(mixed.sealed_dek, private)
    opened = [opener.open(n, ct, associated_data(token.project, p, "", token.key_version, token.retention_until))
              for n, ct, p in zip(nonces, ciphertexts, names[:3], strict=True)]
    assert opened == [b"str\x00a", b"bytes\x00\x00", b"int\x0042"]


def _open_binary_rows(rows: bytes, dek: bytes, token: Token, domain: str, plaintexts: list[bytes], names: list[str],
                      row_hashes: bytes) -> None:
    """Read PostgreSQL's binary COPY format as its documentation describes it (signature, flags, header extension,
    then per row a 16-bit field count and each field as a 32-bit length and its bytes, then -1), and check each
    row as :func:`_open_rows` does, the retention end as microseconds since 2000-01-01 UTC, and the row hashes."""
    aead = AESGCM(dek)
    assert rows[:11] == b"PGCOPY\n\xff\r\n\x00" and struct.unpack(">ii", rows[11:19]) == (0, 0)
    at, fields_of = 19, []
    while True:
        (count,) = struct.unpack(">h", rows[at:at + 2])
        at += 2
        if count == -1:
            break
        assert count == 6
        fields = []
        for _ in range(count):
            (length,) = struct.unpack(">i", rows[at:at + 4])
            fields.append(rows[at + 4:at + 4 + length])
            at += 4 + length
        fields_of.append(fields)
    assert at == len(rows) and len(fields_of) == len(names)
    micros = (token.retention_until - dt.datetime(2000, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    for i, (project, name, batch, nonce, sealed, end) in enumerate(fields_of):
        assert (project.decode(), batch, end) == (token.project, b"B-1", struct.pack(">q", micros))
        assert (name.decode(), nonce) == (names[i], i.to_bytes(12, "big"))
        ad = associated_data(token.project, names[i], domain, token.key_version, token.retention_until)
        assert sealed == aead.encrypt(nonce, plaintexts[i], ad)
        assert row_hashes[32 * i:32 * i + 32] == hashlib.sha256(
            struct.pack(">I", len(name)) + name + nonce + struct.pack(">I", len(sealed)) + sealed).digest()


@pytest.mark.parametrize("engine", ["c", "python"])
def test_binary_escrow_rows_are_postgresql_binary_copy_in_c_and_in_python(mint: Mint, engine: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``binary_block_rows`` (what a run writing straight into escrow copies) in the C engine and without it:
    PostgreSQL's binary COPY of the escrow layout, each value opening under its own associated data, with the
    row hashes of the batch digest; the pseudonyms need no escaping there (a backslash is just a byte)."""
    if engine == "c" and not native.available():
        pytest.skip("the C engine is not built")
    if engine == "python":
        monkeypatch.setattr(native, "available", lambda: False)
    token, private = mint("research-a"), mint("research-a", "reverse").escrow_private_key
    rng = random.Random(7)
    names = [f"P\\{rng.randbytes(12).hex()}" for _ in range(300)]
    values = [rng.randbytes(rng.randrange(0, 80)) for _ in range(300)]
    sealer = BatchSealer(token, "visits")
    rows = BINARY_COPY_HEADER + sealer.binary_block_rows("B-1", _block(names, values, "visits")) + BINARY_COPY_TRAILER
    _open_binary_rows(rows, open_key(sealer.sealed_dek, private), token, "visits", [b"str\x00" + v for v in values],
                      names, sealer.row_hashes)
    with pytest.raises(EscrowError, match="one list"):
        sealer.binary_block_rows("B-2", _block(names, values, "visits"))


def test_a_sealed_value_opens_only_under_its_own_associated_data(mint: Mint) -> None:
    token, private = mint("research-a"), mint("research-a", "reverse").escrow_private_key
    sealer = BatchSealer(token, "d")
    [nonce], [ciphertext] = sealer.seal(["p1"], ["str"], [b"alice"])
    opener = BatchOpener(sealer.sealed_dek, private)
    ad = associated_data(token.project, "p1", "d", token.key_version, token.retention_until)
    assert opener.open(nonce, ciphertext, ad) == b"str\x00alice"
    for other in (associated_data(token.project, "p2", "d", token.key_version, token.retention_until),
                  associated_data(token.project, "p1", "e", token.key_version, token.retention_until),
                  associated_data(token.project, "p1", "d", token.key_version + 1, token.retention_until),
                  associated_data(token.project, "p1")):
        assert opener.open(nonce, ciphertext, other) is None
    assert opener.open(nonce, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), ad) is None
    with pytest.raises(EscrowIntegrityError):
        BatchOpener(sealer.sealed_dek, X25519PrivateKey.generate())


def test_a_sealer_seals_one_list_and_needs_an_escrow_key(mint: Mint) -> None:
    """Nonces restart at 0 in every batch: a batch key that sealed once is never used again."""
    sealer = BatchSealer(mint("research-a"), "")
    sealer.seal(["p"], ["str"], [b"v"])
    with pytest.raises(EscrowError, match="one list"):
        sealer.seal(["q"], ["str"], [b"w"])
    with pytest.raises(EscrowError, match="one list"):
        sealer.copy_block_rows("B", _block(["q"], [b"w"], ""))
    for token in (mint("research-b"), mint("research-a", "reverse")):
        with pytest.raises(TokenKindError):
            BatchSealer(token, "")


# --- what to seal ---------------------------------------------------------------------------------
def test_escrow_block_take_concat_and_items() -> None:
    block = EscrowBlock(b"aaabbbccc", 3, b"xyyzzz", np.array([0, 1, 3, 6], np.uint64))
    assert [(i.pseudonym, i.canonical) for i in block] == [("aaa", b"x"), ("bbb", b"yy"), ("ccc", b"zzz")]
    taken = block.take([2, 0])
    assert [(i.pseudonym, i.canonical) for i in taken] == [("ccc", b"zzz"), ("aaa", b"x")]
    both = EscrowBlock.concat([block, taken])
    assert len(both) == 5 and both[3].canonical == b"zzz" and list(both.items()) == list(both)
    assert len(block.take([])) == 0
    with pytest.raises(ValueError):
        EscrowBlock(b"aaab", 3, b"", np.array([0, 0], np.uint64))


def test_first_occurrences_keep_order() -> None:
    block = EscrowBlock(b"bbbaaabbbcccaaa", 3, b"12345", np.arange(6, dtype=np.uint64), domain="d")
    first = block.first_occurrences()
    assert [(i.pseudonym, i.canonical, i.domain) for i in first] == [("bbb", b"1", "d"), ("aaa", b"2", "d"),
                                                                     ("ccc", b"4", "d")]
    assert first.first_occurrences() is first
    items = EscrowItems()
    items.add(["x", "y"], ["str", "int"], [b"1", b"2"], "d")
    assert items == list(items) and items[1].type_tag == "int" and items[-1:][0].domain == "d"
