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


def read_ahead(items: Iterable[T], depth: int = 2, name: str = "pseudonymise-reader") -> Iterator[T]:
    """``items`` as they come, read on a background thread up to ``depth`` items ahead of the consumer.

    An error of the iterator is raised here, after the items it gave (the same exception object, with no
    other as its context). When the consumer stops early (``close()``, an error, a ``break``), the reader
    stops after the item it is reading and ``items`` is closed in the reader's thread.
    """
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        while not stopped.is_set():
            try:
                slots.put(entry, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:
            offer(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=read, name=name, daemon=True)
    thread.start()
    failure: BaseException | None = None
    try:
        while True:
            kind, value = slots.get()
            if kind == "item":
                yield value
                continue
            if kind == "error":
                failure = value
            break
    finally:
        stopped.set()
        thread.join()
    if failure is not None:
        raise failure
