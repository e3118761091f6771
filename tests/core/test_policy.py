"""The column policy (DESIGN §4 step 1): rules, defaults, the policy file, and the normalisers a rule may name."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pseudonymise.core.errors import PolicyError
from pseudonymise.core.policy import ColumnPolicy, ColumnRule, build_normaliser

REPO = Path(__file__).resolve().parents[2]


# --- normalisers ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("names", "value", "expected"),
    [
        (["strip"], "  p-100 \t\n", "p-100"),
        (["upper"], "p-100ß", "P-100SS"),
        (["lower"], "ÉCOLE", "école"),
        (["casefold"], "Straße", "strasse"),
        (["remove_whitespace"], " a b\tc\u00a0d\ne ", "abcde"),
        (["remove:-."], "12-34.56-7", "1234567"),
        (["remove:/ "], "01 / 02 / 2026", "01022026"),
        (["strip", "upper"], " p100000 ", "P100000"),
        (["remove:-", "casefold", "strip"], " AB-cd ", "abcd"),
    ],
)
def test_normalisers(names: list[str], value: str, expected: str) -> None:
    normalise = build_normaliser(names, "c")
    assert normalise is not None
    assert normalise(value) == expected


def test_normalisers_leave_other_types_alone() -> None:
    normalise = build_normaliser(["strip", "upper"], "c")
    assert normalise is not None
    assert normalise(42) == 42
    assert normalise(b" x ") == b" x "
    day = dt.date(2026, 1, 1)
    assert normalise(day) is day


def test_no_normaliser_is_none() -> None:
    assert build_normaliser([], "c") is None


@pytest.mark.parametrize("name", ["trim", "remove:", "UPPER", "", "remove"])
def test_unknown_normaliser_is_refused_naming_column_and_normaliser(name: str) -> None:
    with pytest.raises(PolicyError) as info:
        build_normaliser(["strip", name], "patient_id")
    assert "'patient_id'" in str(info.value)
    assert repr(name) in str(info.value)


# --- rules and policies -----------------------------------------------------------------------
def test_unknown_normaliser_in_a_policy() -> None:
    with pytest.raises(PolicyError) as info:
        ColumnPolicy.from_mapping({"columns": {"patient_id": {"normalise": ["strip", "trim"]}}})
    assert "'patient_id'" in str(info.value) and "'trim'" in str(info.value)
    with pytest.raises(PolicyError):
        ColumnPolicy.from_mapping({"columns": {"patient_id": {"normalise": "remove:"}}})


def test_unknown_action_and_rule_fields() -> None:
    with pytest.raises(PolicyError) as info:
        ColumnPolicy.from_mapping({"columns": {"patient_id": "hash"}})
    assert "'hash'" in str(info.value) and "'patient_id'" in str(info.value)
    with pytest.raises(PolicyError):
        ColumnPolicy.from_mapping({"columns": {"patient_id": {"action": "encrypt"}}})
    with pytest.raises(PolicyError, match="salt"):
        ColumnPolicy.from_mapping({"columns": {"patient_id": {"action": "pseudonymise", "salt": "x"}}})
    with pytest.raises(PolicyError, match="only apply"):
        ColumnPolicy.from_mapping({"columns": {"name": {"action": "keep", "normalise": ["strip"]}}})
    with pytest.raises(PolicyError):
        ColumnPolicy.from_mapping({"columns": {"id": 5}})
    with pytest.raises(PolicyError, match="default"):
        ColumnPolicy.from_mapping({"columns": {"id": "pseudonymise"}, "default": "ignore"})
    with pytest.raises(PolicyError, match="names no column"):
        ColumnPolicy.from_mapping({"columns": {}})
    with pytest.raises(PolicyError, match="NUL"):
        ColumnRule("id", domain="a\x00b")


def test_policy_forms_and_round_trip(tmp_path: Path) -> None:
    policy = ColumnPolicy.from_file(REPO / "include/policies/patients.json")
    assert policy.rules["patient_id"] == ColumnRule("patient_id", "pseudonymise", ("strip", "upper"))
    assert policy.rules["name"].action == "drop"
    assert policy.pseudonymised_columns == ["patient_id"]
    assert ColumnPolicy.from_mapping(policy.to_mapping()) == policy
    assert ColumnPolicy.from_mapping({"columns": ["a", "b"]}).pseudonymised_columns == ["a", "b"]
    assert ColumnPolicy.from_mapping({"a": "pseudonymise", "b": "keep"}).default == "error"
    with pytest.raises(PolicyError, match="JSON object"):
        ColumnPolicy.from_mapping(["a", "b"])  # type: ignore[arg-type]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PolicyError, match=r"bad\.json"):
        ColumnPolicy.from_file(tmp_path / "bad.json")
    with pytest.raises(PolicyError):
        ColumnPolicy.from_file(tmp_path / "missing.json")
