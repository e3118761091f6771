"""The C engine (core/_native.c) through its facade (core/native.py) against the definitions: every result
equals an independent computation.

Pseudonyms are compared with ``hmac`` + the per-value encoders of formats.py, COPY text with the
pure-Python reader; escrow sealing (the engine's ``seal_rows``) is checked in test_sealer.py against the
``cryptography`` package's AES-GCM and the GCM specification's vectors. Whole runs on PostgreSQL are
compared with the same runs made without the C engine (``PSEUDONYMISE_PURE_PYTHON=1`` in a subprocess).
"""

from __future__ import annotations

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

import pytest
import sqlalchemy as sa
from pseudonymise.core import native
from pseudonymise.core.copytext import CopyBlock, unescape
from pseudonymise.core.errors import DataIOError, InvalidTextError, PolicyError
from pseudonymise.core.formats import ALPHABETS, PseudonymFormat
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.mac import PRIMARY_LABEL, SECONDARY_LABEL
from pseudonymise.core.policy import ColumnPolicy, ColumnRule, build_normaliser
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser
from pseudonymise.core.sealer import EscrowBlocks
from pseudonymise.core.tokens import Token, verify_token

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
