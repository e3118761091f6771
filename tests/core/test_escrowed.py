"""A deterministic run seals a value once: later batches of the run do not list it for escrow again."""

from __future__ import annotations

import os

from pseudonymise.core.pseudonymiser import ColumnPolicy, ColumnRule, Pseudonymiser, _Escrowed

from tests.core.conftest import Mint


def sealed(batch: object) -> list[str]:
    return [item.pseudonym for item in batch.escrow]  # type: ignore[attr-defined]


def test_later_batches_do_not_list_what_an_earlier_batch_sealed(mint: Mint) -> None:
    engine = Pseudonymiser(mint("research-a"), ColumnPolicy.pseudonymise("a", "b"))
    first = engine.pseudonymise_batch({"a": ["x", "y", "x"], "b": ["z", None, "x"]})
    assert len(first.escrow) == 5  # repeats within a batch are left to the writer, which keeps one row
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


def test_a_value_whose_slot_was_taken_is_sealed_again() -> None:
    escrowed = _Escrowed(slots=1)
    a, b = os.urandom(32), os.urandom(32)
    assert escrowed.unsealed(a) is None  # nothing sealed yet: all positions are new
    escrowed.end_batch()
    assert escrowed.unsealed(a + b).tolist() == [1]  # a is known, b is new
    escrowed.end_batch()  # b takes the only slot
    assert escrowed.unsealed(a) is None  # forgotten: listed again, escrow keeps its first row
