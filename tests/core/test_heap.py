"""The worker's startup heap frozen out of the cycle collector's scans, once per process (core/heap.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from pseudonymise.core import heap


class _Node:
    """An object that can be weakly referenced and hold a reference cycle."""

    other: _Node | None = None


def _tracked(obj: object) -> bool:
    """Whether the collector's generations (what a collection walks) hold ``obj``; frozen objects are in none."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def first_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process that has not frozen yet (other tests may have run an operator); everything thawed after."""
    monkeypatch.setattr(heap, "_frozen", False)
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_the_first_run_freezes_what_the_process_holds(first_run: None) -> None:
    before = [_Node()]  # made before the run, like the modules a worker imported
    assert _tracked(before)
    assert heap.freeze_startup_heap() is True
    assert gc.get_freeze_count() > 0
    assert not _tracked(before)  # a full collection no longer walks it


def test_later_runs_freeze_nothing_more(first_run: None) -> None:
    assert heap.freeze_startup_heap() is True
    frozen = gc.get_freeze_count()
    after = [_Node()]  # made by a run: a long-lived process's later objects
    assert heap.freeze_startup_heap() is False
    assert gc.get_freeze_count() == frozen
    assert _tracked(after)


def test_cycles_made_after_the_freeze_are_still_collected(first_run: None) -> None:
    heap.freeze_startup_heap()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_startup_garbage_is_collected_before_the_freeze(first_run: None) -> None:
    """Short-lived cycles of start-up are freed by a young-generation collection, not kept for good."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    heap.freeze_startup_heap()
    assert gone() is None


def test_a_process_that_turned_the_collector_off_is_left_alone(first_run: None) -> None:
    gc.disable()
    assert heap.freeze_startup_heap() is False
    assert gc.get_freeze_count() == 0
    assert heap._frozen is False
