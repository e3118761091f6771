"""The run's exact set of sealed MACs (core/macsets.py): the C engine's open-addressing table against the
Python set that defines it, exactness, the limit."""

from __future__ import annotations

import importlib
import os
import random

import numpy as np
import pytest
from pseudonymise.core import macsets, native
from pseudonymise.core.macsets import MacSet

needs_native = pytest.mark.skipif(not native.available(),
                                  reason="PSEUDONYMISE_PURE_PYTHON=1: the C engine is switched off")


def _run(batches: list[bytes], limit: int) -> list[tuple[list[bool], list[int] | None, int]]:
    macs = MacSet(limit=limit)
    out = []
    for batch in batches:
        known = macs.known(batch).tolist()
        left_out = macs.add(batch)
        out.append((known, None if left_out is None else left_out.tolist(), macs.count))
    return out


@needs_native
def test_the_c_table_equals_the_python_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """known/add through the C engine's open-addressing table and through a Python set (its definition) agree
    batch after batch: repeats, MACs that start alike (long probes), the table growing within a batch, and the
    limit reached (the MACs left out are the same, in the same order)."""
    monkeypatch.setattr(macsets, "_FIRST_SLOTS", 16)  # grown many times, within a batch too
    rng = random.Random(13)
    pool = [os.urandom(32) for _ in range(4000)]
    pool += [pool[0][:8] + os.urandom(24) for _ in range(40)]  # one first slot, many MACs: probing
    batches = [b"".join(rng.choice(pool) for _ in range(rng.randrange(0, 1500))) for _ in range(14)]
    in_c = _run(batches, 3000)
    monkeypatch.setattr(native, "_ext", None)
    assert in_c == _run(batches, 3000)
    assert in_c[0][2] > 8  # the first batch grew the table past its first 16 slots
    assert in_c[-1][2] == 3000  # the limit was reached ...
    assert any(left for _, left, _ in in_c)  # ... and MACs were left out
    assert any(any(known) for known, _, _ in in_c)


def _run_new(batches: list[bytes], limit: int) -> list[tuple[list[int] | None, list[int] | None, int]]:
    """add_new batch after batch, each answer checked against known() asked just before (one set per run)."""
    macs, mirror = MacSet(limit=limit), MacSet(limit=limit)
    out = []
    for batch in batches:
        unknown = np.flatnonzero(~mirror.known(batch)).tolist()
        mirror.add(batch)
        new, left_out = macs.add_new(batch)
        assert (new.tolist() if new is not None else []) == unknown
        out.append((None if new is None else new.tolist(), None if left_out is None else left_out.tolist(), macs.count))
    return out


@needs_native
def test_add_new_in_one_pass_equals_known_then_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """add_new's one pass over the C table says what known() then add() would (a repeat within the batch of a MAC
    new to the set is new too; the MACs left out are those add() leaves out), and equals the Python set's answer:
    repeats, long probes, the table growing within a batch, the limit reached."""
    monkeypatch.setattr(macsets, "_FIRST_SLOTS", 16)
    rng = random.Random(29)
    pool = [os.urandom(32) for _ in range(4000)]
    pool += [pool[0][:8] + os.urandom(24) for _ in range(40)]
    batches = [b"".join(rng.choice(pool) for _ in range(rng.randrange(0, 1500))) for _ in range(14)]
    in_c = _run_new(batches, 3000)
    monkeypatch.setattr(native, "_ext", None)
    assert in_c == _run_new(batches, 3000)
    assert in_c[-1][2] == 3000 and any(left for _, left, _ in in_c)
    assert any(new is not None and len(set(new)) and len(new) < len(batch) // 32
               for (new, _, _), batch in zip(in_c, batches, strict=True))


@pytest.mark.parametrize("engine", ["c", "python"])
def test_every_mac_added_is_known_and_no_other(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    if engine == "c" and not native.available():
        pytest.skip("PSEUDONYMISE_PURE_PYTHON=1: the C engine is switched off")
    if engine == "python":
        monkeypatch.setattr(native, "_ext", None)
    macs = MacSet(limit=10)
    added = [os.urandom(32) for _ in range(10)]
    assert macs.add(b"".join(added)) is None
    assert macs.add(added[3]) is None  # already there: nothing to leave out
    stranger = added[0][:8] + os.urandom(24)  # starts as a held MAC does: only whole MACs match
    assert macs.known(b"".join(added) + stranger).tolist() == [True] * 10 + [False]
    assert macs.add(stranger + added[1]).tolist() == [0]  # no room: left out, not added
    assert not macs.known(stranger)[0] and macs.count == 10
    with pytest.raises(ValueError, match="at least one"):
        MacSet(limit=0)


@needs_native
def test_the_c_table_refuses_bad_arguments() -> None:
    extension = importlib.import_module("pseudonymise.core._native")
    with pytest.raises(ValueError, match="at most half"):
        extension.seen_add(bytearray(32 * 4), bytearray(4), b"", 3)
    with pytest.raises(ValueError, match="power-of-two"):
        extension.seen_known(bytearray(32 * 3), bytearray(3), b"")
    with pytest.raises(ValueError, match="whole MACs"):
        extension.seen_add(bytearray(32 * 4), bytearray(4), b"x" * 31, 1)
