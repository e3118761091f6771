"""The column policy (docs/design.md §4 step 1): rules, defaults, the policy file, and the normalisers a rule may name."""

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


# --- de-identifying actions --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"action": "date_shift", "max_days": 30}, r"column 'd': date_shift parameter 'subject' is missing; name the"),
        ({"action": "date_shift", "subject": "d", "max_days": 30}, r"'subject' names the shifted column itself"),
        ({"action": "date_shift", "subject": "pid", "max_days": 0},
         r"column 'd': date_shift parameter 'max_days' must be a whole number of days from 1 to 3652058; give"),
        ({"action": "date_shift", "subject": "pid", "max_days": -3}, r"'max_days' must be a whole number"),
        ({"action": "date_shift", "subject": "pid", "max_days": 2.5}, r"'max_days' must be a whole number"),
        ({"action": "date_shift", "subject": "pid", "max_days": True}, r"'max_days' must be a whole number"),
        ({"action": "date_shift", "subject": "pid"}, r"'max_days' must be a whole number"),
        ({"action": "date_shift", "subject": "pid", "max_days": 3, "width": 5},
         r"column 'd': width do\(es\) not apply to the action 'date_shift'; it takes subject, max_days, domain"),
        ({"action": "generalise"}, r"column 'd': generalise needs exactly one of 'to' \(dates: year, month, iso_week\)"),
        ({"action": "generalise", "to": "year", "prefix": 2}, r"needs exactly one of .*; it has to, prefix"),
        ({"action": "generalise", "to": "decade"}, r"generalise parameter 'to' is unknown; use year, month, iso_week"),
        ({"action": "generalise", "width": 0}, r"generalise parameter 'width' must be a whole number above 0"),
        ({"action": "generalise", "width": -5}, r"'width' must be a whole number above 0"),
        ({"action": "generalise", "width": 5, "bottom": 20, "top": 92},
         r"'top' must be bottom plus a multiple of 'width'; move it to a band edge"),
        ({"action": "generalise", "width": 5, "top": 92}, r"'top' must be 0 plus a multiple of 'width'"),
        ({"action": "generalise", "width": 5, "bottom": 90, "top": 20}, r"'top' must be above 'bottom'"),
        ({"action": "generalise", "prefix": 3, "top": 90}, r"'top' only applies to integer bands"),
        ({"action": "generalise", "prefix": 0}, r"'prefix' must be a whole number above 0"),
        ({"action": "mask", "char": "#"}, r"mask needs exactly one of 'keep_first' or 'keep_last'"),
        ({"action": "mask", "keep_first": 1, "keep_last": 1}, r"mask needs exactly one of"),
        ({"action": "mask", "keep_last": -1}, r"mask parameter 'keep_last' must be a whole number, 0 or more"),
        ({"action": "mask", "keep_last": 4, "char": "**"}, r"mask parameter 'char' must be one character"),
        ({"action": "suppress", "max_days": 3}, r"max_days do\(es\) not apply to the action 'suppress'; it takes no"),
        ({"action": "mask", "keep_last": 4, "colour": "red"}, r"unknown rule field\(s\) \['colour'\]"),
    ],
)
def test_de_identifying_rules_are_checked_naming_column_parameter_and_fix(rule: dict[str, object],
                                                                          message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        ColumnPolicy.from_mapping({"columns": {"pid": "pseudonymise", "d": rule}})


def test_a_date_shift_subject_must_be_a_source_column() -> None:
    policy = ColumnPolicy.from_mapping({"columns": {"pid": "pseudonymise", "d": {
        "action": "date_shift", "subject": "patient", "max_days": 30}}})
    with pytest.raises(PolicyError, match=r"column 'd': date_shift parameter 'subject' names 'patient', which is not "
                                          r"in the source; name a source column"):
        policy.plan(["pid", "d"])
    keep_rest = ColumnPolicy(policy.rules, "drop")
    assert [r.action for r in keep_rest.plan(["pid", "d", "patient"])] == ["pseudonymise", "date_shift", "drop"]


def test_de_identifying_rules_round_trip_and_name_their_columns(tmp_path: Path) -> None:
    policy = ColumnPolicy.from_file(REPO / "include" / "policies" / "research_extract.json")
    again = ColumnPolicy.from_mapping(policy.to_mapping())
    assert again == policy
    assert policy.rules["visit_date"] == ColumnRule("visit_date", "date_shift", subject="patient_id", max_days=30)
    assert policy.rules["birth_year"] == ColumnRule("birth_year", "generalise", width=5)
    assert policy.rules["postcode"] == ColumnRule("postcode", "generalise", prefix=3)
    assert set(policy.deidentified_columns) == {"visit_date", "birth_year", "postcode"}
    assert set(policy.text_columns) == {"patient_id", "birth_year", "postcode"}
