"""An exact, bounded set of 32-byte MACs: what a deterministic run has already handed to escrow.

A value's MAC (DESIGN.md §4) names it within its project, domain and key, so a run that remembers
every MAC it sealed seals and writes each distinct value once, however often it recurs. The set is
exact (whole MACs are compared; nothing is forgotten) up to ``limit`` MACs; past that
:meth:`MacSet.add` reports the MACs it left out, and the caller falls back to forgetting (the
escrow writer still keeps one row per pseudonym, so a value sealed twice costs time, never a row).

With the C engine the set is an open-addressing table (32 bytes a slot, kept at most half full,
doubled as it fills: 64 bytes per distinct value, 64 MiB at the default limit); without it, a Python
``set`` that answers the same.
"""

from __future__ import annotations

import numpy as np

from pseudonymise.core import native

#: Distinct MACs a set holds by default (the table is then 2**21 slots of 32 bytes: 64 MiB).
LIMIT = 1 << 20
_FIRST_SLOTS = 1 << 16


class MacSet:
    """The MACs added so far, up to ``limit`` of them (see the module's description)."""

    def __init__(self, limit: int = LIMIT) -> None:
        if limit < 1:
            raise ValueError("a set of MACs holds at least one")
        self.limit = limit
        self.count = 0
        self._native = native.available()
        self._set: set[bytes] = set()
        self._table = np.zeros(0, dtype=np.uint8)
        self._used = np.zeros(0, dtype=bool)
        if self._native:
            self._grow(min(_FIRST_SLOTS, slots_for(limit)))

    def _grow(self, slots: int) -> None:
        old_table, old_used = self._table, self._used
        self._table = np.zeros(32 * slots, dtype=np.uint8)
        self._used = np.zeros(slots, dtype=bool)
        if self.count:
            held = old_table.reshape(-1, 32)[old_used].tobytes()
            native.seen_add(self._table.data, self._used.data, held, self.count)

    def known(self, macs: bytes) -> np.ndarray:
        """Whether each MAC (32 bytes each, one after the other) is in the set."""
        if self._native:
            return np.frombuffer(native.seen_known(self._table.data, self._used.data, macs), dtype=bool)
        held = self._set
        return np.fromiter((macs[i:i + 32] in held for i in range(0, len(macs), 32)), dtype=bool,
                           count=len(macs) // 32)

    def add(self, macs: bytes) -> np.ndarray | None:
        """Add the MACs not yet in the set, in order, while there is room; return the positions of those left out
        (``None``: none was)."""
        if self._native:
            flags = np.zeros(len(macs) // 32, dtype=bool)
            pending = np.arange(len(flags))
            while True:  # grown only when the MACs really new fill it past half: memory follows the distinct values
                room = min(self.limit, len(self._used) // 2) - self.count
                added, left = native.seen_add(self._table.data, self._used.data, macs, room)
                self.count += added
                left_out = np.flatnonzero(np.frombuffer(left, dtype=bool))
                if not len(left_out) or self.count >= self.limit:
                    flags[pending[left_out]] = True
                    break
                self._grow(2 * len(self._used))
                pending = pending[left_out]
                macs = np.frombuffer(macs, dtype="V32")[left_out].tobytes()
        else:
            held = self._set
            flags = np.zeros(len(macs) // 32, dtype=bool)
            for i in range(len(flags)):
                mac = macs[32 * i:32 * i + 32]
                if mac in held:
                    continue
                if len(held) < self.limit:
                    held.add(mac)
                else:
                    flags[i] = True
            self.count = len(held)
        return np.flatnonzero(flags) if flags.any() else None


def slots_for(count: int) -> int:
    """The power-of-two number of slots that holds ``count`` MACs at most half full."""
    return 1 << max(1, (2 * count - 1).bit_length())


__all__ = ["LIMIT", "MacSet"]
