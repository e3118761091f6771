"""The run's collision check in bounded memory (core/collisions.py): exact, whether in memory or spilled."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from pseudonymise.core import formats, native
from pseudonymise.core.collisions import RECORD, CollisionGuard, GuardAside
from pseudonymise.core.errors import CollisionError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser

from tests.core.conftest import Mint


@pytest.fixture(autouse=True, params=["c", "numpy"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: with the C engine's table of held records, and with the sorted numpy records (its
    definition)."""
    if request.param == "numpy":
        monkeypatch.setattr(native, "_ext", None)
    elif not native.available():
        pytest.skip("the C engine is not built here")
    return str(request.param)


@pytest.fixture
def constant_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MAC encodes to one base32 text: a stand-in for a format far too short for the data."""
    monkeypatch.setitem(formats._ENCODERS, "base32", lambda _mac, length: "a" * length)


def macs(count: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(count)]


def add(guard: CollisionGuard, column: str, batch: list[bytes]) -> None:
    guard.add(column, batch, guard.format.encode_many(batch))


def test_distinct_values_and_repeats_pass_in_memory_and_spilled() -> None:
    for memory_records in (1 << 20, 10):
        guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=memory_records)
        values = macs(500)
        for start in range(0, 500, 50):
            add(guard, "a", values[start:start + 50])
            add(guard, "b", values[start:start + 50][::-1])  # the same values again, another column
        guard.finish()
        assert (guard.spilled_records > 0) == (memory_records == 10)


def test_small_run_fails_on_the_colliding_batch(constant_encoder: None) -> None:
    guard = CollisionGuard(PseudonymFormat(), randomised=False)
    first = macs(1)
    add(guard, "a", first * 3)  # one value, three times: no collision
    with pytest.raises(CollisionError, match="'a' and 'b'"):
        add(guard, "b", macs(1))


def test_spilled_run_fails_in_finish_before_anything_commits(constant_encoder: None) -> None:
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=0)
    add(guard, "patient_id", macs(1) * 5)  # spills at once: one value (five times, recorded once)
    add(guard, "patient_id", macs(1))  # a second value, same pseudonym: found when the run ends
    with pytest.raises(CollisionError, match="'patient_id'"):
        guard.finish()


def test_randomised_fails_on_any_repeated_pseudonym(constant_encoder: None) -> None:
    guard = CollisionGuard(PseudonymFormat(), randomised=True, memory_records=0)
    one = macs(1)
    add(guard, "id", one)
    add(guard, "id", macs(2))  # spilled: checked when the run ends
    with pytest.raises(CollisionError):
        guard.finish()
    with pytest.raises(CollisionError):
        add(CollisionGuard(PseudonymFormat(), randomised=True), "id", one * 2)  # even one MAC twice


def test_equal_keys_of_different_pseudonyms_are_not_a_collision() -> None:
    """Keys are 64-bit hashes: two pseudonyms may share one. The exact comparison clears them."""
    fmt = PseudonymFormat("hex", 16)
    guard = CollisionGuard(fmt, randomised=False)
    guard._columns.append("id")
    records = np.zeros(2, dtype=RECORD)
    records["key"] = 42
    records["mac"] = np.frombuffer(b"\x00" * 32 + b"\xff" * 32, dtype="V32")
    guard._check(records)  # different pseudonyms ("0000…" and "ffff…"): no error
    records["mac"] = np.frombuffer(b"\x00" * 8 + b"\x01" * 24 + b"\x00" * 8 + b"\x02" * 24, dtype="V32")
    with pytest.raises(CollisionError):  # same 64 leading bits: one hex-16 pseudonym, two MACs
        guard._check(records)


def test_groups_of_one_repeated_mac_pass_and_a_second_mac_in_any_group_fails() -> None:
    """Records sorted by key: repeats of one MAC share a key and are no collision; a different MAC with the same
    pseudonym fails wherever it sits in its group, whichever group it is in."""
    fmt = PseudonymFormat("hex", 16)
    guard = CollisionGuard(fmt, randomised=False)
    guard._columns.append("id")
    one, two = b"\x01" * 8 + b"\x00" * 24, b"\x01" * 8 + b"\xff" * 24  # one hex-16 pseudonym, two MACs
    other = b"\x02" * 32

    def records(group: list[bytes]) -> np.ndarray:
        out = np.zeros(len(group), dtype=RECORD)
        out["key"] = np.frombuffer(b"".join(m[:8] for m in group), dtype=">u8")
        out["mac"] = np.frombuffer(b"".join(group), dtype="V32")
        return out[np.argsort(out["key"], kind="stable")]

    guard._check(records([one, one, one, other, other]))
    for group in ([one, one, one, two], [one, two, two, other], [other, other, one, one, two, one]):
        with pytest.raises(CollisionError):
            guard._check(records(group))


def test_a_real_short_format_collision_is_found_with_the_real_encoder() -> None:
    """Two MACs equal in their leading 64 bits give one hex-16 pseudonym: a collision, found spilled too."""
    fmt = PseudonymFormat("hex", 16)
    base = os.urandom(8)
    one, two = base + os.urandom(24), base + os.urandom(24)
    for memory_records in (1 << 20, 1):
        guard = CollisionGuard(fmt, randomised=False, memory_records=memory_records)
        add(guard, "id", [*macs(100), one])
        try:
            add(guard, "id", [two, *macs(100)])
            guard.finish()
        except CollisionError:
            continue
        pytest.fail("the collision was not reported")


def test_pseudonymiser_spills_and_finish_checks(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("id"))
    engine._guard.memory_records = 0  # spills at once
    engine.pseudonymise_batch({"id": ["P1", "P1", "P1", "P1"]})
    engine.pseudonymise_batch({"id": ["P2"]})  # spilled: no error yet
    with pytest.raises(CollisionError, match="'id'"):
        engine.finish()
    secondary = SecondaryPseudonymiser(mint("vendor-x", "secondary", source_project="research-a"),
                                       ColumnPolicy.pseudonymise("id"))
    secondary._guard.memory_records = 0
    secondary.pseudonymise_values(["b" * 26, "b" * 26], "id")  # first-level pseudonyms of the source format
    secondary.pseudonymise_values(["c" * 26], "id")
    with pytest.raises(CollisionError):
        secondary.finish()


def test_a_value_repeated_within_a_batch_is_recorded_once(constant_encoder: None) -> None:
    """A deterministic run records a value's MAC once, even when the value repeats within one batch; the check
    stays exact (a second value with the same pseudonym still fails)."""
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=0)
    one = macs(1)
    add(guard, "id", one * 50)
    add(guard, "id", [*one, *one])
    assert guard.spilled_records == 1
    guard.finish()
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=0)
    add(guard, "id", one * 50)
    add(guard, "id", one * 20 + macs(1))  # spilled: found when the run ends
    with pytest.raises(CollisionError):
        guard.finish()


def test_memory_stays_bounded_when_spilled() -> None:
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=1000)
    for _ in range(20):
        add(guard, "id", macs(2000))
    assert guard.resident_records == 0 and guard.spilled_records == 40_000
    guard.finish()
    guard.close()


def test_guard_aside_finds_what_the_guard_finds(constant_encoder: None) -> None:
    """Fed on its own thread, the check raises a collision at a later batch or at finish, never misses one."""
    aside = GuardAside(CollisionGuard(PseudonymFormat(), randomised=False))
    aside.add("a", macs(1) * 3, None)  # one value three times: no collision
    aside.add("b", macs(1), None)  # another value, the same pseudonym
    with pytest.raises(CollisionError, match="'a' and 'b'"):
        for _ in range(10):  # raised by a later batch once the thread has checked it, or by finish
            aside.add("c", [], None)
        aside.finish()
    aside.close()


def test_guard_aside_passes_distinct_values_and_checks_the_spilled_ones_at_finish() -> None:
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=10)
    aside = GuardAside(guard)
    values = macs(300)
    for start in range(0, 300, 30):
        aside.add("a", values[start:start + 30], None)
        aside.add("b", values[start:start + 30][::-1], None)
    aside.finish()
    assert guard.spilled_records == 300  # every distinct value checked, the repeats in the other column skipped


def test_guard_aside_close_stops_its_thread_and_forgets_the_run() -> None:
    guard = CollisionGuard(PseudonymFormat(), randomised=False, memory_records=2)
    aside = GuardAside(guard)
    for _ in range(5):
        aside.add("a", macs(3), None)
    aside.close()  # after a failure elsewhere: no error, temporary files closed
    assert not any(t.name == "pseudonymise-collisions" and t.is_alive() for t in threading.enumerate())
    assert all(handle is None or handle.closed for handle in guard._spill or ())


def test_pseudonymiser_checks_aside_and_still_fails_before_commit(mint: Mint, constant_encoder: None) -> None:
    engine = Pseudonymiser(mint("research-b"), ColumnPolicy.pseudonymise("id"))
    engine.check_collisions_aside()
    engine.pseudonymise_batch({"id": ["P1", "P1"]})
    engine.pseudonymise_batch({"id": ["P2"]})
    with pytest.raises(CollisionError, match="'id'"):
        engine.finish()
    engine.close()

