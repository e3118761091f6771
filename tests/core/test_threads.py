"""A run's background threads (core/threads.py): ordered jobs, and iterators read ahead, bounded, failing where they should."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pseudonymise.core.threads import Jobs, read_ahead


def _alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


def test_read_ahead_gives_every_item_in_order() -> None:
    assert list(read_ahead(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(read_ahead([])) == []


def test_read_ahead_reads_on_another_thread_at_most_depth_items_ahead() -> None:
    read: list[int] = []
    threads: set[str] = set()

    def items() -> Iterator[int]:
        for i in range(20):
            threads.add(threading.current_thread().name)
            read.append(i)
            yield i

    reader = read_ahead(items(), depth=2, name="test-reader")
    assert next(reader) == 0
    time.sleep(0.3)  # time for the reader to run ahead as far as it may
    assert threads == {"test-reader"}
    # one handed out, two waiting in the queue, one read and waiting for room
    assert len(read) <= 4
    assert list(reader) == list(range(1, 20))


def test_read_ahead_holds_at_most_max_bytes_ahead_and_always_one_item() -> None:
    """With a weight per item, the reader stops once the items waiting would pass ``max_bytes`` (an item larger
    than the budget still goes, alone), goes on as the consumer takes them, and a close while it waits ends it."""
    read: list[int] = []

    def items(sizes: list[int]) -> Iterator[int]:
        for size in sizes:
            read.append(size)
            yield size

    reader = read_ahead(items([10] * 20), depth=100, name="test-budget", weigh=lambda size: size, max_bytes=35)
    time.sleep(0.3)  # time for the reader to run ahead as far as it may
    assert len(read) <= 4  # three waiting (30 bytes), the fourth read and waiting for room
    assert next(reader) == 10
    time.sleep(0.3)
    assert len(read) <= 5
    assert list(reader) == [10] * 19
    read.clear()
    big = read_ahead(items([100, 100, 1]), depth=100, name="test-budget-big", weigh=lambda size: size, max_bytes=35)
    assert list(big) == [100, 100, 1]  # each larger than the budget: one at a time
    read.clear()
    stopped = read_ahead(items([20] * 1000), depth=100, name="test-budget-stop", weigh=lambda size: size,
                         max_bytes=50)
    time.sleep(0.2)
    stopped.close()
    assert not _alive("test-budget-stop") and len(read) <= 4


def test_read_ahead_raises_the_readers_error_after_the_items_before_it() -> None:
    class Refused(Exception):
        pass

    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise Refused("line 3 is malformed")

    got: list[int] = []
    with pytest.raises(Refused, match="line 3") as caught:
        for item in read_ahead(items()):
            got.append(item)
    assert got == [1, 2]
    assert caught.value.__context__ is None and caught.value.__cause__ is None


def test_read_ahead_stopped_early_closes_the_iterator_in_its_thread() -> None:
    closed: list[str] = []

    def items() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            closed.append(threading.current_thread().name)

    reader = read_ahead(items(), depth=2, name="test-early-stop")
    assert next(reader) == 0
    reader.close()  # a dry run that has its sample, or an error in the consumer
    assert closed == ["test-early-stop"]
    assert not _alive("test-early-stop")


def test_jobs_run_in_order_on_their_thread_and_drain_waits() -> None:
    done: list[tuple[int, str]] = []
    with Jobs(background=True, name="test-jobs") as jobs:
        for i in range(50):
            jobs.submit(lambda i=i: done.append((i, threading.current_thread().name)))
        jobs.drain()
    assert done == [(i, "test-jobs") for i in range(50)]
    assert not _alive("test-jobs")


def test_jobs_raise_the_first_failure_and_skip_the_rest() -> None:
    done: list[int] = []

    def fail() -> None:
        raise ValueError("disk full")

    jobs = Jobs(background=True)
    jobs.submit(lambda: done.append(1))
    jobs.submit(fail)
    jobs.submit(lambda: done.append(3))  # never runs: the jobs stopped at the failure
    with pytest.raises(ValueError, match="disk full"):
        for _ in range(100):
            jobs.submit(lambda: done.append(4))
        jobs.drain()
    assert done == [1]
    jobs.stop()


def test_jobs_inline_run_at_once() -> None:
    done: list[str] = []
    with Jobs(background=False) as jobs:
        jobs.submit(lambda: done.append(threading.current_thread().name))
        assert done == [threading.current_thread().name]
        jobs.drain()
