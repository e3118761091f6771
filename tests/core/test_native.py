"""The C engine (core/_native.c) through its facade (core/native.py) against the definitions: every result
equals an independent computation.

Pseudonyms are compared with ``hmac`` + the per-value encoders of formats.py, COPY text with the
pure-Python reader; escrow sealing (the engine's ``seal_rows``) is checked in test_sealer.py against the
``cryptography`` package's AES-GCM and the GCM specification's vectors. Whole runs on PostgreSQL are
compared with the same runs made without the C engine (``PSEUDONYMISE_PURE_PYTHON=1`` in a subprocess).
"""

from __future__ import annotations

import datetime as dt
import hmac
import importlib
import json
import os
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.copytext import CopyBlock, unescape
from pseudonymise.core.errors import CollisionError, DataIOError, InvalidTextError, PolicyError, UnsupportedTypeError
from pseudonymise.core.formats import ALPHABETS, PseudonymFormat
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.mac import PRIMARY_LABEL, SECONDARY_LABEL
from pseudonymise.core.policy import ColumnPolicy, ColumnRule, build_normaliser
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser, _canonical_callback
from pseudonymise.core.sealer import EscrowBlocks
from pseudonymise.core.tokens import Token, verify_token

from tests import reference
from tests.reference import encode as reference_encode
from tests.reference import rfc4231_cases

RFC4231 = rfc4231_cases()

needs_native = pytest.mark.skipif(not native.available(),
                                  reason="PSEUDONYMISE_PURE_PYTHON=1: the C engine is switched off")


def _extension() -> Any:
    """The extension itself, only for its own argument checks, which the typed facade (native.py) never lets
    through; everything else here goes through the facade."""
    return importlib.import_module("pseudonymise.core._native")


def test_the_c_engine_is_built() -> None:
    """The package builds its C engine wherever gcc and libcrypto are (the test command installs them);
    a missing engine is a failure, not a silent slowdown, unless switched off on purpose."""
    if os.environ.get("PSEUDONYMISE_PURE_PYTHON") == "1":
        assert not native.available()
        return
    assert native.available(), "pseudonymise.core._native is missing: run `pip install -e .` with gcc and libssl-dev"


# --- HMAC -------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("case", RFC4231, ids=lambda c: f"key{len(c['Key'])}-msg{len(c['Msg'])}")
def test_keyed_gives_rfc4231_vectors(case: dict[str, bytes]) -> None:
    assert native.keyed(case["Key"], b"").mac(case["Msg"]) == case["MD"]
    assert native.keyed(case["Key"], case["Msg"][:5]).mac(case["Msg"][5:]) == case["MD"]
    assert native.keyed(case["Key"], b"").mac_many([case["Msg"], case["Msg"]]) == case["MD"] * 2


@needs_native
def test_keyed_equals_hmac_for_every_length() -> None:
    rng = random.Random(7)
    for key_len in (0, 1, 32, 63, 64, 65, 200):
        key = rng.randbytes(key_len)
        label = rng.randbytes(rng.randrange(40))
        messages = [rng.randbytes(n) for n in range(0, 300, 7)]
        keyed = native.keyed(key, label)
        expected = [hmac.digest(key, label + m, "sha256") for m in messages]
        assert [keyed.mac(m) for m in messages] == expected
        assert keyed.mac_many(messages) == b"".join(expected)
    assert "key" not in repr(keyed).replace("key hidden", "")
    with pytest.raises(TypeError):
        keyed.mac_many(["text, not bytes"])


# --- encoders ---------------------------------------------------------------------------------------
@needs_native
def test_encode_equals_the_per_value_encoders() -> None:
    macs = os.urandom(32 * 500) + b"\xff" * 32 + b"\x00" * 32
    ext = _extension()
    assert native.ALPHABET_CODES == {"hex": ext.HEX, "base32": ext.BASE32, "base64url": ext.BASE64URL,
                                     "digits": ext.DIGITS}
    for alphabet, (low, high) in ALPHABETS.items():
        for length in range(low, high + 1):
            fmt = PseudonymFormat(alphabet, length, "P-é")
            expected = "".join(reference_encode(macs[i:i + 32], alphabet, length, "P-é") for i in range(0, len(macs), 32))
            assert native.encode(macs, fmt).decode() == expected, (alphabet, length)


# --- COPY blocks ------------------------------------------------------------------------------------
AWKWARD = ["P1", "", " ", "\\N", "\\\\N", "a\\tb", "a\\nb\\r", "back\\\\slash", "\\101\\x42\\x4a\\q", "\\7\\77\\777",
           "\\x", "\\xg", "trailing\\", "é", "e\u0301", "Ångström", "\u212b", "日本語", "x" * 10_000, "-12", "007"]


def _field_value(field: str) -> bytes | None:
    """The definition: COPY text field -> canonical bytes (copytext.unescape, then NFC UTF-8)."""
    value = unescape(field)
    return None if value is None else unicodedata.normalize("NFC", value).encode("utf-8")


def _expected_pseudonym(key: bytes, label: bytes, fmt: PseudonymFormat, field: str) -> str:
    value = _field_value(field)
    if value is None:
        return "\\N"
    mac = hmac.digest(key, label + value, "sha256")
    return reference_encode(mac, fmt.alphabet, fmt.length, fmt.prefix).replace("\\", "\\\\")


def _token(issuer: Issuer, project: str, fmt: PseudonymFormat | None = None) -> Token:
    if fmt is not None:
        project = f"fmt-{fmt.alphabet}"
        issuer.create_project(project, format=fmt)
    return verify_token(issuer.issue(project, "pseudonymisation"), issuer.public_keys())


def _rows(count: int, seed: int = 1) -> list[list[str]]:
    rng = random.Random(seed)
    return [[str(i), rng.choice(AWKWARD), f"kept\\t{i}\\\\", rng.choice(AWKWARD), "dropped"] for i in range(count)]


def _block(rows: list[list[str]]) -> CopyBlock:
    return CopyBlock("".join("\t".join(r) + "\n" for r in rows).encode("utf-8"), len(rows))


COLUMNS = ["id", "pid", "note", "mrn", "secret"]
POLICY = ColumnPolicy({"id": ColumnRule("id", "keep"), "pid": ColumnRule("pid"), "note": ColumnRule("note", "keep"),
                       "mrn": ColumnRule("mrn", domain="mrn"), "secret": ColumnRule("secret", "drop")})


@needs_native
@pytest.mark.parametrize("fmt", [None, PseudonymFormat("hex", 20, "h\\"), PseudonymFormat("base64url", 43),
                                 PseudonymFormat("digits", 24, "D-")],
                         ids=["base32", "hex-backslash-prefix", "base64url", "digits"])
def test_copy_block_equals_the_definition(issuer: Issuer, fmt: PseudonymFormat | None) -> None:
    token = _token(issuer, "research-b", fmt)
    engine = Pseudonymiser(token, POLICY)
    rows = _rows(3000)
    assert engine.takes_copy_blocks(COLUMNS)
    batch = engine.pseudonymise_batch(_block(rows), COLUMNS)
    assert isinstance(batch.columns, CopyBlock) and batch.columns.rows == len(rows)
    f = token.format
    expected = "".join(
        "\t".join([r[0], _expected_pseudonym(token.key, PRIMARY_LABEL + b"\x00", f, r[1]), r[2],
                   _expected_pseudonym(token.key, PRIMARY_LABEL + b"mrn\x00", f, r[3])]) + "\n" for r in rows)
    assert batch.columns.data.decode("utf-8") == expected
    nulls = sum(r[i] == "\\N" for r in rows for i in (1, 3))
    assert batch.stats.as_dict() == {"rows_in": 3000, "rows_out": 3000, "nulls": nulls,
                                     "values_pseudonymised": 6000 - nulls, "escrow_rows": 0}
    engine.finish()


@needs_native
def test_copy_block_escrow_items_equal_the_column_path(issuer: Issuer) -> None:
    token = _token(issuer, "research-a")
    rows = _rows(2000, seed=3)
    block_batch = Pseudonymiser(token, POLICY).pseudonymise_batch(_block(rows), COLUMNS)
    columns = {c: [unescape(r[i]) for r in rows] for i, c in enumerate(COLUMNS)}
    column_batch = Pseudonymiser(token, POLICY).pseudonymise_batch(columns)
    assert isinstance(block_batch.escrow, EscrowBlocks)
    # the block path leaves out what it sealed before in the run, the same way; order: column by column
    block_items = [item for block in block_batch.escrow for item in block]
    assert block_items == list(column_batch.escrow)
    assert [item.domain for item in block_items] == [item.domain for item in column_batch.escrow]
    assert {item.domain for item in block_items} == {rule.domain for rule in POLICY.rules.values()
                                                    if rule.action == "pseudonymise"}
    assert sum(len(block.items()) for block in block_batch.escrow) == len(column_batch.escrow)


@needs_native
def test_randomised_blocks_give_fresh_pseudonyms_per_occurrence(issuer: Issuer) -> None:
    token = _token(issuer, "random-r")
    rows = [[str(i), "same", "k", "\\N" if i % 2 else "same", "x"] for i in range(500)]
    batch = Pseudonymiser(token, POLICY).pseudonymise_batch(_block(rows), COLUMNS)
    out = [line.split("\t") for line in batch.columns.data.decode().splitlines()]
    pids = [r[1] for r in out]
    assert len(set(pids)) == 500 and all(len(p) == 26 for p in pids)
    assert [r[3] == "\\N" for r in out] == [bool(i % 2) for i in range(500)]
    assert len(batch.escrow) == 750  # every occurrence sealed


def _source_pseudonyms(issuer: Issuer, project: str, count: int) -> list[str]:
    token = verify_token(issuer.issue(project, "pseudonymisation"), issuer.public_keys())
    policy = ColumnPolicy.pseudonymise("pid")
    return Pseudonymiser(token, policy).pseudonymise_values([f"P{i}" for i in range(count)], policy.rules["pid"])  # type: ignore[return-value]


@needs_native
@pytest.mark.parametrize("source_format", [None, PseudonymFormat("hex", 18, "s\\é")], ids=["base32", "escaped-prefix"])
def test_secondary_blocks_equal_the_definition(issuer: Issuer, source_format: PseudonymFormat | None) -> None:
    """The C engine's secondary columns: the design's HMAC of the (unescaped) first-level pseudonym under
    the secondary key, input checked against the source format after COPY unescaping."""
    source = "research-b"
    if source_format is not None:
        source = "source-escaped"
        issuer.create_project(source, format=source_format)
    token = verify_token(issuer.issue("vendor-x", "secondary", source_project=source), issuer.public_keys())
    engine = SecondaryPseudonymiser(token, ColumnPolicy.pseudonymise("pid", default="keep"))
    first = _source_pseudonyms(issuer, source, 40)
    values = [None if i % 9 == 0 else first[i % 40] for i in range(700)]
    rows = [[str(i), "\\N" if v is None else v.replace("\\", "\\\\"), "kept"] for i, v in enumerate(values)]
    block = CopyBlock("".join("\t".join(r) + "\n" for r in rows).encode(), len(rows))
    assert engine.takes_copy_blocks(["id", "pid", "note"])
    out = engine.pseudonymise_batch(block, ["id", "pid", "note"]).columns.data.decode().splitlines()
    fmt = token.format
    expected = ["\\N" if v is None else reference_encode(hmac.digest(token.key, SECONDARY_LABEL + v.encode(), "sha256"),
                                                        fmt.alphabet, fmt.length, fmt.prefix)
                for v in values]
    assert [line.split("\t")[1] for line in out] == expected
    assert engine.pseudonymise_values(values, "pid") == [None if e == "\\N" else e for e in expected]


@needs_native
def test_secondary_blocks_refuse_values_not_in_the_source_format(issuer: Issuer) -> None:
    """The COPY path (PostgreSQL to PostgreSQL) refuses raw identifiers as the column path does: the
    column and how many values failed, no value; the block's rows never leave the engine."""
    token = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-b"), issuer.public_keys())
    engine = SecondaryPseudonymiser(token, ColumnPolicy.pseudonymise("pid", default="keep"))
    first = _source_pseudonyms(issuer, "research-b", 10)
    raw = ["P100000", first[0].upper(), first[1][:-1], first[2] + "a", "\\x41" + first[3][1:], "é" + first[4][2:]]
    rows = [[str(i), first[i % 10], "kept"] for i in range(100)] + [["x", v, "kept"] for v in raw] + [["y", "\\N", "k"]]
    block = CopyBlock("".join("\t".join(r) + "\n" for r in rows).encode(), len(rows))
    with pytest.raises(PolicyError) as info:
        engine.pseudonymise_batch(block, ["id", "pid", "note"])
    message = str(info.value)
    assert "'pid'" in message and f"{len(raw)} of {100 + len(raw)} values" in message and "'research-b'" in message
    for value in [*raw, *first]:
        assert value not in message
    assert engine.stats.rows_in == 0
    escaped = "\\x" + format(ord(first[0][0]), "x") + first[0][1:]  # COPY escapes spell a valid pseudonym
    ok = CopyBlock(f"1\t{escaped}\tk\n".encode(), 1)
    assert engine.pseudonymise_batch(ok, ["id", "pid", "note"]).stats.values_pseudonymised == 1


@needs_native
def test_copy_block_check_counts_what_matches_refuses() -> None:
    """``copy_block``'s check against the definition (PseudonymFormat.matches on the unescaped value)."""
    rng = random.Random(11)
    keyed = native.keyed(b"k" * 32, SECONDARY_LABEL)
    out_format = PseudonymFormat("base32", 26)
    for alphabet in ALPHABETS:
        for fmt in (PseudonymFormat(alphabet, ALPHABETS[alphabet][0]), PseudonymFormat(alphabet, ALPHABETS[alphabet][1], "é-\\")):
            good = fmt.encode_many(os.urandom(32 * 50))
            fields = [rng.choice(good) for _ in range(300)] + AWKWARD + [g[:-1] for g in good[:5]] + \
                [g.upper() for g in good[:5]] + [g.replace("\\", "\\\\") for g in good[:5]] + ["\\N"]
            rng.shuffle(fields)
            data = "".join(f"{f}\n" for f in fields).encode()
            checked = native.BlockPlan((native.ColumnPlan.pseudonymise(out_format, keyed, check=fmt),))
            _out, _rows, [(_macs, nulls, _c, _e, mismatched)] = native.copy_block(data, checked)
            values = [unescape(f) for f in fields]
            assert nulls == values.count(None)
            assert mismatched == sum(1 for v in values if v is not None and not fmt.matches(v)) > 0
            unchecked = native.BlockPlan((native.ColumnPlan.pseudonymise(out_format, keyed),))
            _out, _rows, [(_m, _n, _c, _e, mismatched)] = native.copy_block(data, unchecked)
            assert mismatched == 0
    for bad in ((4, 16, b""), (0, 0, b""), (0, 78, b""), ("hex", 16, b"")):  # the extension's own checks
        with pytest.raises((ValueError, TypeError)):
            _extension().copy_block(b"a\n", [(2, keyed, 1, 26, "", False, None, b"", bad)])


SPACED = ["  P1 ", "\\t p-2.x\\n", "\x1c\x1fP3", " Mixed Case ", "a-b.c/d", "  ", "", "STRASSE", "Straße ",
          " e\u0301 ", "\u00a0nbsp\u00a0", "\u212bngström-1", "ǅ ǆ", "x" * 5000, "-.-"]


@needs_native
@pytest.mark.parametrize("names", [("strip",), ("strip", "upper"), ("lower",), ("casefold",), ("remove_whitespace",),
                                   ("remove:-./",), ("remove:é-", "strip", "lower"), ("upper", "remove:P")],
                         ids=lambda n: "+".join(n))
def test_normalisers_in_copy_blocks_equal_the_definition(issuer: Issuer, names: tuple[str, ...]) -> None:
    token = _token(issuer, "research-b")
    policy = ColumnPolicy({"id": ColumnRule("id", "keep"), "pid": ColumnRule("pid", normalise=names)})
    engine = Pseudonymiser(token, policy)
    assert engine.takes_copy_blocks(["id", "pid"])
    rng = random.Random(len(names))
    rows = [[str(i), rng.choice(SPACED + AWKWARD)] for i in range(2000)]
    out = engine.pseudonymise_batch(_block(rows), ["id", "pid"]).columns.data.decode("utf-8").splitlines()
    normalise = build_normaliser(names, "pid")
    label = PRIMARY_LABEL + b"\x00"

    def expected(field: str) -> str:
        value = unescape(field)
        if value is None:
            return "\\N"
        canonical = unicodedata.normalize("NFC", normalise(value)).encode("utf-8")
        fmt = token.format
        return reference_encode(hmac.digest(token.key, label + canonical, "sha256"), fmt.alphabet, fmt.length, fmt.prefix)

    assert [line.split("\t")[1] for line in out] == [expected(r[1]) for r in rows]


@needs_native
def test_a_bad_normaliser_program_is_refused() -> None:
    """The extension's own check: the facade only makes programs from the policy's normalisers (ascii_program)."""
    keyed = native.keyed(b"k" * 32, b"")
    for program in (b"x", b"r", b"r\x05ab"):
        with pytest.raises(ValueError, match="normaliser program"):
            _extension().copy_block(b"a\n", [(2, keyed, 1, 26, "", False, None, program)])
    assert native.ascii_program(["strip", "casefold", "upper", "remove_whitespace", "remove:-é./"]) == b"sluwr\x03-./"


@needs_native
@pytest.mark.parametrize(("data", "error", "match"), [
    (b"1\tP1\tk\tm\n2\tP2\tk\n", DataIOError, "as many fields"),
    (b"1\tP1\tk\tm\tx\ty\n", DataIOError, "as many fields"),
    (b"1\tP1\tk\tm\tx", DataIOError, "complete row"),
    (b"1\t\xff\xfe\tk\tm\tx\n", InvalidTextError, "not valid UTF-8"),
], ids=["short-row", "long-row", "no-final-newline", "invalid-utf8"])
def test_bad_copy_text_is_a_clear_error(issuer: Issuer, data: bytes, error: type[Exception], match: str) -> None:
    engine = Pseudonymiser(_token(issuer, "research-b"), POLICY)
    with pytest.raises(error, match=match):
        engine.pseudonymise_batch(CopyBlock(data, data.count(b"\n")), COLUMNS)


# --- whole runs: C engine and pure Python give the same database --------------------------------
RUN = r"""
import json, sys
import sqlalchemy as sa
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core import native
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.sql import PostgresCopySource, TableTarget
from pseudonymise.core.use import GivenToken
cfg = json.loads(sys.argv[1])
engine = sa.create_engine(cfg["url"])
issuer = Issuer(DirectoryStore(cfg["store"]))
source = PostgresCopySource(engine, "SELECT * FROM src ORDER BY id", batch_size=700)
policy = ColumnPolicy({"pid": ColumnRule("pid"), "mrn": ColumnRule("mrn", domain="mrn")}, "keep")
target = TableTarget(cfg["target"], mode="replace")
store = Store(engine, audit_table=cfg["target"] + "_audit", escrow_prefix=cfg["target"])
sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, use_copy=True, pseudonymised=["pid", "mrn"],
                                                  type_names=source.type_names), copy_text=True)
summary = run_pseudonymisation(store, GivenToken(open(cfg["token"]).read(), issuer.public_keys()), policy,
                               plan_transfer(source, sink, policy))
print(json.dumps({"native": native.available(), **summary.counts}))
"""


@needs_native
@pytest.mark.postgres
@pytest.mark.parametrize("project", ["research-a", "research-b"], ids=["reversible", "irreversible"])
def test_runs_with_and_without_the_c_engine_write_the_same_rows(pg_url: str, issuer: Issuer, tmp_path: Path,
                                                                project: str) -> None:
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id int PRIMARY KEY, pid text, mrn varchar(40), note text, d date)"))
        rng = random.Random(5)
        conn.execute(sa.text("INSERT INTO src VALUES (:id, :pid, :mrn, :note, :d)"), [
            {"id": i, "pid": rng.choice([None, "P1", "e\u0301", "tab\there", "back\\slash", "\u212b", f"P{i % 900}"]),
             "mrn": None if i % 13 == 0 else f"M{i % 1200}", "note": f"line\n{i}\t\\", "d": "2026-01-02"}
            for i in range(5000)])
    token_file = tmp_path / "token"
    token_file.write_text(issuer.issue(project, "pseudonymisation"))
    results = {}
    for mode in ("native", "pure"):
        cfg = {"url": pg_url, "store": str(issuer.store.path), "token": str(token_file), "target": f"dst_{mode}"}
        env = {**os.environ, "PSEUDONYMISE_PURE_PYTHON": "1" if mode == "pure" else "0"}
        done = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["native"].pop("native") is True and results["pure"].pop("native") is False
    assert results["native"] == results["pure"]
    with engine.connect() as conn:
        native_rows = conn.execute(sa.text("SELECT * FROM dst_native ORDER BY id")).all()
        pure_rows = conn.execute(sa.text("SELECT * FROM dst_pure ORDER BY id")).all()
        assert native_rows == pure_rows and len(native_rows) == 5000
        if project == "research-a":
            escrow = {mode: conn.execute(sa.text(f"SELECT pseudonym FROM dst_{mode}_escrow ORDER BY 1")).scalars().all()
                      for mode in ("native", "pure")}
            assert escrow["native"] == escrow["pure"] and len(escrow["native"]) == results["native"]["escrow_rows"]
    if project == "research-a":  # what the C engine sealed opens with the ordinary reverse path
        from pseudonymise.core.audit import AuditLog
        from pseudonymise.core.escrow import EscrowTables, reveal

        tables = EscrowTables.define(sa.MetaData(), "dst_native")
        reverse = verify_token(issuer.issue(project, "reverse"), issuer.public_keys())
        with engine.connect() as conn:
            sample = conn.execute(sa.text("SELECT d.pid, s.pid AS original FROM dst_native d JOIN src s USING (id) "
                                          "WHERE d.pid IS NOT NULL LIMIT 300")).all()
            revealed = reveal(conn, tables, reverse, [r[0] for r in sample],
                              lambda: AuditLog(engine, "dst_native_audit").listed_escrow_batches(conn))
        assert not revealed.not_found
        assert all(revealed.values[p] == unicodedata.normalize("NFC", o) for p, o in sample)


SECONDARY_RUN = r"""
import json, sys
import sqlalchemy as sa
from pseudonymise.core.errors import PolicyError
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core import native
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableTarget
from pseudonymise.core.use import GivenToken
cfg = json.loads(sys.argv[1])
engine = sa.create_engine(cfg["url"])
issuer = Issuer(DirectoryStore(cfg["store"]))
copy = engine.dialect.name == "postgresql"
source = (PostgresCopySource if copy else SqlSource)(engine, "SELECT * FROM src ORDER BY id", batch_size=400)
target = TableTarget(cfg["target"], mode="replace")
# SQLite: the target and audit in another file (the source's streaming read holds its file's lock)
store = Store(sa.create_engine(cfg["store_url"]), audit_table=cfg["target"] + "_audit", escrow_prefix=cfg["target"])
try:
    policy = ColumnPolicy.pseudonymise("pid")
    sink = SinkFactory(lambda cols, conn: target.sink(conn, cols, use_copy=copy, pseudonymised=["pid"],
                                                      type_names=getattr(source, "type_names", None)), copy_text=copy)
    run_pseudonymisation(store, GivenToken(open(cfg["token"]).read(), issuer.public_keys()), policy,
                         plan_transfer(source, sink, policy), secondary=True)
    print(json.dumps({"native": native.available(), "error": None}))
except PolicyError as exc:
    print(json.dumps({"native": native.available(), "error": str(exc)}))
"""


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_secondary_runs_refuse_raw_identifiers_on_every_path(request: pytest.FixtureRequest, issuer: Issuer,
                                                            tmp_path: Path, database: str) -> None:
    """Issue 11 item 5 end to end: PostgreSQL's COPY path (C engine and pure Python) and SQLite's generic
    SQL path; a table of research-b pseudonyms with raw identifiers among them fails the secondary run,
    naming the column and the count, writing no target; the same table without them goes through."""
    url = request.getfixturevalue("pg_url") if database == "postgres" else f"sqlite:///{tmp_path / 'db.sqlite'}"
    store_url = url if database == "postgres" else f"sqlite:///{tmp_path / 'target.sqlite'}"
    engine, store_engine = sa.create_engine(url), sa.create_engine(store_url)
    first = _source_pseudonyms(issuer, "research-b", 900)
    raw = {i: f"P{i:06d}" for i in range(7, 900, 90)}  # ten raw identifiers among 900 rows
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id int PRIMARY KEY, pid text, ward text)"))
        conn.execute(sa.text("INSERT INTO src VALUES (:id, :pid, :ward)"),
                     [{"id": i, "pid": raw.get(i, first[i]) if i % 50 else None, "ward": "w"} for i in range(900)])
    token_file = tmp_path / "token"
    token_file.write_text(issuer.issue("vendor-x", "secondary", source_project="research-b"))
    results = {}
    modes = ("native", "pure") if database == "postgres" and native.available() else ("pure",)
    for mode in modes:
        cfg = {"url": url, "store_url": store_url, "store": str(issuer.store.path), "token": str(token_file),
               "target": f"dst_{mode}"}
        env = {**os.environ, "PSEUDONYMISE_PURE_PYTHON": "1" if mode == "pure" else "0"}
        done = subprocess.run([sys.executable, "-c", SECONDARY_RUN, json.dumps(cfg)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        error = results[mode]["error"]
        assert error is not None and "'research-b'" in error
        counted = re.search(r"column 'pid': (\d+) of (\d+) values", error)  # counted per batch
        assert counted is not None and 0 < int(counted[1]) <= 10 < int(counted[2]) <= 900, error
        for value in [*raw.values(), *first]:
            assert value not in error
        assert not sa.inspect(store_engine).has_table(f"dst_{mode}")
        with store_engine.connect() as conn:
            outcomes = conn.execute(sa.text(f"SELECT outcome FROM dst_{mode}_audit ORDER BY seq")).scalars().all()
        assert outcomes == ["started", "failed"]
    assert {r["native"] for r in results.values()} == {m == "native" for m in modes}
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE src SET pid = NULL WHERE pid LIKE 'P%'"))
    cfg = {"url": url, "store_url": store_url, "store": str(issuer.store.path), "token": str(token_file),
           "target": "dst_clean"}
    done = subprocess.run([sys.executable, "-c", SECONDARY_RUN, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert json.loads(done.stdout.strip().splitlines()[-1])["error"] is None, done.stderr[-3000:]
    with store_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dst_clean")).scalar() == 900


def test_native_flag_is_reported_from_the_environment() -> None:
    out = subprocess.run([sys.executable, "-c", "from pseudonymise.core.native import available as n; "
                          "print(n())"], capture_output=True, text=True,
                         env={**os.environ, "PSEUDONYMISE_PURE_PYTHON": "1"}, check=True)
    assert out.stdout.strip() == "False"


# --- Arrow arrays -----------------------------------------------------------------------------------
TEXT = ["P1", "", " ", "é", "e\u0301", "Ångström", "\u212b", "日本語", "x" * 10_000, "-12", "007", "tab\there",
        "new\nline", "NUL\x00in", "back\\slash", " Mixed Case ", "\U0001f600"]
DAYS = [dt.date(1, 1, 1), dt.date(9999, 12, 31), dt.date(1970, 1, 1), dt.date(1969, 12, 31), dt.date(2000, 2, 29),
        dt.date(1900, 3, 1), dt.date(2026, 11, 30), dt.date(999, 7, 4), dt.date(1582, 10, 10)]
INTEGERS: dict[pa.DataType, list[int]] = {
    pa.int8(): [-128, 127, 0, -1], pa.int16(): [-(2**15), 2**15 - 1, 7], pa.int32(): [-(2**31), 2**31 - 1, -10],
    pa.int64(): [-(2**63), 2**63 - 1, 0, -9, 10**18], pa.uint8(): [0, 255], pa.uint16(): [2**16 - 1, 1],
    pa.uint32(): [2**32 - 1, 42], pa.uint64(): [2**64 - 1, 0, 10**19],
}


def _arrow_cases() -> list[tuple[str, pa.Array]]:
    """One array per type the C engine reads, NULLs among the values, in a shuffled order."""
    rng = random.Random(13)

    def spread(values: list[Any], count: int = 400) -> list[Any]:
        return [None if i % 7 == 3 else rng.choice(values) for i in range(count)]

    cases = [("string", pa.array(spread(TEXT), pa.string())), ("large_string", pa.array(spread(TEXT), pa.large_string())),
             ("binary", pa.array(spread([t.encode() for t in TEXT] + [b"\xff\xfe"]), pa.binary())),
             ("large_binary", pa.array(spread([b"", b"\x00", b"\xff" * 70]), pa.large_binary())),
             ("date32", pa.array(spread(DAYS), pa.date32())), ("bool", pa.array(spread([True, False]), pa.bool_()))]
    cases += [(str(t), pa.array(spread(v), t)) for t, v in INTEGERS.items()]
    return cases


ARROW_CASES = _arrow_cases()


def _raw_token(issuer: Issuer, project: str) -> tuple[str, Token]:
    raw = issuer.issue(project, "pseudonymisation")
    return raw, verify_token(raw, issuer.public_keys())


@needs_native
@pytest.mark.parametrize(("name", "array"), ARROW_CASES, ids=[name for name, _ in ARROW_CASES])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
def test_arrow_columns_equal_the_reference_and_the_python_engine(issuer: Issuer, name: str, array: pa.Array,
                                                                 sliced: bool) -> None:
    """Every type the C engine reads, NULLs kept, and a slice (offset != 0, in the validity bitmap too): the
    pseudonyms equal docs/design.md §4 written with the standard library and the pure-Python engine's column path."""
    raw, token = _raw_token(issuer, "research-b")
    if sliced:
        array = array.slice(5, 301)
        assert array.offset == 5
    batch = pa.RecordBatch.from_arrays([pa.array(range(len(array))), array], names=["id", "value"])
    policy = ColumnPolicy({"id": ColumnRule("id", "keep"), "value": ColumnRule("value", domain="d")})
    out = Pseudonymiser(token, policy).pseudonymise_record_batch(batch)
    assert isinstance(out.columns, pa.RecordBatch) and out.columns.schema.names == ["id", "value"]
    got = out.columns.column("value")
    assert got.type == pa.string() and got.null_count == array.null_count
    assert out.columns.column("id") is batch.column("id") or out.columns.column("id").equals(batch.column("id"))
    values = array.to_pylist()
    assert got.to_pylist() == reference.token_pseudonyms(raw, values, domain="d")
    python = Pseudonymiser(token, policy).pseudonymise_batch({"id": list(range(len(values))), "value": values})
    assert got.to_pylist() == python.columns["value"]  # type: ignore[index]
    assert out.stats.as_dict() == python.stats.as_dict()


@needs_native
@pytest.mark.parametrize("names", [(), ("strip",), ("strip", "upper"), ("casefold",), ("remove_whitespace",),
                                   ("remove:é-", "strip", "lower")], ids=lambda n: "+".join(n) or "none")
def test_arrow_text_is_normalised_and_nfc_as_the_python_engine(issuer: Issuer, names: tuple[str, ...]) -> None:
    """NFD input, non-ASCII and the column's normalisers (ASCII in C, the rest through the Python normaliser)."""
    raw, token = _raw_token(issuer, "research-b")
    rng = random.Random(len(names))
    values = [None if i % 11 == 0 else rng.choice(SPACED + TEXT) for i in range(1500)]
    policy = ColumnPolicy({"pid": ColumnRule("pid", normalise=names)})
    for arrow_type in (pa.string(), pa.large_string()):
        out = Pseudonymiser(token, policy).pseudonymise_record_batch(
            pa.RecordBatch.from_arrays([pa.array(values, arrow_type)], names=["pid"]))
        normalise = build_normaliser(names, "pid") or (lambda v: v)
        expected = reference.token_pseudonyms(raw, [None if v is None else normalise(v) for v in values])
        assert out.columns.column("pid").to_pylist() == expected  # type: ignore[union-attr]


@needs_native
def test_arrow_formats_and_prefixes(issuer: Issuer) -> None:
    values = ["P1", None, "é", ""] * 50
    for fmt in (PseudonymFormat("hex", 20, "h\\"), PseudonymFormat("base64url", 43), PseudonymFormat("digits", 24, "D-é")):
        token = _token(issuer, "research-b", fmt)
        out = Pseudonymiser(token, ColumnPolicy.pseudonymise("pid")).pseudonymise_record_batch(
            pa.RecordBatch.from_arrays([pa.array(values)], names=["pid"]))
        expected = [None if v is None else reference_encode(
                        hmac.digest(token.key, PRIMARY_LABEL + b"\x00"  # type: ignore[arg-type]
                                    + unicodedata.normalize("NFC", v).encode(), "sha256"), fmt.alphabet, fmt.length,
                        fmt.prefix) for v in values]
        assert out.columns.column("pid").to_pylist() == expected  # type: ignore[union-attr]


def test_record_batches_without_the_c_engine_are_the_same(issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure-Python fallback (no C engine here) gives the same record batch, and types the C engine does not
    read (timestamps, dictionaries) take it whatever the engine."""
    raw, token = _raw_token(issuer, "research-b")
    columns = [pa.array(["a", None, "é"]), pa.array([1, None, -3], pa.int64()),
               pa.array([dt.date(2020, 1, 1), None, dt.date(1, 1, 1)]), pa.array(["x", "y", "x"]).dictionary_encode(),
               pa.array([dt.datetime(2026, 1, 2, 3, 4, 5), None, dt.datetime(1999, 12, 31)], pa.timestamp("us"))]
    batch = pa.RecordBatch.from_arrays(columns, names=["s", "i", "d", "dict", "ts"])
    policy = ColumnPolicy.pseudonymise("s", "i", "d", "dict", "ts")
    native_out = Pseudonymiser(token, policy).pseudonymise_record_batch(batch)
    monkeypatch.setattr(native, "_ext", None)
    assert not native.available()
    python_out = Pseudonymiser(token, policy).pseudonymise_record_batch(batch)
    assert native_out.columns.equals(python_out.columns)  # type: ignore[union-attr]
    assert native_out.stats.as_dict() == python_out.stats.as_dict()
    for name, array in zip(batch.schema.names, columns, strict=True):
        assert python_out.columns.column(name).to_pylist() == reference.token_pseudonyms(raw, array.to_pylist())  # type: ignore[union-attr]


@pytest.mark.parametrize("pure", [False, True], ids=["c-engine", "pure-python"])
def test_arrow_values_that_cannot_be_canonical_are_refused(issuer: Issuer, monkeypatch: pytest.MonkeyPatch,
                                                            pure: bool) -> None:
    """Floats, dates Python cannot hold, text that is not UTF-8: a clear error naming the column, never a value."""
    if pure:
        monkeypatch.setattr(native, "_ext", None)
    elif not native.available():
        pytest.skip("the C engine is switched off")
    engine = Pseudonymiser(_token(issuer, "research-b"), ColumnPolicy.pseudonymise("v"))
    floats = pa.RecordBatch.from_arrays([pa.array([1.5, 2.25])], names=["v"])
    with pytest.raises(UnsupportedTypeError, match=r"'v'.*floating-point"):
        engine.pseudonymise_record_batch(floats)
    late = pa.array([0, 2932897], pa.int32()).cast(pa.date32())  # 10000-01-01
    with pytest.raises(UnsupportedTypeError, match="'v'") as info:
        engine.pseudonymise_record_batch(pa.RecordBatch.from_arrays([late], names=["v"]))
    assert "10000" not in str(info.value)
    invalid = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 3, 5], np.int32).tobytes()),
                                                     pa.py_buffer(b"Zo\xebab")])
    with pytest.raises((InvalidTextError, UnsupportedTypeError), match="'v'") as info:
        engine.pseudonymise_record_batch(pa.RecordBatch.from_arrays([invalid], names=["v"]))
    assert "Zo" not in str(info.value)


@needs_native
def test_arrow_secondary_equals_the_definition_and_refuses_raw_identifiers(issuer: Issuer) -> None:
    token = verify_token(issuer.issue("vendor-x", "secondary", source_project="research-b"), issuer.public_keys())
    first = _source_pseudonyms(issuer, "research-b", 40)
    values = [None if i % 9 == 0 else first[i % 40] for i in range(700)]
    engine = SecondaryPseudonymiser(token, ColumnPolicy.pseudonymise("pid", default="keep"))
    batch = pa.RecordBatch.from_arrays([pa.array(range(700)), pa.array(values, pa.large_string())], names=["id", "pid"])
    out = engine.pseudonymise_record_batch(batch.slice(3))
    fmt = token.format
    expected = [None if v is None else reference_encode(hmac.digest(token.key, SECONDARY_LABEL + v.encode(),  # type: ignore[arg-type]
                                                                    "sha256"), fmt.alphabet, fmt.length, fmt.prefix)
                for v in values[3:]]
    assert out.columns.column("pid").to_pylist() == expected  # type: ignore[union-attr]
    raw = pa.RecordBatch.from_arrays([pa.array([1, 2]), pa.array([first[0], "P100000"])], names=["id", "pid"])
    with pytest.raises(PolicyError) as info:
        engine.pseudonymise_record_batch(raw)
    assert "1 of 2 values" in str(info.value) and "P100000" not in str(info.value)
    numbers = pa.RecordBatch.from_arrays([pa.array([1]), pa.array([7])], names=["id", "pid"])
    with pytest.raises(PolicyError, match="holds int values"):
        engine.pseudonymise_record_batch(numbers)


@needs_native
def test_arrow_escrow_equals_the_column_path_with_its_types(issuer: Issuer) -> None:
    """Reversible: what escrow must seal (pseudonym, type tag, canonical bytes, domain) equals the column path's,
    values already sealed earlier in the run left out the same way."""
    token = _token(issuer, "research-a")
    policy = ColumnPolicy({"pid": ColumnRule("pid", normalise=("strip",)), "born": ColumnRule("born", domain="b"),
                           "n": ColumnRule("n")})
    rng = random.Random(4)
    rows = 900
    data = {"pid": [None if i % 13 == 0 else rng.choice(SPACED + TEXT) for i in range(rows)],
            "born": [rng.choice([*DAYS, None]) for _ in range(rows)], "n": [rng.randrange(-50, 50) for _ in range(rows)]}
    batch = pa.RecordBatch.from_pydict(data, schema=pa.schema([("pid", pa.string()), ("born", pa.date32()),
                                                               ("n", pa.int16())]))
    arrow_engine, column_engine = Pseudonymiser(token, policy), Pseudonymiser(token, policy)
    tags = set()
    for part in (batch.slice(0, 500), batch.slice(500)):
        arrow_out = arrow_engine.pseudonymise_record_batch(part)
        column_out = column_engine.pseudonymise_batch(part.to_pydict())
        assert isinstance(arrow_out.escrow, EscrowBlocks)
        assert [item for block in arrow_out.escrow for item in block] == list(column_out.escrow)
        tags |= {block.type_tag for block in arrow_out.escrow}
    assert tags == {"str", "date", "int"}


@needs_native
def test_arrow_randomised_gives_fresh_pseudonyms_and_seals_every_occurrence(issuer: Issuer) -> None:
    token = _token(issuer, "random-r")
    batch = pa.RecordBatch.from_arrays([pa.array(["same"] * 300 + [None] * 20)], names=["pid"])
    out = Pseudonymiser(token, ColumnPolicy.pseudonymise("pid")).pseudonymise_record_batch(batch)
    pseudonyms = out.columns.column("pid").to_pylist()  # type: ignore[union-attr]
    assert len(set(pseudonyms[:300])) == 300 and pseudonyms[300:] == [None] * 20
    assert len(out.escrow) == 300 and out.stats.nulls == 20


class _SpyGuard:
    """The engine's real collision guard, with the MACs it was given recorded (the test checks it sees every value)."""

    def __init__(self, guard: Any) -> None:
        self.guard, self.seen = guard, []

    def add(self, column: str, macs: bytes, pseudonyms: Any, count: int | None = None) -> None:
        self.seen.append((column, macs))
        self.guard.add(column, macs, pseudonyms, count=count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.guard, name)


@needs_native
def test_arrow_collision_guard_sees_every_mac(issuer: Issuer) -> None:
    token = _token(issuer, "research-b")
    engine = Pseudonymiser(token, ColumnPolicy.pseudonymise("a", "b"))
    spy = engine._guard = _SpyGuard(engine._guard)  # type: ignore[assignment]
    a, b = pa.array(["x", None, "é", "x"]), pa.array([5, 6, None, 5], pa.int64())
    engine.pseudonymise_record_batch(pa.RecordBatch.from_arrays([a, b], names=["a", "b"]))
    label = PRIMARY_LABEL + b"\x00"
    assert spy.seen == [("a", b"".join(hmac.digest(token.key, label + v.encode(), "sha256") for v in ("x", "é", "x"))),  # type: ignore[arg-type]
                        ("b", b"".join(hmac.digest(token.key, label + v, "sha256") for v in (b"5", b"6", b"5")))]  # type: ignore[arg-type]
    # the real guard behind it: two values, one pseudonym, fail the run
    guard = engine._guard.guard  # type: ignore[attr-defined]
    with pytest.raises(CollisionError):
        guard.add("a", [b"\x01" * 17 + b"\x00" * 15, b"\x01" * 17 + b"\xff" * 15], None)


@needs_native
def test_arrow_policy_keep_drop_and_checks(issuer: Issuer) -> None:
    token = _token(issuer, "research-b")
    schema = pa.schema([("id", pa.int64()), ("pid", pa.string()), ("secret", pa.string()), ("t", pa.timestamp("s"))])
    batch = pa.RecordBatch.from_pydict({"id": [1, 2], "pid": ["a", "b"], "secret": ["s", "t"],
                                        "t": [dt.datetime(2026, 1, 1), None]}, schema=schema)
    policy = ColumnPolicy({"pid": ColumnRule("pid"), "secret": ColumnRule("secret", "drop")}, default="keep")
    out = Pseudonymiser(token, policy).pseudonymise_record_batch(batch)
    assert out.columns.schema == pa.schema([("id", pa.int64()), ("pid", pa.string()), ("t", pa.timestamp("s"))])
    assert out.columns.column("t").equals(batch.column("t"))  # type: ignore[union-attr]
    with pytest.raises(PolicyError, match="no rule"):
        Pseudonymiser(token, ColumnPolicy({"pid": ColumnRule("pid")})).pseudonymise_record_batch(batch)
    twice = pa.RecordBatch.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["pid", "pid"])
    with pytest.raises(PolicyError, match="duplicate"):
        Pseudonymiser(token, policy).pseudonymise_record_batch(twice)
    empty = Pseudonymiser(token, policy).pseudonymise_record_batch(batch.slice(0, 0))
    assert empty.columns.num_rows == 0 and empty.stats.rows_in == 0  # type: ignore[union-attr]


@needs_native
def test_arrow_column_refuses_what_it_cannot_read() -> None:
    """The facade's and the extension's own checks: unknown types, short buffers."""
    keyed = native.keyed(b"k" * 32, b"")
    plan = native.ColumnPlan.pseudonymise(PseudonymFormat("base32", 26), keyed)
    with pytest.raises(ValueError, match="does not read"):
        native.arrow_column(pa.array([1.5]), plan, "v")
    entry = plan._entry(copy_text=False)
    with pytest.raises(ValueError, match="shorter"):
        _extension().arrow_column(entry, 7, 10, 0, None, None, b"\x00" * 16)
    with pytest.raises(ValueError, match="unknown kind"):
        _extension().arrow_column(entry, 99, 1, 0, None, None, b"\x00" * 8)
    with pytest.raises(ValueError, match="offsets point outside"):
        _extension().arrow_column(entry, 0, 1, 0, None, np.array([0, 9], np.int32).tobytes(), b"abc")


# --- the collision check's table of recent MACs -------------------------------------------------------
@needs_native
def test_recent_macs_in_c_equal_the_numpy_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """RecentMacs.known/remember through the C engine and through numpy (its definition) agree, batch after
    batch: repeats within a batch, slots taken by other MACs, MACs seen before."""
    from pseudonymise.core.collisions import RecentMacs

    rng = random.Random(21)
    pool = [os.urandom(32) for _ in range(3000)]
    pool += [pool[0][:8] + os.urandom(24) for _ in range(5)]  # the same slot, other MACs
    batches = [b"".join(rng.choice(pool) for _ in range(rng.randrange(0, 2000))) for _ in range(12)]
    results = {}
    for mode in ("c", "numpy"):
        if mode == "numpy":
            monkeypatch.setattr(native, "_ext", None)
        table = RecentMacs(slots=1 << 10)
        results[mode] = [(table.known(RecentMacs.words(b)).tolist(), (table.unseen(b) if b else None)) for b in batches]
        results[mode] = [(k, None if u is None else u.tolist()) for k, u in results[mode]]
    assert results["c"] == results["numpy"]
    assert any(any(k) for k, _ in results["c"]) and any(u for _, u in results["c"])
    # unseen, MAC by MAC in order, from a dict of slots: a repeat within a batch is new only at its first place
    slots: dict[int, bytes] = {}
    expected: list[list[int] | None] = []
    for batch in batches:
        fresh = []
        for i in range(len(batch) // 32):
            mac = batch[32 * i:32 * i + 32]
            slot = int.from_bytes(mac[:8], sys.byteorder) & ((1 << 10) - 1)
            if slots.get(slot) != mac:
                fresh.append(i)
                slots[slot] = mac
        expected.append(None if not batch or len(fresh) == len(batch) // 32 else fresh)
    assert [u for _, u in results["c"]] == expected
    with pytest.raises(ValueError, match="power-of-two"):
        _extension().recent_known(bytearray(32 * 3), bytearray(3), b"")
    with pytest.raises(ValueError, match="power-of-two"):
        _extension().recent_unseen(bytearray(32 * 3), bytearray(3), b"")


# --- a column as a per-value function (SQLite's create_function) -------------------------------------
@needs_native
@pytest.mark.parametrize("fmt", [PseudonymFormat(), PseudonymFormat("hex", 64, "ID-"), PseudonymFormat("digits", 20, "№"),
                                 PseudonymFormat("base64url", 43)], ids=lambda f: f"{f.alphabet}{f.length}")
def test_value_function_gives_the_reference_for_every_value_sqlite_hands_over(fmt: PseudonymFormat) -> None:
    """Text (ASCII through the normaliser program, the rest through the callback: normalisers then NFC), integers
    of every size SQLite holds, bytes, NULL: the pseudonyms of tests/reference.py, each MAC handed on in blocks."""
    key = os.urandom(32)
    rule = ColumnRule("pid", normalise=("strip", "upper"), domain="ward")
    blocks: list[bytes] = []
    function = native.value_function(native.ColumnPlan.pseudonymise(
        fmt, native.keyed(key, PRIMARY_LABEL + b"ward\x00"), canonical=_canonical_callback(rule.normalise, "pid"),
        program=native.ascii_program(rule.normalise)), blocks.append, flush_every=2)
    values: list[Any] = [" p1 ", None, "Pe\u0301", "P\u00e9 ", 0, -(2**63), 2**63 - 1, b"\x00\xff", "", "x" * 100_000]
    got = [function(v) for v in values]
    function.flush()
    normalised = [v.strip().upper() if isinstance(v, str) else v for v in values]
    options = {"alphabet": fmt.alphabet, "length": fmt.length, "prefix": fmt.prefix}
    assert got == [None if v is None else reference.pseudonym(key, v, domain="ward", **options) for v in normalised]
    assert [len(b) for b in blocks] == [64, 64, 64, 64, 32]
    assert b"".join(blocks) == b"".join(hmac.digest(key, reference.LABEL + b"ward\x00" + reference.canonical(v), "sha256")
                                        for v in normalised if v is not None)
    assert (function.calls, function.nulls, function.values, function.error) == (10, 1, 9, None)


@needs_native
def test_value_function_refuses_a_float_keeps_the_error_and_fails_every_later_call() -> None:
    """sqlite3 replaces a function's exception with its own: the first one stays on the function, with its row."""
    function = native.value_function(native.ColumnPlan.pseudonymise(PseudonymFormat(), None), lambda _: None)
    assert function("a") is not None and function(None) is None
    with pytest.raises(TypeError, match=r"^floating-point$"):
        function(1234.5)
    assert isinstance(function.error, TypeError) and function.error_row == 3 and "1234" not in str(function.error)
    with pytest.raises(RuntimeError):
        function("b")
    assert isinstance(function.error, TypeError) and function.calls == 3


@needs_native
def test_value_function_keeps_the_flush_callables_error_and_close_drops_the_key() -> None:
    def refuse(macs: bytes) -> None:
        raise CollisionError("column 'pid': two different values gave the same pseudonym in this run")

    function = native.value_function(native.ColumnPlan.pseudonymise(PseudonymFormat(), native.keyed(b"k" * 32, b"")),
                                      refuse, flush_every=2)
    function("a")
    with pytest.raises(CollisionError):
        function("b")
    assert isinstance(function.error, CollisionError) and function.error_row == 2
    other = native.value_function(native.ColumnPlan.pseudonymise(PseudonymFormat(), native.keyed(b"k" * 32, b"")),
                                  lambda _: None)
    other.close()
    with pytest.raises(RuntimeError, match="closed"):
        other("a")
    with pytest.raises(ValueError, match="escrow"):  # escrow and secondary input checks are not for this path
        native.value_function(native.ColumnPlan.pseudonymise(PseudonymFormat(), None, collect=True), lambda _: None)


@needs_native
def test_sqlite_register_only_through_the_sqlite3_modules_own_library() -> None:
    """SQLite's own function is registered only when the libsqlite3 at hand is the one the sqlite3 module's extension
    resolves to, at its version; otherwise nothing is registered and the caller uses create_function."""
    import sqlite3

    conn = sqlite3.connect(":memory:")
    function = native.value_function(native.ColumnPlan.pseudonymise(PseudonymFormat(), native.keyed(b"k" * 32, b"")),
                                     lambda _: None)
    major, minor, patch = sqlite3.sqlite_version_info
    version = major * 1_000_000 + minor * 1_000 + patch
    assert not _extension().sqlite_register(conn, "f", function, True, version + 1, sys.modules["_sqlite3"].__file__)
    assert not _extension().sqlite_register(conn, "f", function, True, version, "/nonexistent/_sqlite3.so")
    with pytest.raises(sqlite3.OperationalError, match="no such function"):
        conn.execute("SELECT f('x')")
    assert native.sqlite_register(conn, "f", function, deterministic=True)
    assert conn.execute("SELECT f('x')").fetchone() == (reference.encode(hmac.digest(b"k" * 32, b"x", "sha256")),)
    native.sqlite_unregister(conn, "f")
    with pytest.raises(sqlite3.OperationalError, match="no such function"):
        conn.execute("SELECT f('x')")


@needs_native
def test_arrow_columns_side_by_side_equal_the_reference_and_fail_as_in_order(issuer: Issuer) -> None:
    """hash_columns_side_by_side (the file path) gives every column's pseudonyms as docs/design.md §4 says, the same
    counts, and of two failing columns the error of the first, once both halves are done."""
    token = _token(issuer, "research-b")
    policy = ColumnPolicy({c: ColumnRule(c) for c in ("a", "b", "c")}, default="keep")
    a = pa.array([f"P{i}" for i in range(3000)] + [None, "é"])
    b = pa.array([None if i % 7 == 0 else i for i in range(3002)], pa.int64())
    c = pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=i) for i in range(3002)], pa.date32())
    batch = pa.RecordBatch.from_arrays([a, b, c, pa.array(range(3002))], names=["a", "b", "c", "id"])
    engine = Pseudonymiser(token, policy)
    engine.hash_columns_side_by_side()
    out = engine.pseudonymise_record_batch(batch)
    assert engine._beside is not None and out.stats.nulls == 1 + 429
    for name, column in (("a", a), ("b", b), ("c", c)):
        assert out.columns.column(name).to_pylist() == [None if v is None else reference.pseudonym(token.key, v)
                                                        for v in column.to_pylist()]
    assert out.columns.column("id").to_pylist() == list(range(3002))
    engine.finish()
    assert engine._beside is None

    bad = pa.array([b"\xff"], pa.binary()).cast(pa.string(), safe=False)  # not UTF-8
    failing = pa.RecordBatch.from_arrays([bad, pa.array([1]), bad, pa.array([1])], names=["a", "b", "c", "id"])
    engine = Pseudonymiser(token, policy)
    engine.hash_columns_side_by_side()
    with pytest.raises(InvalidTextError, match="column 'a'"):  # 'c' fails too, on the helper thread
        engine.pseudonymise_record_batch(failing)
    failing = pa.RecordBatch.from_arrays([pa.array(["x"]), pa.array([1]), bad, pa.array([1])], names=["a", "b", "c", "id"])
    with pytest.raises(InvalidTextError, match="column 'c'"):
        engine.pseudonymise_record_batch(failing)
    engine.close()
    assert engine._beside is None
