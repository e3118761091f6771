"""The collision check's C table of held records (collisions.HeldRecords) against the sorted numpy records of its
definition, and against collisions worked out here from the batches with the standard library."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest
from pseudonymise.core import native
from pseudonymise.core.collisions import RECORD, CollisionGuard, HeldRecords
from pseudonymise.core.errors import CollisionError
from pseudonymise.core.formats import PseudonymFormat

pytestmark = pytest.mark.skipif(not native.available(), reason="the C engine is not built here")


def macs(count: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(count)]


def _outcome(fmt: PseudonymFormat, randomised: bool, memory_records: int,
             batches: list[tuple[str, list[bytes]]]) -> str | None:
    """The error a guard raises over ``batches`` (at a batch or at finish), or ``None``."""
    guard = CollisionGuard(fmt, randomised=randomised, memory_records=memory_records)
    try:
        for column, batch in batches:
            guard.add(column, batch, fmt.encode_many(batch))
        guard.finish()
    except CollisionError as exc:
        return str(exc)
    finally:
        guard.close()
    return None


def _expected(fmt: PseudonymFormat, randomised: bool, batches: list[tuple[str, list[bytes]]]) -> set[str]:
    """The column names an error may give: those of any two occurrences with one pseudonym (in a deterministic
    run, of two different MACs). Empty: no collision."""
    seen: dict[str, list[tuple[bytes, str]]] = {}
    for column, batch in batches:
        for mac in batch:
            seen.setdefault(fmt.encode(mac), []).append((mac, column))
    return {" and ".join(map(repr, sorted({a[1], b[1]})))
            for occurrences in seen.values() for a, b in itertools.combinations(occurrences, 2)
            if randomised or a[0] != b[0]}


@pytest.mark.parametrize("seed", range(4))
def test_the_c_table_finds_what_the_sorted_definition_finds(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random batches with repeats, MACs sharing their first 64 bits (one hex-16 pseudonym: a collision; base32-26
    pseudonyms that differ: none), in memory and spilled: the C table and the numpy definition fail on exactly the
    runs with a collision, each naming the columns of a colliding pair."""
    rng = random.Random(seed)
    pool = macs(3000)
    twins = [pool[k][:8] + os.urandom(24) for k in rng.sample(range(3000), 3)]  # same key as a pool MAC
    found = {}
    for fmt in (PseudonymFormat(), PseudonymFormat("hex", 16)):
        for with_twins in (False, True):
            values = pool + (twins if with_twins else [])
            batches = [(rng.choice("abc"), [rng.choice(values) for _ in range(rng.randrange(0, 900))])
                       for _ in range(12)]
            for randomised in (False, True):
                expected = _expected(fmt, randomised, batches)
                for memory_records in (1 << 20, 500, 0):
                    for mode in ("c", "numpy"):
                        with monkeypatch.context() as patch:
                            if mode == "numpy":
                                patch.setattr(native, "_ext", None)
                            error = _outcome(fmt, randomised, memory_records, batches)
                        where = (fmt.alphabet, with_twins, randomised, memory_records, mode)
                        if not expected:
                            assert error is None, where
                            continue
                        assert error is not None and error.startswith("column "), where
                        assert error[len("column "):error.index(":")] in expected, where
                found[(fmt.alphabet, with_twins, randomised)] = bool(expected)
    assert found == {("base32", False, False): False, ("base32", True, False): False,  # same 64 bits, other text
                     ("hex", False, False): False, ("hex", True, False): True,  # one pseudonym, two MACs
                     ("base32", False, True): True, ("base32", True, True): True,  # randomised: any repeat
                     ("hex", False, True): True, ("hex", True, True): True}


def test_held_records_leave_repeats_out_pair_shared_keys_and_grow() -> None:
    """The C table itself: 20,000 records (past its first size, so it grows and re-indexes), each added twice;
    a repeat is left out in a deterministic run and kept (paired) in a randomised one; a record with a held key and
    another MAC is paired with the held one."""
    records = np.zeros(20_000, dtype=RECORD)
    records["key"] = np.arange(20_000, dtype=np.uint64) * np.uint64(0x10001)
    records["mac"] = np.frombuffer(b"".join(macs(20_000)), dtype="V32")
    records["column"] = 1
    table = HeldRecords(randomised=False)
    assert len(table.add(records, 1 << 20)[0]) == 0 and table.count == 20_000
    assert table.add(records[::-1], 1 << 20)[0].size == 0 and table.count == 20_000  # repeats: left out
    assert table.held().tobytes() == records.tobytes()
    other = records[7:8].copy()
    other["mac"] = np.frombuffer(os.urandom(32), dtype="V32")
    assert table.add(other, 1 << 20)[0].tolist() == [[7, 0]] and table.count == 20_001
    randomised = HeldRecords(randomised=True)
    assert len(randomised.add(records[:100], 1 << 20)[0]) == 0
    assert sorted(randomised.add(records[:100], 1 << 20)[0].tolist()) == [[i, i] for i in range(100)]
    assert randomised.count == 200
    with pytest.raises(ValueError, match="power-of-two"):
        native.collision_add(bytearray(16 * 3), bytearray(42), 0, b"", False, 0)
    full = HeldRecords(randomised=False)  # room for ten: the eleventh record and the rest are the caller's
    twin = records[3:4].copy()
    twin["mac"] = np.frombuffer(os.urandom(32), dtype="V32")  # shares record 3's key
    batch = np.concatenate([records[:9], twin, records[:5], records[9:20], twin])
    pairs, done = full.add(batch, 10)
    assert (done, full.count) == (15, 10) and pairs.tolist() == [[3, 9]]
    assert full.held().tobytes() == np.concatenate([records[:9], twin]).tobytes()


def test_the_c_table_grows_within_its_bound_then_spills_everything_it_held() -> None:
    """Memory stays bounded: the table doubles up to ``memory_records``; once it is full, every record held and
    those that found no room go to the partitions, and finish() checks them there."""
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=10_000)
    for _ in range(3):
        guard.add("a", macs(3000), None)
    assert guard.resident_records == 9000 and guard.spilled_records == 0
    assert guard._held is not None and len(guard._held._records) == 10_000  # grown 4,096 -> 8,192 -> the bound
    guard.add("a", macs(3000), None)  # 1,000 fit, 2,000 find no room: all 12,000 spilled
    assert guard.resident_records == 0 and guard.spilled_records == 12_000
    guard.finish()
