"""The pseudonym engines (docs/design.md §4), checked against an independent reimplementation with stdlib hmac.

The column policy alone is tested in test_policy.py, the MAC primitives in test_mac.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
from hypothesis import given, settings
from hypothesis import strategies as st
from pseudonymise.core import formats
from pseudonymise.core.errors import CollisionError, PolicyError, TokenKindError, UnsupportedTypeError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser, _Escrowed
from pseudonymise.core.tokens import Token, verify_token

from tests.core.conftest import Mint

REPO = Path(__file__).resolve().parents[2]


# --- the reference: docs/design.md §4 steps 2-5 written out again -----------------------------------
def reference_canonical(value: Any) -> bytes:
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value).encode("utf-8")
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    raise AssertionError(f"the reference does not handle {type(value)}")


def reference_encode(mac: bytes, fmt: PseudonymFormat) -> str:
    if fmt.alphabet == "hex":
        text = mac.hex()
    elif fmt.alphabet == "base32":
        text = base64.b32encode(mac).decode().lower().replace("=", "")
    elif fmt.alphabet == "base64url":
        text = base64.urlsafe_b64encode(mac).decode().replace("=", "")
    else:
        text = str(int.from_bytes(mac, "big") % 10**fmt.length).rjust(fmt.length, "0")
    return fmt.prefix + text[: fmt.length]


def reference(key: bytes, value: Any, fmt: PseudonymFormat, domain: str = "") -> str:
    message = b"pseudonymise/v1\x00" + domain.encode("utf-8") + b"\x00" + reference_canonical(value)
    return reference_encode(hmac.new(key, message, hashlib.sha256).digest(), fmt)


def reference_secondary(key: bytes, pseudonym: str, fmt: PseudonymFormat) -> str:
    return reference_encode(
        hmac.new(key, b"pseudonymise/v1/secondary\x00" + pseudonym.encode("utf-8"), hashlib.sha256).digest(), fmt
    )


def reference_secondary_key(project_key: bytes, source_project: str) -> bytes:
    """docs/design.md §4 step 5 (v1.1), RFC 5869 HKDF-SHA256 with an empty salt, written out with hmac."""
    prk = hmac.new(b"", project_key, hashlib.sha256).digest()
    info = b"pseudonymise/v1/secondary-key\x00" + source_project.encode("utf-8")
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def run(token: Token, values: list[Any], column: str = "id", **rule: Any) -> list[str | None]:
    policy = ColumnPolicy({column: ColumnRule(column, **rule)})
    return Pseudonymiser(token, policy).pseudonymise_batch({column: values}).columns[column]


# --- exact pseudonyms ---------------------------------------------------------------------------
FORMAT_PROJECTS = ["fmt-hex-64", "fmt-base32-52", "fmt-base64url-43", "fmt-digits-77",
                   "fmt-hex-16", "fmt-base32-13", "fmt-base64url-11", "fmt-digits-20"]
identifiers = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
                       | st.integers(-(10**30), 10**30) | st.booleans(), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(project=st.sampled_from(FORMAT_PROJECTS), values=identifiers,
       domain=st.sampled_from(["", "patients", "visité"]))
def test_pseudonyms_equal_the_reference(long_lived_issuer: Issuer, long_lived_mint: Mint, project: str,
                                        values: list[Any], domain: str) -> None:
    token = long_lived_mint(project)
    key = long_lived_issuer.project(project).key
    assert run(token, values, domain=domain) == [reference(key, v, token.format, domain) for v in values]


def test_default_format_pseudonym_equals_the_reference(issuer: Issuer, mint: Mint) -> None:
    token = mint("research-b")
    out = run(token, ["P100000", 42, "Zoë"])
    key = issuer.project("research-b").key
    assert out == [reference(key, v, PseudonymFormat()) for v in ["P100000", 42, "Zoë"]]
    assert all(len(p) == 26 for p in out if p)


def test_deterministic_across_processes(issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    values = ["P100000", "Zoë", "", "x" * 1000, 12345]
    script = (
        "import json, os, sys\n"
        "from pseudonymise.core.policy import ColumnPolicy\n"
        "from pseudonymise.core.pseudonymiser import Pseudonymiser\n"
        "from pseudonymise.core.tokens import TrustedKeys, verify_token\n"
        "token = verify_token(os.environ['PSEUDO_TEST_TOKEN'], TrustedKeys.from_jwks(os.environ['PSEUDO_TEST_JWKS']))\n"
        "values = json.loads(sys.stdin.read())\n"
        "out = Pseudonymiser(token, ColumnPolicy.pseudonymise('id')).pseudonymise_batch({'id': values})\n"
        "print(json.dumps(out.columns['id']))\n"
    )
    env = {**os.environ, "PSEUDO_TEST_TOKEN": raw, "PSEUDO_TEST_JWKS": json.dumps(issuer.public_keys().to_jwks()),
           "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(values), capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60, check=True)
    here = run(verify_token(raw, issuer.public_keys()), values)
    assert json.loads(proc.stdout) == here
    assert here == [reference(issuer.project("research-a").key, v, PseudonymFormat()) for v in values]


def test_differ_across_projects(mint: Mint) -> None:
    values = [f"P{i:06d}" for i in range(200)]
    a, b, v = run(mint("research-a"), values), run(mint("research-b"), values), run(mint("vendor-x"), values)
    assert not set(a) & set(b)
    assert not set(a) & set(v)
    assert not set(b) & set(v)


def test_differ_across_domains(issuer: Issuer, mint: Mint) -> None:
    token = mint("research-a")
    values = [f"P{i:06d}" for i in range(100)]
    none, patients, visits = run(token, values), run(token, values, domain="patients"), run(token, values, domain="visits")
    assert not set(none) & set(patients)
    assert not set(patients) & set(visits)
    key = issuer.project("research-a").key
    assert patients == [reference(key, v, PseudonymFormat(), "patients") for v in values]


def test_same_across_tables_and_runs_without_domain(mint: Mint) -> None:
    token = mint("research-a")
    ids = ["P1", "P2", "P3"]
    patients = Pseudonymiser(token, ColumnPolicy.pseudonymise("patient_id")).pseudonymise_batch(
        {"patient_id": ids, "name": ["a", "b", "c"]})
    visits = Pseudonymiser(token, ColumnPolicy.pseudonymise("patient_id")).pseudonymise_batch(
        {"visit": [1, 2, 3, 4], "patient_id": ["P3", "P1", "P1", "P2"]})
    by_id = dict(zip(ids, patients.columns["patient_id"], strict=True))
    assert visits.columns["patient_id"] == [by_id["P3"], by_id["P1"], by_id["P1"], by_id["P2"]]
    # another column name, same identifier: the same pseudonym (the domain is empty by default)
    labs = Pseudonymiser(token, ColumnPolicy.pseudonymise("pid", default="error")).pseudonymise_batch({"pid": ["P2"]})
    assert labs.columns["pid"] == [by_id["P2"]]


def test_string_and_integer_spellings_meet(mint: Mint) -> None:
    token = mint("research-b")
    assert run(token, [123, "123", -7, "-7"]) == [run(token, [123])[0]] * 2 + [run(token, [-7])[0]] * 2
    assert run(token, [True])[0] == run(token, ["true"])[0] != run(token, [1])[0]


@pytest.mark.parametrize(
    ("normalise", "variants", "canonical_value"),
    [
        (("strip",), [" P100 ", "P100\t", "\nP100"], "P100"),
        (("upper",), ["p100", "P100"], "P100"),
        (("casefold",), ["STRASSE", "Straße", "strasse"], "strasse"),
        (("remove_whitespace",), ["P 1 0 0", " P100", "P\t100"], "P100"),
        (("remove:-.",), ["1-2.3", "12.3", "1.2-3", "123"], "123"),
        (("strip", "upper"), [" p100000 ", "P100000", "p100000"], "P100000"),
    ],
)
def test_normalisers_run_first(issuer: Issuer, mint: Mint, normalise: tuple[str, ...], variants: list[str],
                               canonical_value: str) -> None:
    out = run(mint("research-b"), variants, normalise=normalise)
    assert out == [reference(issuer.project("research-b").key, canonical_value, PseudonymFormat())] * len(variants)
    # without the normaliser the spellings stay apart
    assert len(set(run(mint("research-b"), variants))) == len(variants)


def test_null_stays_null_and_is_counted(mint: Mint) -> None:
    pseudonymiser = Pseudonymiser(mint("research-a"), ColumnPolicy({
        "id": ColumnRule("id"), "ward": ColumnRule("ward", "keep"), "name": ColumnRule("name", "drop")}))
    batch = pseudonymiser.pseudonymise_batch({"id": [None, "P1", None, "P2"], "ward": ["a", None, "c", "d"],
                                              "name": ["x", "y", None, "z"]})
    assert list(batch.columns) == ["id", "ward"]
    assert batch.columns["id"][0] is None and batch.columns["id"][2] is None
    assert None not in (batch.columns["id"][1], batch.columns["id"][3])
    assert batch.columns["ward"] == ["a", None, "c", "d"]
    assert batch.stats.as_dict() == {"rows_in": 4, "rows_out": 4, "nulls": 2, "values_pseudonymised": 2,
                                     "escrow_rows": 0}
    assert [item.pseudonym for item in batch.escrow] == [batch.columns["id"][1], batch.columns["id"][3]]
    pseudonymiser.pseudonymise_batch({"id": [None], "ward": [None], "name": [None]})
    assert pseudonymiser.stats.nulls == 3 and pseudonymiser.stats.rows_in == 5


def test_output_columns_follow_the_input_order_without_dropped(mint: Mint) -> None:
    policy = ColumnPolicy.from_mapping(json.loads((REPO / "include/policies/patients.json").read_text()))
    header = (REPO / "include/sample/patients.csv").read_text().splitlines()[0].split(",")
    assert Pseudonymiser(mint("research-a"), policy).output_columns(header) == [
        "patient_id", "birth_year", "visit_date", "diagnosis_code", "ward"]


def test_randomised_never_repeats(issuer: Issuer, mint: Mint) -> None:
    token = mint("random-r")
    pseudonymiser = Pseudonymiser(token, ColumnPolicy.pseudonymise("id"))
    out = pseudonymiser.pseudonymise_batch({"id": ["P100000"] * 10_000})
    assert len(set(out.columns["id"])) == 10_000
    assert all(p is not None and len(p) == 26 for p in out.columns["id"])
    assert reference(issuer.project("random-r").key, "P100000", PseudonymFormat()) not in set(out.columns["id"])
    assert len(out.escrow) == 10_000  # one escrow row per occurrence
    again = pseudonymiser.pseudonymise_batch({"id": ["P100000"]}).columns["id"][0]
    assert again not in set(out.columns["id"])


# --- secondary -------------------------------------------------------------------------------
def test_secondary_equals_the_reference(issuer: Issuer, mint: Mint) -> None:
    """Second-level pseudonyms are the design's HMAC under the secondary key derived from the vendor
    project's key (v1.1), not under that key itself: tokens issued before v1.1 gave other values."""
    first = run(mint("research-a"), [f"P{i}" for i in range(50)])
    secondary = mint("vendor-x", "secondary", source_project="research-a")
    engine = SecondaryPseudonymiser(secondary, ColumnPolicy.pseudonymise("patient_id"))
    out = engine.pseudonymise_batch({"patient_id": [*first, None], "ward": ["w"] * 51})
    project_key = issuer.project("vendor-x").key
    key = reference_secondary_key(project_key, "research-a")
    assert secondary.key == key != project_key
    assert out.columns["patient_id"] == [reference_secondary(key, p, secondary.format) for p in first] + [None]  # type: ignore[arg-type]
    before_v1_1 = [reference_secondary(project_key, p, secondary.format) for p in first]  # type: ignore[arg-type]
    assert not set(before_v1_1) & set(out.columns["patient_id"])
    assert out.columns["ward"] == ["w"] * 51
    assert out.stats.nulls == 1 and out.stats.values_pseudonymised == 50


def test_secondary_with_its_own_format(issuer: Issuer) -> None:
    issuer.create_project("vendor-digits", format=PseudonymFormat("digits", 24, "V"))
    first = run(verify_token(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()), ["P1", "P2"])
    secondary = verify_token(issuer.issue("vendor-digits", "secondary", source_project="research-a"),
                             issuer.public_keys())
    out = SecondaryPseudonymiser(secondary, ColumnPolicy.pseudonymise("id")).pseudonymise_values(first, "id")
    key = reference_secondary_key(issuer.project("vendor-digits").key, "research-a")
    assert out == [reference_secondary(key, p, PseudonymFormat("digits", 24, "V")) for p in first]  # type: ignore[arg-type]
    assert all(p is not None and len(p) == 25 and p.startswith("V") for p in out)


def test_secondary_is_not_linkable(issuer: Issuer, mint: Mint) -> None:
    issuer.create_project("vendor-y")
    originals = [f"P{i:06d}" for i in range(300)]
    first = run(mint("research-a"), originals)
    x = SecondaryPseudonymiser(mint("vendor-x", "secondary", source_project="research-a"),
                               ColumnPolicy.pseudonymise("id")).pseudonymise_values(first, "id")
    y = SecondaryPseudonymiser(mint("vendor-y", "secondary", source_project="research-a"),
                               ColumnPolicy.pseudonymise("id")).pseudonymise_values(first, "id")
    assert not set(x) & set(first)  # not the first-level pseudonyms
    assert not set(x) & set(y)  # two vendors cannot correlate
    assert not set(x) & set(run(mint("vendor-x"), originals))  # nor with the vendor's own first-level ones
    assert not set(x) & set(originals)
    # deterministic: the same first-level pseudonym always gives the same second-level one
    again = SecondaryPseudonymiser(mint("vendor-x", "secondary", source_project="research-a"),
                                   ColumnPolicy.pseudonymise("id")).pseudonymise_values(first, "id")
    assert again == x


def test_secondary_refuses_wrong_tokens_values_and_rules(mint: Mint) -> None:
    with pytest.raises(TokenKindError):
        SecondaryPseudonymiser(mint("research-a"), ColumnPolicy.pseudonymise("id"))
    with pytest.raises(TokenKindError):
        Pseudonymiser(mint("vendor-x", "secondary", source_project="research-a"), ColumnPolicy.pseudonymise("id"))
    with pytest.raises(TokenKindError):
        Pseudonymiser(mint("research-a", "reverse"), ColumnPolicy.pseudonymise("id"))
    secondary = mint("vendor-x", "secondary", source_project="research-a")
    with pytest.raises(PolicyError, match="normalise/domain"):
        SecondaryPseudonymiser(secondary, ColumnPolicy({"id": ColumnRule("id", normalise=("upper",))}))
    engine = SecondaryPseudonymiser(secondary, ColumnPolicy.pseudonymise("id"))
    with pytest.raises(PolicyError, match="'id'") as info:
        engine.pseudonymise_values(["abc", 98765], "id")
    assert "98765" not in str(info.value)


# --- secondary input: the source project's pseudonyms only (v1.1) ------------------------------
def _bad_inputs(fmt: PseudonymFormat, good: str) -> list[str]:
    """Values a format's pseudonyms never are: raw identifiers, and near misses of ``good``."""
    body = good[len(fmt.prefix):]
    other = {"hex": "g", "base32": "1", "base64url": "+", "digits": "a"}[fmt.alphabet]
    return ["P100000", "", " " + good, good + " ", good[:-1], good + body[-1], fmt.prefix + other + body[1:],
            "Q" + good[1:] if fmt.prefix else good.upper() if fmt.alphabet == "base32" else good.lower() + "É",
            good[:5] + "\n" + good[5:], good.replace(body[0], "é", 1), "\ud800" + good[1:], good + "\x00"]


@pytest.mark.parametrize("project", ["research-a", "src-hex", "src-b64", "src-digits"])
def test_secondary_refuses_values_not_in_the_source_format(issuer: Issuer, mint: Mint, project: str) -> None:
    """Issue 11 item 5: a secondary token applied to raw identifiers pseudonymised them. It now refuses
    every value that is not written in the source project's format, naming the column and how many."""
    formats_ = {"src-hex": PseudonymFormat("hex", 20, "H-"), "src-b64": PseudonymFormat("base64url", 22, ""),
                "src-digits": PseudonymFormat("digits", 24, "9")}
    if project in formats_:
        issuer.create_project(project, format=formats_[project])
    good = run(mint(project), [f"P{i}" for i in range(20)])
    engine = SecondaryPseudonymiser(mint("vendor-x", "secondary", source_project=project),
                                    ColumnPolicy.pseudonymise("pid", default="keep"))
    assert len(engine.pseudonymise_values([*good, None], "pid")) == 21  # the source's pseudonyms pass
    bad = _bad_inputs(engine.source_format, good[0])  # type: ignore[arg-type]
    for value in bad:
        assert not engine.source_format.matches(value), repr(value)
        with pytest.raises(PolicyError) as info:
            engine.pseudonymise_batch({"pid": [*good[:3], value, None], "ward": ["w"] * 5})
        message = str(info.value)
        assert "'pid'" in message and "1 of 4 values" in message and repr(project) in message
        if value.strip():
            assert value not in message
        for g in good[:3]:
            assert g not in message
    with pytest.raises(PolicyError, match=f"'pid': {len(bad)} of {len(bad) + 1} values"):
        engine.pseudonymise_values([good[0], *bad], "pid")
    assert engine.stats.values_pseudonymised == 0 and engine.stats.rows_in == 0


def test_secondary_input_check_equals_the_definition(long_lived_mint: Mint) -> None:
    """count_mismatches (whole batches at once) counts exactly the values ``matches`` refuses."""
    for project in ("fmt-hex-16", "fmt-base32-52", "fmt-base64url-11", "fmt-digits-77"):
        fmt = long_lived_mint(project).format
        good = fmt.encode_many(os.urandom(32 * 200))
        mixed = [v if i % 7 else _bad_inputs(fmt, v)[i % 12] for i, v in enumerate(good)]
        symbol = {"hex": "[0-9a-f]", "base32": "[a-z2-7]", "base64url": "[A-Za-z0-9_-]", "digits": "[0-9]"}
        pattern = re.escape(fmt.prefix) + symbol[fmt.alphabet] + f"{{{fmt.length}}}"
        expected = sum(re.fullmatch(pattern, v) is None for v in mixed)
        assert expected == sum(1 for v in mixed if not fmt.matches(v)) == fmt.count_mismatches(mixed) > 0
        assert fmt.count_mismatches(good) == 0 and fmt.count_mismatches([]) == 0


@settings(max_examples=300, deadline=None)
@given(data=st.data(), fmt=st.sampled_from([PseudonymFormat("hex", 16, "a-"), PseudonymFormat("base32", 13, "é"),
                                            PseudonymFormat("base64url", 11, "-_x"), PseudonymFormat("digits", 20)]))
def test_fuzz_batch_check_counts_exactly_the_values_matches_refuses(data: st.DataObject, fmt: PseudonymFormat) -> None:
    """Values near the format (its symbols, prefix characters, newlines, other bytes, lengths around its
    width): the whole-batch check and the per-value definition always agree."""
    chars = st.sampled_from(sorted(set(formats.SYMBOLS[fmt.alphabet][:6] + fmt.prefix + "\n\\é\ud800Z0")))
    near = st.lists(chars, min_size=fmt.width - 2, max_size=fmt.width + 2).map("".join)
    good = st.binary(min_size=32, max_size=32).map(fmt.encode)
    values = data.draw(st.lists(good | near, max_size=12))
    assert fmt.count_mismatches(values) == sum(1 for v in values if not fmt.matches(v))


def test_secondary_token_without_source_format_is_refused(mint: Mint) -> None:
    """A Token made without source_format (as tokens issued before v1.1 are): re-issue it."""
    import dataclasses

    old = dataclasses.replace(mint("vendor-x", "secondary", source_project="research-a"), source_format=None)
    with pytest.raises(TokenKindError, match="re-issue"):
        SecondaryPseudonymiser(old, ColumnPolicy.pseudonymise("id"))


# --- what escrow must seal: a deterministic run seals a value once --------------------------------
def sealed(batch: object) -> list[str]:
    return [item.pseudonym for item in batch.escrow]  # type: ignore[attr-defined]


def test_later_batches_do_not_list_what_an_earlier_batch_sealed(mint: Mint) -> None:
    engine = Pseudonymiser(mint("research-a"), ColumnPolicy.pseudonymise("a", "b"))
    first = engine.pseudonymise_batch({"a": ["x", "y", "x"], "b": ["z", None, "x"]})
    assert len(first.escrow) == 4  # b's "x" was listed by column a; repeats within a column are the writer's
    second = engine.pseudonymise_batch({"a": ["x", "w"], "b": ["z", "y"]})
    assert sealed(second) == [second.columns["a"][1]]  # only "w" is new to the run
    assert second.columns["a"][0] == first.columns["a"][0]


def test_randomised_and_single_columns_are_not_filtered(mint: Mint) -> None:
    engine = Pseudonymiser(mint("random-r"), ColumnPolicy.pseudonymise("id"))
    engine.pseudonymise_batch({"id": ["x"]})
    assert len(engine.pseudonymise_batch({"id": ["x", "x"]}).escrow) == 2  # one row per occurrence
    deterministic = Pseudonymiser(mint("research-a"), ColumnPolicy.pseudonymise("id"))
    rule, items = ColumnRule("id"), []  # type: ignore[var-annotated]
    deterministic.pseudonymise_values(["x"], rule, escrow=items)
    deterministic.pseudonymise_values(["x"], rule, escrow=items)
    assert len(items) == 2  # outside a batch nothing is remembered


def test_every_distinct_value_is_sealed_once_per_run(mint: Mint) -> None:
    """The run remembers every value it sealed (an exact set, nothing forgotten): over batches that repeat values
    at random, each distinct value is listed for escrow in exactly one batch, and none is missing."""
    engine = Pseudonymiser(mint("research-a"), ColumnPolicy.pseudonymise("id"))
    rng = random.Random(5)
    values = [f"P{i:06d}" for i in range(3000)]
    listed: list[str] = []
    written: set[str] = set()
    for _ in range(8):
        out = engine.pseudonymise_batch({"id": [rng.choice(values) for _ in range(2000)]})
        listed += list(dict.fromkeys(sealed(out)))  # repeats within a batch are the writer's to drop
        written.update(out.columns["id"])
    assert len(listed) == len(set(listed))  # no value listed by two batches
    assert set(listed) == written  # every pseudonym written has its escrow listed


def test_past_the_set_limit_values_fall_back_to_forgetting() -> None:
    escrowed = _Escrowed(limit=1)
    a, b = os.urandom(32), os.urandom(32)
    c = b[:8] + os.urandom(24)  # the slot of b in the table that forgets
    assert escrowed.unsealed(a + b) is None  # nothing listed yet: all positions are new
    # a filled the set; b was left out of it, into the table that forgets
    assert escrowed.unsealed(a + b + c).tolist() == [2]  # a in the set, b in the table, c new (and takes b's slot)
    assert escrowed.unsealed(a + b).tolist() == [1]  # b forgotten: listed again, escrow keeps its first row


# --- collisions ------------------------------------------------------------------------------
@pytest.fixture
def constant_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MAC encodes to one base32 text: a stand-in for a format far too short for the data."""
    monkeypatch.setitem(formats._ENCODERS, "base32", lambda _mac, length: "a" * length)


def test_collision_of_two_values_fails_the_run(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("patient_id"))
    with pytest.raises(CollisionError) as info:
        engine.pseudonymise_batch({"patient_id": ["P100000", "P200000"]})
    assert "'patient_id'" in str(info.value)
    assert "P100000" not in str(info.value) and "P200000" not in str(info.value)


def test_repeated_value_is_no_collision(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("id"))
    out = engine.pseudonymise_batch({"id": ["P1", "P1", None, "P1"]})
    assert out.columns["id"] == ["a" * 26, "a" * 26, None, "a" * 26]
    engine.pseudonymise_batch({"id": ["P1"]})
    assert engine.stats.values_pseudonymised == 4


def test_collision_across_batches_and_columns_of_one_run(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("a", "b"))
    engine.pseudonymise_batch({"a": ["x"], "b": ["x"]})  # one value in two columns: one MAC
    with pytest.raises(CollisionError):
        engine.pseudonymise_batch({"a": ["y"], "b": ["x"]})
    # a new run starts with a fresh memory
    Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("a")).pseudonymise_batch({"a": ["y"]})


def test_collision_between_domains(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy({"a": ColumnRule("a", domain="d1"),
                                                             "b": ColumnRule("b", domain="d2")}))
    with pytest.raises(CollisionError):
        engine.pseudonymise_batch({"a": ["x"], "b": ["x"]})


def test_randomised_collision_fails_even_for_one_value(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("random-r"), ColumnPolicy.pseudonymise("id"))
    with pytest.raises(CollisionError):
        engine.pseudonymise_batch({"id": ["P1", "P1"]})


def test_secondary_collision(mint: Mint, constant_encoder: None) -> None:
    engine = SecondaryPseudonymiser(mint("vendor-x", "secondary", source_project="research-a"),
                                    ColumnPolicy.pseudonymise("id"))
    assert engine.pseudonymise_values(["b" * 26, "b" * 26], "id") == ["a" * 26] * 2
    with pytest.raises(CollisionError):
        engine.pseudonymise_values(["c" * 26], "id")


# --- the policy applied to a batch --------------------------------------------------------------
def test_column_named_by_the_policy_missing_from_the_source(mint: Mint) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("patient_id", default="keep"))
    with pytest.raises(PolicyError) as info:
        engine.pseudonymise_batch({"id": ["P1"], "ward": ["w"]})
    assert "'patient_id'" in str(info.value) and "'ward'" in str(info.value)
    assert "P1" not in str(info.value)


def test_unlisted_column_with_default_error(mint: Mint) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy({"id": ColumnRule("id")}))
    assert engine.policy.default == "error"
    with pytest.raises(PolicyError) as info:
        engine.pseudonymise_batch({"id": ["P1"], "email": ["someone@example.org"]})
    assert "'email'" in str(info.value)
    assert "someone@example.org" not in str(info.value)
    for default, expected in (("keep", ["id", "email"]), ("drop", ["id"])):
        out = Pseudonymiser(mint("research-b"), ColumnPolicy({"id": ColumnRule("id")}, default)).pseudonymise_batch(
            {"id": ["P1"], "email": ["e"]})
        assert list(out.columns) == expected


def test_float_column_is_refused_naming_it(mint: Mint) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("weight"))
    with pytest.raises(UnsupportedTypeError) as info:
        engine.pseudonymise_batch({"weight": ["x", 71.25]})
    assert "'weight'" in str(info.value) and "71.25" not in str(info.value)


def test_ragged_batch_is_refused(mint: Mint) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("a", default="keep"))
    with pytest.raises(PolicyError, match="different lengths"):
        engine.pseudonymise_batch({"a": ["1", "2"], "b": ["x"]})
