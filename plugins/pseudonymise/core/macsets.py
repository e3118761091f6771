"""An exact, bounded set of 32-byte MACs: what a deterministic run has already handed to escrow.

A value's MAC (docs/design.md §4) names it within its project, domain and key, so a run that remembers
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
        left_out = np.flatnonzero(self._add(macs) == 2)
        return left_out if len(left_out) else None

    def add_new(self, macs: bytes) -> tuple[np.ndarray | None, np.ndarray | None]:
        """:meth:`add`, also saying which MACs were not in the set before: ``(new, left_out)``, the positions of the
        MACs the set did not hold when called (a repeat of one such MAC among ``macs`` is new too) and of those left
        out (``None`` for none). One pass: :meth:`known` then :meth:`add` visit the table twice."""
        flags = self._add(macs)
        new, left_out = np.flatnonzero(flags), np.flatnonzero(flags == 2)
        return (new if len(new) else None), (left_out if len(left_out) else None)

    def _add(self, macs: bytes) -> np.ndarray:
        """For each MAC: 0 if the set held it, 1 if it did not and holds it now, 2 if it did not and had no room."""
        if self._native:
            flags = np.zeros(len(macs) // 32, dtype=np.uint8)
            pending = np.arange(len(flags))
            while True:  # grown only when the MACs really new fill it past half: memory follows the distinct values
                room = min(self.limit, len(self._used) // 2) - self.count
                added, found = native.seen_add(self._table.data, self._used.data, macs, room)
                self.count += added
                found_flags = np.frombuffer(found, dtype=np.uint8)
                flags[pending] = found_flags
                left_out = np.flatnonzero(found_flags == 2)
                if not len(left_out) or self.count >= self.limit:
                    break
                self._grow(2 * len(self._used))
                pending = pending[left_out]
                macs = np.frombuffer(macs, dtype="V32")[left_out].tobytes()
            return flags
        held = self._set
        before = len(held)
        flags = np.zeros(len(macs) // 32, dtype=np.uint8)
        added: set[bytes] = set()
        for i in range(len(flags)):
            mac = macs[32 * i:32 * i + 32]
            if mac in held:
                flags[i] = mac in added
            elif len(held) < self.limit:
                held.add(mac)
                added.add(mac)
                flags[i] = 1
            else:
                flags[i] = 2
        self.count = before + len(added)
        return flags


def slots_for(count: int) -> int:
    """The power-of-two number of slots that holds ``count`` MACs at most half full."""
    return 1 << max(1, (2 * count - 1).bit_length())


__all__ = ["LIMIT", "MacSet"]
