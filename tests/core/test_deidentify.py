"""The de-identifying column actions (date_shift, generalise, mask, suppress) in the engine, checked against
tests/reference.py (docs/design.md §4.7 and the actions' definitions written out with hmac and datetime).

Both engine entry points are covered: columns of Python values (the pure-Python and SQL paths) and Arrow record
batches (files, the generic SQL path). The same rows through every real source and target are in
test_deidentify_paths.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pseudonymise.core.errors import DeidentifyError, PolicyError, UnsupportedTypeError
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.tokens import Token

from tests import reference
from tests.core.conftest import Mint

SUBJECTS = ["P1", "P2", None, "P1", " p3 ", "P2"]
DAYS = [dt.date(2024, 2, 29), dt.date(2024, 3, 1), dt.date(2024, 5, 5), dt.date(2024, 2, 28), None,
        dt.date(2000, 2, 29)]
POLICY = {
    "pid": {"action": "pseudonymise"},
    "day": {"action": "date_shift", "subject": "pid", "max_days": 30},
    "day_text": {"action": "date_shift", "subject": "pid", "max_days": 30},
    "age": {"action": "generalise", "width": 5, "bottom": 20, "top": 90},
    "postcode": {"action": "generalise", "prefix": 3},
    "month": {"action": "generalise", "to": "month"},
    "week": {"action": "generalise", "to": "iso_week"},
    "year": {"action": "generalise", "to": "year"},
    "phone": {"action": "mask", "keep_last": 2, "char": "#"},
    "account": {"action": "mask", "keep_first": 3},
    "name": "suppress",
}


def _key(token: Token) -> bytes:
    assert token.key is not None
    return token.key


def _batch() -> dict[str, list[Any]]:
    return {
        "pid": list(SUBJECTS),
        "day": list(DAYS),
        "day_text": [None if d is None else d.isoformat() for d in DAYS],
        "age": [19, 20, 24, 89, None, 90],
        "postcode": ["1011AB", "10", None, "3511 CD", "é9x", "9999ZZ"],
        "month": list(DAYS),
        "week": [dt.date(2024, 12, 30), dt.date(2021, 1, 3), None, dt.date(2024, 2, 29), dt.date(2020, 12, 31),
                 dt.date(2026, 1, 1)],
        "year": ["2024-02-29", "1999-12-31T23:30:00+00:00", None, "2000-01-01 00:00:00", "2024-02-29", "0001-01-01"],
        "phone": ["0612345678", "1", None, "12", "123", "+31 6"],
        "account": ["NL91ABNA0417164300", "NL", None, "abc", "abcd", "x"],
        "name": ["Olga", "Marie", None, "Lars", "Ilse", "Jan"],
    }


def _expected(token: Token, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    key = _key(token)
    shifts = [None if s is None else reference.date_shift_offset(key, s, 30) for s in batch["pid"]]
    return {
        "pid": reference.token_pseudonyms(token.raw, batch["pid"]),
        "day": [reference.shift(v, d) for v, d in zip(batch["day"], shifts, strict=True)],
        "day_text": [reference.shift(v, d) for v, d in zip(batch["day_text"], shifts, strict=True)],
        "age": [reference.integer_band(v, 5, 20, 90) for v in batch["age"]],
        "postcode": [reference.text_prefix(v, 3) for v in batch["postcode"]],
        "month": [reference.generalise_date(v, "month") for v in batch["month"]],
        "week": [reference.generalise_date(v, "iso_week") for v in batch["week"]],
        "year": [reference.generalise_date(v, "year") for v in batch["year"]],
        "phone": [reference.masked(v, "#", keep_last=2) for v in batch["phone"]],
        "account": [reference.masked(v, keep_first=3) for v in batch["account"]],
        "name": [None] * len(batch["name"]),
    }


def test_every_action_on_columns_of_values_matches_the_reference(mint: Mint) -> None:
    token = mint("research-b")
    out = Pseudonymiser(token, ColumnPolicy.from_mapping({"columns": POLICY})).pseudonymise_batch(_batch())
    expected = _expected(token, _batch())
    assert out.columns == expected
    # hand-checked corners of the definitions, so the reference itself is pinned too
    assert expected["age"] == ["<20", "20-24", "20-24", "85-89", None, ">=90"]
    assert expected["week"] == ["2025-W01", "2020-W53", None, "2024-W09", "2020-W53", "2026-W01"]
    assert expected["year"] == ["2024", "1999", None, "2000", "2024", "0001"]
    assert expected["phone"] == ["########78", "#", None, "##", "#23", "### 6"]
    assert expected["account"] == ["NL9***************", "**", None, "***", "abc*", "*"]
    assert out.stats.rows_in == 6 and out.stats.values_pseudonymised == 5  # pseudonyms only


def test_every_action_on_an_arrow_record_batch_matches_the_reference(mint: Mint) -> None:
    token = mint("research-b")
    batch = _batch()
    arrow = pa.RecordBatch.from_pydict({**batch, "year": pa.array(batch["year"], pa.string()),
                                        "age": pa.array(batch["age"], pa.int32())})
    out = Pseudonymiser(token, ColumnPolicy.from_mapping({"columns": POLICY})).pseudonymise_record_batch(arrow)
    record = out.columns
    assert isinstance(record, pa.RecordBatch)
    assert record.to_pydict() == _expected(token, batch)
    assert record.schema.field("day").type == pa.date32()  # a shifted date stays a date
    assert record.schema.field("day_text").type == pa.string()
    assert record.schema.field("name").type == pa.string()  # suppressed: NULLs of the column's own type
    assert record.schema.field("age").type == pa.string()


def test_leap_days_shift_and_generalise_by_the_calendar(mint: Mint) -> None:
    """Feb 29 moved by whole days lands where the calendar says; a subject's dates keep their distances."""
    token = mint("research-b")
    subjects = [f"S{i}" for i in range(200)]
    leap, next_day = dt.date(2024, 2, 29), dt.date(2024, 3, 1)
    policy = ColumnPolicy.from_mapping({"columns": {"pid": "keep", "a": {"action": "date_shift", "subject": "pid",
                                                                          "max_days": 400},
                                                    "b": {"action": "date_shift", "subject": "pid", "max_days": 400}}})
    out = Pseudonymiser(token, policy).pseudonymise_batch({"pid": subjects, "a": [leap] * 200, "b": [next_day] * 200})
    shifted_a, shifted_b = out.columns["a"], out.columns["b"]
    assert shifted_a == [leap + dt.timedelta(days=reference.date_shift_offset(_key(token), s, 400)) for s in subjects]
    assert all(b - a == dt.timedelta(days=1) for a, b in zip(shifted_a, shifted_b, strict=True))
    assert any(d.year == 2023 for d in shifted_a) and any(d.year == 2025 for d in shifted_a)  # across Feb 28/29


def test_timestamps_keep_their_time_of_day_and_offset(mint: Mint) -> None:
    """A timestamp with an offset moves by whole days of 24 hours on its instant and keeps its offset; a naive one
    keeps its wall time; ISO text stays ISO text in the same form (separator kept)."""
    token = mint("research-b")
    plus_one = dt.timezone(dt.timedelta(hours=1))
    values = [dt.datetime(2024, 2, 29, 23, 30, tzinfo=plus_one), dt.datetime(2024, 2, 29, 0, 0, 1),
              "2024-02-29T23:30:00+05:30", "2024-02-29 08:00:00"]
    policy = ColumnPolicy.from_mapping({"columns": {"pid": "keep", "t": {"action": "date_shift", "subject": "pid",
                                                                          "max_days": 10}}})
    out = Pseudonymiser(token, policy).pseudonymise_batch({"pid": ["x"] * 4, "t": values}).columns["t"]
    days = reference.date_shift_offset(_key(token), "x", 10)
    assert out == [reference.shift(v, days) for v in values]
    assert out[0].utcoffset() == dt.timedelta(hours=1) and out[0].time() == dt.time(23, 30)
    assert out[2].endswith("T23:30:00+05:30") and out[3].endswith(" 08:00:00")


def test_a_named_zone_in_arrow_moves_the_instant_by_whole_days(mint: Mint) -> None:
    """Arrow timestamps in a named zone: the instant moves by ``days`` × 24 h (across a daylight-saving change
    the local wall time then differs by that change: documented)."""
    token = mint("research-b")
    instants = [dt.datetime(2024, 3, 30, 12, 0, tzinfo=dt.UTC), dt.datetime(2024, 10, 26, 12, 0, tzinfo=dt.UTC)]
    batch = pa.RecordBatch.from_pydict({"pid": ["a", "b"],
                                        "t": pa.array(instants, pa.timestamp("us", tz="Europe/Amsterdam"))})
    policy = ColumnPolicy.from_mapping({"columns": {"pid": "keep", "t": {"action": "date_shift", "subject": "pid",
                                                                          "max_days": 20}}})
    out = Pseudonymiser(token, policy).pseudonymise_record_batch(batch).columns
    assert out.schema.field("t").type == pa.timestamp("us", tz="Europe/Amsterdam")
    got = [v.astimezone(dt.UTC) for v in out.column(1).to_pylist()]
    key = _key(token)
    assert got == [i + dt.timedelta(days=reference.date_shift_offset(key, s, 20)) for i, s in zip(instants, "ab", strict=True)]


def test_the_subject_gives_its_offset_from_its_original_normalised_value(mint: Mint) -> None:
    """A pseudonymised subject with normalisers: the offset follows the same identity as its pseudonym (" p1 " and
    "P1" are one subject), computed from the value before it became a pseudonym."""
    token = mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {
        "pid": {"action": "pseudonymise", "normalise": ["strip", "upper"]},
        "d": {"action": "date_shift", "subject": "pid", "max_days": 100, "domain": "visits"}}})
    out = Pseudonymiser(token, policy).pseudonymise_batch({"pid": [" p1 ", "P1"], "d": [dt.date(2020, 1, 1)] * 2})
    days = reference.date_shift_offset(_key(token), "P1", 100, domain="visits")
    assert out.columns["d"] == [dt.date(2020, 1, 1) + dt.timedelta(days=days)] * 2
    assert out.columns["pid"][0] == out.columns["pid"][1]


def test_null_subject_suppresses_the_dates_and_null_dates_stay_null(mint: Mint) -> None:
    token = mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"pid": "drop", "d": {"action": "date_shift", "subject": "pid",
                                                                          "max_days": 5}}})
    out = Pseudonymiser(token, policy).pseudonymise_batch({"pid": [None, "a", None], "d": [dt.date(2020, 1, 1), None,
                                                                                           None]})
    assert out.columns == {"d": [None, None, None]}


@settings(max_examples=60, deadline=None)
@given(subjects=st.lists(st.one_of(st.text(min_size=1, max_size=12), st.integers(-10**12, 10**12)), min_size=1,
                         max_size=40),
       max_days=st.integers(1, 1000))
def test_offsets_are_non_zero_within_bounds_and_the_reference_s(long_lived_mint: Mint, subjects: list[Any],
                                                                max_days: int) -> None:
    token = long_lived_mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"s": "drop", "d": {"action": "date_shift", "subject": "s",
                                                                        "max_days": max_days}}})
    origin = dt.date(2000, 1, 1)
    out = Pseudonymiser(token, policy).pseudonymise_batch({"s": subjects, "d": [origin] * len(subjects)})
    days = [(d - origin).days for d in out.columns["d"]]
    assert all(d != 0 and -max_days <= d <= max_days for d in days)
    assert days == [reference.date_shift_offset(_key(token), s, max_days) for s in subjects]


def test_offsets_spread_over_the_whole_range(long_lived_mint: Mint) -> None:
    """Over many subjects every offset of a small range occurs, and none is 0."""
    token = long_lived_mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"s": "drop", "d": {"action": "date_shift", "subject": "s",
                                                                        "max_days": 3}}})
    origin = dt.date(2000, 1, 1)
    out = Pseudonymiser(token, policy).pseudonymise_batch({"s": list(range(2000)), "d": [origin] * 2000})
    assert {(d - origin).days for d in out.columns["d"]} == {-3, -2, -1, 1, 2, 3}


def test_a_randomised_project_keeps_one_offset_per_subject_within_a_run_only(mint: Mint) -> None:
    token = mint("random-r")
    policy = ColumnPolicy.from_mapping({"columns": {"s": "keep", "d": {"action": "date_shift", "subject": "s",
                                                                        "max_days": 1000}}})
    origin = dt.date(2000, 1, 1)
    subjects = [f"s{i}" for i in range(20)]

    def run() -> list[int]:
        engine = Pseudonymiser(token, policy)
        first = engine.pseudonymise_batch({"s": subjects, "d": [origin] * 20}).columns["d"]
        second = engine.pseudonymise_batch({"s": subjects, "d": [origin] * 20}).columns["d"]
        assert first == second  # the same subject, later in the same run: the same offset
        return [(d - origin).days for d in first]

    one, two = run(), run()
    assert one != two  # a new run, new offsets (20 offsets of 2000 values all equal: 2000**-20)
    assert one != [reference.date_shift_offset(_key(token), s, 1000) for s in subjects]


def test_unparsable_text_fails_naming_column_and_row_never_the_value(mint: Mint) -> None:
    token = mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"s": "keep", "d": {"action": "date_shift", "subject": "s",
                                                                        "max_days": 5}}})
    engine = Pseudonymiser(token, policy)
    engine.pseudonymise_batch({"s": ["a", "b"], "d": ["2024-01-01", "2024-01-02"]})
    with pytest.raises(DeidentifyError) as caught:
        engine.pseudonymise_batch({"s": ["a", "b", "c"], "d": ["2024-01-01", None, "31/12/2024 secret-7731"]})
    message = str(caught.value)
    assert "column 'd', row 5" in message and "ISO 8601" in message
    assert "secret-7731" not in message and "31/12" not in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_generalise_refuses_text_that_is_not_a_whole_number_by_row(mint: Mint) -> None:
    token = mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"age": {"action": "generalise", "width": 10}}})
    with pytest.raises(DeidentifyError, match=r"column 'age', row 2: the text is not a whole number") as caught:
        Pseudonymiser(token, policy).pseudonymise_batch({"age": ["42", "4.5e1"]})
    assert "4.5e1" not in str(caught.value)
    with pytest.raises(UnsupportedTypeError, match="column 'age' holds float values"):
        Pseudonymiser(token, policy).pseudonymise_batch({"age": [42.0]})
    with pytest.raises(UnsupportedTypeError, match=r"column 'd' holds int values; date_shift takes dates, timestamps or ISO 8601 text"):
        Pseudonymiser(token, ColumnPolicy.from_mapping({"columns": {"s": "keep", "d": {
            "action": "date_shift", "subject": "s", "max_days": 5}}})).pseudonymise_batch({"s": ["a"], "d": [7]})


@pytest.mark.parametrize("value", [dt.date(9999, 12, 31), dt.date(1, 1, 1), "9999-12-31", "0001-01-01 00:00:00"])
def test_a_shift_out_of_the_calendar_fails_clearly(mint: Mint, value: Any) -> None:
    """With max_days large enough, one of the two ends of the calendar is passed for some subject."""
    token = mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"s": "keep", "d": {"action": "date_shift", "subject": "s",
                                                                        "max_days": 50}}})
    key = _key(token)
    forward = str(value).startswith("9999")
    subject = next(s for s in map(str, range(1000)) if (reference.date_shift_offset(key, s, 50) > 0) == forward)
    for batch in ({"s": ["x", subject], "d": [None, value]},
                  pa.RecordBatch.from_pydict({"s": ["x", subject], "d": [None, value]})):
        with pytest.raises(DeidentifyError, match=r"column 'd', row 2: the shifted date falls outside the years 1 to "
                                                  r"9999.*lower max_days"):
            Pseudonymiser(token, policy).pseudonymise_batch(batch)  # type: ignore[arg-type]


def test_policies_without_these_actions_take_the_copy_block_path_as_before(mint: Mint) -> None:
    from pseudonymise.core import native

    token = mint("research-b")
    plain = Pseudonymiser(token, ColumnPolicy.pseudonymise("pid", default="keep"))
    assert plain.takes_copy_blocks(["pid", "d"]) == native.available()
    mixed = Pseudonymiser(token, ColumnPolicy.from_mapping({"columns": {"pid": "pseudonymise", "d": "suppress"}}))
    assert not mixed.takes_copy_blocks(["pid", "d"])


def test_a_secondary_run_refuses_these_actions(mint: Mint) -> None:
    from pseudonymise.core.pseudonymiser import SecondaryPseudonymiser

    token = mint("vendor-x", "secondary", source_project="research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"pid": "pseudonymise", "d": "suppress"}})
    with pytest.raises(PolicyError, match="'d': date_shift, generalise, mask and suppress apply when data is first"):
        SecondaryPseudonymiser(token, policy)


def test_the_audited_columns_name_each_action_never_a_parameter() -> None:
    policy = ColumnPolicy.from_mapping({"columns": POLICY})
    assert policy.audited_columns == ["pid", "day:date_shift", "day_text:date_shift", "age:generalise",
                                      "postcode:generalise", "month:generalise", "week:generalise", "year:generalise",
                                      "phone:mask", "account:mask", "name:suppress"]
    assert ColumnRule("d", "date_shift", subject="s", max_days=3).to_mapping() == {
        "action": "date_shift", "subject": "s", "max_days": 3}


@pytest.mark.parametrize("values", [["2024-02-29", None, "0999-12-31", "2024-03-01"],  # all YYYY-MM-DD: Arrow parses
                                    ["2024-02-29", "20240301", None, "2024-03-01T08:00"]])  # other ISO forms: per value
def test_iso_date_text_takes_either_road_to_the_same_dates(mint: Mint, values: list[str | None]) -> None:
    """Text that is all ``YYYY-MM-DD`` is parsed and shifted by Arrow and numpy, any other ISO text value by value:
    both give the reference's dates, as text, in columns of values and in record batches alike."""
    token = mint("research-b")
    policy = ColumnPolicy.from_mapping({"columns": {"s": "keep", "d": {"action": "date_shift", "subject": "s",
                                                                        "max_days": 40}}})
    subjects = ["a", "b", "c", None]
    expected = [reference.shift(v, None if s is None else reference.date_shift_offset(_key(token), s, 40))
                for v, s in zip(values, subjects, strict=True)]
    assert Pseudonymiser(token, policy).pseudonymise_batch({"s": subjects, "d": values}).columns["d"] == expected
    batch = pa.RecordBatch.from_pydict({"s": subjects, "d": pa.array(values, pa.large_string())})
    out = Pseudonymiser(token, policy).pseudonymise_record_batch(batch).columns
    assert out.column(1).type == pa.large_string() and out.column(1).to_pylist() == expected
