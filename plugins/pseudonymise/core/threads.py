"""A run's background threads: jobs run in order on one thread (:class:`Jobs`), an iterator read ahead (:func:`read_ahead`).

Both are bounded (a few items wait at most, so memory stays flat), keep the order of what they are
given, and raise a failure in the thread that uses them: the first failed job on the next
:meth:`Jobs.submit` or at :meth:`Jobs.drain`, the reader's error where the iterator would have
raised it. They pay off where the work lets go of the GIL (the C engine, pyarrow's CSV and Parquet
readers and writers, database drivers waiting on the server), which a two-core worker then runs at
once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
#: how often a reader waiting on a full queue looks whether its consumer stopped (seconds)
_POLL = 0.05


class Jobs:
    """Runs jobs in submission order, on a background thread or (``background=False``) at once.

    The first failure stops the jobs; it is raised on the next :meth:`submit` or by :meth:`drain`.
    Leaving the ``with`` block (or :meth:`stop`) stops the thread, dropping jobs not yet started, so
    what the jobs use (a transaction, a file) is never used by two threads at once afterwards.
    """

    def __init__(self, background: bool, depth: int = 2, name: str = "pseudonymise-jobs") -> None:
        self._error: BaseException | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._thread.start()

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:
                    self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            job()
        else:
            self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every job is done; raise the first failure."""
        self._stop(drop_waiting=False)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Drop the jobs not yet started and wait for the one running (after a failure elsewhere)."""
        self._stop(drop_waiting=True)

    def _stop(self, drop_waiting: bool) -> None:
        if self._thread is None:
            return
        while drop_waiting:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join()
        self._thread = None


class ReadAhead(Iterator[T]):
    """``items`` as they come, read on a background thread (started at once) up to ``depth`` items ahead of the
    consumer, and, given ``weigh`` (an item's size in bytes), no further ahead than ``max_bytes`` of them (one item
    at least).

    An error of the iterator is raised here, after the items it gave (the same exception object, with no
    other as its context). :meth:`close` stops the reader after the item it is reading, and ``items`` is then
    closed in the reader's thread: it is called when the items are done or failed; a consumer that stops
    early calls it (one that merely drops the reader stops it too, at the reader's next item).
    """

    def __init__(self, items: Iterable[T], depth: int = 2, name: str = "pseudonymise-reader",
                 weigh: Callable[[T], int] | None = None, max_bytes: int = 0) -> None:
        self._slots: queue.Queue[tuple[str, Any, int]] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._budget = _Budget(max_bytes) if weigh is not None else None
        self._done = False
        # the thread holds the queue, the event and the budget, not this object: a reader its consumer dropped is
        # collected, and its __del__ stops the thread
        self._thread = threading.Thread(target=_read, args=(items, self._slots, self._stopped, weigh, self._budget),
                                        name=name, daemon=True)
        self._thread.start()

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            kind, value, size = self._slots.get()
        except BaseException:  # interrupted while waiting
            self.close()
            raise
        if kind == "item":
            if self._budget is not None:
                self._budget.release(size)
            return value  # type: ignore[no-any-return]
        self.close()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop reading (the item being read is finished, then dropped) and wait for the reader to end."""
        self._done = True
        self._stopped.set()
        self._thread.join()

    def __del__(self) -> None:
        self._stopped.set()  # an abandoned reader stops at its next item


class _Budget:
    """The bytes a reader holds ahead of its consumer, at most ``limit`` (or one item, whatever its size)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._changed = threading.Condition()

    def acquire(self, size: int, stopped: threading.Event) -> bool:
        """Wait until ``size`` more bytes fit; ``False`` if the consumer stopped first."""
        with self._changed:
            while self.held and self.held + size > self.limit:
                if stopped.is_set():
                    return False
                self._changed.wait(_POLL)
            self.held += size
            return True

    def release(self, size: int) -> None:
        with self._changed:
            self.held -= size
            self._changed.notify()


def _offer(slots: queue.Queue[tuple[str, Any, int]], stopped: threading.Event, entry: tuple[str, Any, int]) -> bool:
    """Put ``entry`` in the queue once there is room; ``False`` if the consumer stopped first."""
    while not stopped.is_set():
        try:
            slots.put(entry, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def _read(items: Iterable[T], slots: queue.Queue[tuple[str, Any, int]], stopped: threading.Event,
          weigh: Callable[[T], int] | None, budget: _Budget | None) -> None:
    """The reader thread: every item, then the end or the error, into ``slots``; ``items`` closed here."""
    iterator = iter(items)
    try:
        for item in iterator:
            size = weigh(item) if weigh is not None else 0
            if budget is not None and not budget.acquire(size, stopped):
                return
            if not _offer(slots, stopped, ("item", item, size)):
                return
        _offer(slots, stopped, ("end", None, 0))
    except BaseException as exc:
        _offer(slots, stopped, ("error", exc, 0))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def read_ahead(items: Iterable[T], depth: int = 2, name: str = "pseudonymise-reader",
               weigh: Callable[[T], int] | None = None, max_bytes: int = 0) -> ReadAhead[T]:
    """``items`` read on a background thread, started now, up to ``depth`` items (and ``max_bytes`` as ``weigh``
    counts them) ahead (:class:`ReadAhead`)."""
    return ReadAhead(items, depth, name, weigh, max_bytes)
