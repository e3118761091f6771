"""The run's collision check (docs/design.md §4 step 6) in bounded memory: one pseudonym, two MACs, is an error.

For every pseudonymised value the guard keeps a fixed-size record: a 64-bit key that equal
pseudonyms share (the MAC's first 64 bits when the pseudonym spells the MAC's leading bits, else
the hash of its text), the whole 32-byte MAC, and the column. Two records with
equal keys are compared exactly (the pseudonyms are encoded again from their MACs), so a shared
key between different pseudonyms is never reported and a real collision never missed.

Small runs keep the records in memory and fail on the batch that collides. Past
``memory_records`` records the guard spills them to anonymous temporary files, partitioned by
key, and checks each partition in :meth:`CollisionGuard.finish`, which the pipeline calls before
it commits anything. Memory then stays flat whatever the number of distinct values; disk use is
42 bytes per value until the run ends.

The definition keeps the records sorted by key (numpy) and compares neighbours. With the C engine
the records held are indexed by key instead (:class:`HeldRecords`: open addressing, off the GIL, no
sorting): a deterministic run's repeat of a held MAC is left out and each held record sharing an
incoming record's key is compared exactly, so the same collisions are found (tests/core compares
the two on random data, forced collisions and spills), and a run holds up to
``MEMORY_RECORDS_NATIVE`` records (37 MiB) before it spills.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from typing import IO

import numpy as np

from pseudonymise.core import native
from pseudonymise.core.errors import CollisionError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.macsets import slots_for
from pseudonymise.core.threads import Jobs

RECORD = np.dtype([("key", "<u8"), ("mac", "V32"), ("column", "<u2")])
_RAW = np.dtype(f"V{RECORD.itemsize}")  # a record as opaque bytes: gathered much faster than the structure
PARTITION_BITS = 6
MEMORY_RECORDS = 1 << 17  # records held in memory by the definition (each batch re-sorts them)
#: records held in memory with the C engine's table: 42 bytes each and 32 for its index (37 MiB when full: a run
#: of 500,000 distinct values never spills, and a larger run's memory stays what it is at that size)
MEMORY_RECORDS_NATIVE = 1 << 19
_FIRST_RECORDS = 1 << 12
_SPILL_SLICE = 1 << 16  # records spilled at a time when the table is full
_SPILL_BUFFER = 1 << 18  # bytes buffered per partition file: few, large writes


class RecentMacs:
    """A fixed table of MACs seen lately (32 MiB at most, touched as used), direct-mapped on the MAC's
    first bits. A MAC is only ever reported as known when that exact MAC is in its slot; a slot taken by
    another MAC merely forgets the earlier one."""

    def __init__(self, slots: int = 1 << 20) -> None:
        self._macs = np.zeros((slots, 4), dtype=np.uint64)  # zero pages cost nothing until touched
        self._rows = self._macs.view("V32").reshape(-1)
        self._used = np.zeros(slots, dtype=bool)
        self._mask = np.uint64(slots - 1)

    @staticmethod
    def words(macs: bytes) -> np.ndarray:
        return np.frombuffer(macs, dtype=np.uint64).reshape(-1, 4)

    def _slots(self, words: np.ndarray) -> np.ndarray:
        return (words[:, 0] & self._mask).astype(np.intp)

    def known(self, words: np.ndarray) -> np.ndarray:
        """Whether each MAC (rows of four 64-bit words) is in the table."""
        if native.available():  # one pass in C; the numpy below is its definition
            flags = native.recent_known(self._macs.data, self._used.data, np.ascontiguousarray(words).tobytes())
            return np.frombuffer(flags, dtype=bool)
        slot = self._slots(words)
        held = np.take(self._macs, slot, axis=0)  # take and per-word compares: several times faster than fancy indexing
        same = (held[:, 0] == words[:, 0]) & (held[:, 1] == words[:, 1]) & (held[:, 2] == words[:, 2]) \
            & (held[:, 3] == words[:, 3])
        return same & self._used[slot]

    def remember(self, words: np.ndarray) -> None:
        if native.available():
            native.recent_remember(self._macs.data, self._used.data, np.ascontiguousarray(words).tobytes())
            return
        slot = self._slots(words)
        self._rows[slot] = np.ascontiguousarray(words).view("V32").reshape(-1)
        self._used[slot] = True

    def unseen(self, macs: bytes) -> np.ndarray | None:
        """Positions of the MACs not seen before, in order: a MAC repeated within ``macs`` is seen from its second
        place on (``None``: every one is new); all are remembered."""
        if native.available():  # one pass in C over the table; the numpy below is its definition
            fresh = np.frombuffer(native.recent_unseen(self._macs.data, self._used.data, macs), dtype=bool)
        else:
            fresh = self._unseen_in_order(self.words(macs))
        return None if fresh.all() else np.flatnonzero(fresh)

    def _unseen_in_order(self, words: np.ndarray) -> np.ndarray:
        """Whether each MAC is new, taken in order: one with no earlier MAC of the batch in its slot is new unless
        the table held it; one with such MACs is new unless the latest of them (which then held the slot) equals it."""
        slot = self._slots(words)
        order = np.argsort(slot, kind="stable")  # each slot's MACs together, in the batch's order
        ranked, in_slot_order = slot[order], words[order]
        follows = np.zeros(len(slot), dtype=bool)
        follows[1:] = ranked[1:] == ranked[:-1]
        same_as_before = np.zeros(len(slot), dtype=bool)
        same_as_before[1:] = (in_slot_order[1:] == in_slot_order[:-1]).all(axis=1)
        known = np.empty(len(slot), dtype=bool)
        known[order] = np.where(follows, same_as_before, self.known(words)[order])
        self.remember(words)
        return ~known


class HeldRecords:
    """The records a guard holds in memory, indexed by key in C (:func:`native.collision_add`): a deterministic
    run's repeat of a held MAC is left out, every other record is kept, and each held record that shares an incoming
    record's key comes back as a pair to compare exactly. Both arrays double as they fill (the index kept at most
    half full), up to the ``limit`` of :meth:`add`: the records that find no room are the caller's (it spills
    them)."""

    def __init__(self, randomised: bool, records: int = _FIRST_RECORDS) -> None:
        self.randomised = randomised
        self.count = 0
        self._records = np.empty(max(records, 1), dtype=RECORD)
        self._slots = np.zeros((slots_for(len(self._records)), 2), dtype=np.uint64)

    def held(self) -> np.ndarray:
        return self._records[:self.count]

    def add(self, records: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
        """Check and keep ``records`` (see the class), holding ``limit`` records at most: the pairs as rows of (held
        index, position in ``records``), and how many of ``records`` were dealt with (the rest found no room)."""
        need = min(self.count + len(records), limit)
        if need > len(self._records):
            grown = np.empty(max(need, min(2 * len(self._records), limit)), dtype=RECORD)
            grown[:self.count] = self.held()
            self._records = grown
            self._slots = np.zeros((slots_for(len(grown)), 2), dtype=np.uint64)
            native.collision_place(self._slots.data, self._records.data, self.count)
        self.count, pairs, done = native.collision_add(self._slots.data, self._records.data, self.count,
                                                       np.ascontiguousarray(records).data, self.randomised,
                                                       max(0, min(len(self._records), limit) - self.count))
        return np.frombuffer(pairs, dtype=np.uint32).reshape(-1, 2), done


class CollisionGuard:
    """Remembers every (pseudonym, MAC) of a run and fails it if one pseudonym ever comes from two MACs.

    :param randomised: every occurrence has its own MAC, so any pseudonym seen twice is a collision.
    :param memory_records: records kept in memory before spilling to temporary files (by default
        ``MEMORY_RECORDS_NATIVE`` with the C engine, else ``MEMORY_RECORDS``).
    """

    def __init__(self, fmt: PseudonymFormat, randomised: bool, memory_records: int | None = None) -> None:
        self.format = fmt
        self.randomised = randomised
        self._native = native.available()
        if memory_records is None:
            memory_records = MEMORY_RECORDS_NATIVE if self._native else MEMORY_RECORDS
        self.memory_records = memory_records
        self._columns: list[str] = []
        self._resident = np.empty(0, dtype=RECORD)  # sorted by key (without the C engine)
        # indexed by key (with it), grown as needed up to the bound
        self._held = HeldRecords(randomised) if self._native else None
        self._spill: list[IO[bytes] | None] | None = None
        self.spilled_records = 0
        # a deterministic run sees most values again and again: a value whose exact MAC is already
        # recorded adds nothing to the check (a randomised run records every occurrence)
        self._recent = None if randomised else RecentMacs()

    def _column_index(self, column: str) -> int:
        try:
            return self._columns.index(column)
        except ValueError:
            self._columns.append(column)
            return len(self._columns) - 1

    def add(self, column: str, macs: bytes | Sequence[bytes], pseudonyms: Sequence[str] | None,
            count: int | None = None) -> None:
        """Record a batch of one column (its MACs as a list, or one after the other, and its pseudonyms,
        which may be ``None`` when the format spells the MAC's leading bits: they are not needed then);
        while the run is small, raise :class:`CollisionError` at once."""
        blob = macs if isinstance(macs, bytes) else b"".join(macs)
        count = len(blob) // 32 if count is None else count
        if not count:
            return
        if self._recent is not None:
            fresh = self._recent.unseen(blob)
            if fresh is not None:
                if not len(fresh):
                    return
                blob = np.frombuffer(blob, dtype=np.uint8).reshape(-1, 32)[fresh].tobytes()
                pseudonyms = [pseudonyms[i] for i in fresh.tolist()] if pseudonyms is not None else None
                count = len(fresh)
        records = np.empty(count, dtype=RECORD)
        if self.format.spells_leading_bits:
            records["key"] = np.frombuffer(blob, dtype=">u8")[::4]
        else:
            if pseudonyms is None:
                pseudonyms = self.format.encode_many(blob)
            records["key"] = np.fromiter(map(hash, pseudonyms), dtype=np.int64, count=count).view(np.uint64)
        records["mac"] = np.frombuffer(blob, dtype="V32")
        records["column"] = self._column_index(column)
        if self._spill is not None:
            self._write(records)
            return
        if self._held is not None:
            pairs, done = self._held.add(records, self.memory_records)
            self._check_pairs(self._held.held(), records, pairs)
            if done == len(records):
                return
            # the table is full: what it holds and the records that found no room go to the partitions, a slice
            # at a time (little memory on top of the table's), and finish() checks them there
            self._spill = [None] * (1 << PARTITION_BITS)
            held, self._held = self._held.held(), None
            for part in (held, records[done:]):
                for start in range(0, len(part), _SPILL_SLICE):
                    self._write(part[start:start + _SPILL_SLICE])
            return
        merged = np.concatenate([self._resident, records])
        merged = merged[np.argsort(merged["key"], kind="stable")]
        self._check(merged)
        if len(merged) <= self.memory_records:
            self._resident = merged
            return
        self._spill = [None] * (1 << PARTITION_BITS)
        self._resident = np.empty(0, dtype=RECORD)
        self._write(merged)

    def _write(self, records: np.ndarray) -> None:
        """Append ``records`` to the partition files; the key's top bits name the partition."""
        assert self._spill is not None
        partition = (records["key"] >> np.uint64(64 - PARTITION_BITS)).astype(np.uint8)
        order = np.argsort(partition, kind="stable")  # a radix sort for 8-bit keys
        data = memoryview(records.view(_RAW).take(order).tobytes())  # plain bytes: a fast gather
        bounds = np.concatenate([[0], np.cumsum(np.bincount(partition, minlength=1 << PARTITION_BITS))])
        bounds = (bounds * RECORD.itemsize).tolist()
        for p in range(1 << PARTITION_BITS):
            lo, hi = bounds[p], bounds[p + 1]
            if lo == hi:
                continue
            handle = self._spill[p]
            if handle is None:
                handle = self._spill[p] = tempfile.TemporaryFile(prefix="pseudonymise-collisions-",  # noqa: SIM115
                                                                 buffering=_SPILL_BUFFER)
            handle.write(data[lo:hi])
        self.spilled_records += len(records)

    def finish(self) -> None:
        """Check everything spilled to disk (memory-resident records were checked as they came)."""
        if self._spill is None:
            return
        try:
            for handle in self._spill:
                if handle is None:
                    continue
                handle.seek(0)
                records = np.frombuffer(handle.read(), dtype=RECORD)
                if self._native:
                    partition = HeldRecords(self.randomised, len(records))
                    pairs, _done = partition.add(records, len(records))  # room for every record
                    self._check_pairs(partition.held(), records, pairs)
                    continue
                order = np.argsort(records["key"])
                self._check(records.view(_RAW).take(order).view(RECORD))
        finally:
            self.close()

    @property
    def resident_records(self) -> int:
        """Records held in memory now (none once the run has spilled)."""
        return self._held.count if self._held is not None else len(self._resident)

    def close(self) -> None:
        """Forget the run (the temporary files are unlinked already; this closes them)."""
        self._held = None
        for handle in self._spill or ():
            if handle is not None:
                handle.close()
        self._spill = [None] * (1 << PARTITION_BITS) if self._spill is not None else None

    def _check(self, records: np.ndarray) -> None:
        """``records`` sorted by key: compare exactly the few groups whose keys are equal."""
        if len(records) < 2:
            return
        keys = records["key"]
        same_key = keys[1:] == keys[:-1]
        if not same_key.any():
            return
        if not self.randomised:
            # a group made of one MAC repeated is one value seen several times: no collision (the MACs are
            # compared only where the keys are equal: comparing every neighbour's 32 bytes costs more than the sort)
            at = np.flatnonzero(same_key)
            macs = records["mac"]
            same_key[at] = macs[at + 1] != macs[at]
            if not same_key.any():
                return
        for key in np.unique(keys[1:][same_key]):
            group = records[keys == key]
            first: dict[str, tuple[bytes, int]] = {}
            for mac, column in zip(group["mac"].tolist(), group["column"].tolist(), strict=True):
                pseudonym = self.format.encode(mac)
                prior = first.setdefault(pseudonym, (mac, column))
                if prior[0] is mac or (prior[0] == mac and not self.randomised):
                    continue
                raise self._collision(prior[1], column)

    def _check_pairs(self, held: np.ndarray, incoming: np.ndarray, pairs: np.ndarray) -> None:
        """Compare exactly each (held index, incoming position) pair of records sharing a key (:class:`HeldRecords`)."""
        for j, i in pairs.tolist():
            mac, other = held["mac"][j].tobytes(), incoming["mac"][i].tobytes()
            if (mac != other or self.randomised) and self.format.encode(mac) == self.format.encode(other):
                raise self._collision(int(held["column"][j]), int(incoming["column"][i]))

    def _collision(self, column: int, other: int) -> CollisionError:
        names = sorted({self._columns[column], self._columns[other]})
        return CollisionError(
            f"column {' and '.join(map(repr, names))}: two different values gave the same pseudonym "
            "in this run; the project's pseudonym format is too short for this data: issue a token "
            "with a longer format"
        )


class GuardAside:
    """A :class:`CollisionGuard` fed on a background thread of its own, in order, a few batches behind.

    The check's sorting and table look-ups then run beside the work that made the MACs (the C engine and
    numpy let go of the GIL). A collision is raised by a later :meth:`add` or by :meth:`finish`, which waits
    for every batch to be checked: call it before committing anything, as with the guard itself.
    """

    def __init__(self, guard: CollisionGuard, depth: int = 4) -> None:
        self.guard = guard
        self._jobs = Jobs(background=True, depth=depth, name="pseudonymise-collisions")

    def add(self, column: str, macs: bytes | Sequence[bytes], pseudonyms: Sequence[str] | None,
            count: int | None = None) -> None:
        self._jobs.submit(functools.partial(self.guard.add, column, macs, pseudonyms, count))

    def finish(self) -> None:
        try:
            self._jobs.drain()
        except BaseException:
            self.guard.close()
            raise
        self.guard.finish()

    def close(self) -> None:
        self._jobs.stop()
        self.guard.close()
