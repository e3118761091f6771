"""The de-identifying column actions (``date_shift``, ``generalise``, ``mask``, ``suppress``) applied to a batch.

A :class:`Deidentifier` is made once per run from the column policy and the token; for each batch it
takes the *source* values (so a ``date_shift`` subject that is pseudonymised in the same policy still
gives its offset from its original value) and returns the new values of the columns these actions
change, as Python lists (columns of values) or Arrow arrays (record batches), with the same results
either way. A ``date_shift`` offset is docs/design.md §4.7: ``HMAC-SHA256(key, "pseudonymise/v1/date-shift" NUL
domain NUL canonical(subject))``, its first 8 bytes big-endian modulo ``2 * max_days``, minus ``max_days``,
plus one when not negative. The MACs come from ``mac.py`` (here, in C, or in Vault Transit), like a
pseudonym's; a randomised project draws one key per run instead, so each subject keeps one offset
within the run and gets a new one in the next.

Errors name the column, the row (1 = the run's first row) and the fix, never a value.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pseudonymise.core.canonical import canonical_many
from pseudonymise.core.copytext import CopyText, decode_column
from pseudonymise.core.errors import DeidentifyError, UnsupportedTypeError, raise_alone
from pseudonymise.core.mac import Macs, keyed, token_macs
from pseudonymise.core.policy import DEIDENTIFY_ACTIONS, ColumnPolicy, ColumnRule, build_normaliser
from pseudonymise.core.tokens import Token

if TYPE_CHECKING:
    from pseudonymise.core.transit import TransitMac

DATE_SHIFT_LABEL = b"pseudonymise/v1/date-shift\x00"
#: date32 values (days since 1970-01-01) of 0001-01-01 and 9999-12-31: a shifted date must stay between them.
_FIRST_DAY, _LAST_DAY = dt.date.min.toordinal() - dt.date(1970, 1, 1).toordinal(), \
    dt.date.max.toordinal() - dt.date(1970, 1, 1).toordinal()
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")


def date_shift_label(domain: str) -> bytes:
    """What precedes a subject's canonical bytes in its date-shift MAC: the label, the domain and a NUL."""
    return DATE_SHIFT_LABEL + domain.encode("utf-8") + b"\x00"


def offsets(macs: bytes, max_days: int) -> np.ndarray:
    """The day offsets of docs/design.md §4.7 from 32-byte MACs, one after the other (int64, never 0)."""
    first = np.frombuffer(macs, dtype=">u8").reshape(-1, 4)[:, 0]
    shift = (first % np.uint64(2 * max_days)).astype(np.int64) - max_days
    shift[shift >= 0] += 1
    return shift


def _at(rule: ColumnRule, row: int) -> str:
    return f"column {rule.column!r}, row {row}"


# --- one column of Python values ------------------------------------------------------------------
def _temporal(value: Any, rule: ColumnRule, row: int) -> tuple[dt.date, str | None]:
    """A date or timestamp value, and how to write it back when it came as text (``None``: it did not)."""
    if isinstance(value, dt.date):
        return value, None
    if isinstance(value, str):
        try:
            if len(value) <= 10:
                return dt.date.fromisoformat(value), "date"
            sep = value[10] if value[10] in "T " else "T"
            return dt.datetime.fromisoformat(value), sep
        except ValueError:  # its text quotes the value
            pass
        raise_alone(DeidentifyError(
            f"{_at(rule, row)}: the text is not an ISO 8601 date or timestamp (YYYY-MM-DD, or YYYY-MM-DD HH:MM:SS "
            f"with an optional offset), which {rule.action} needs; fix the source, or cast the column to a date in "
            "the source query"))
    raise UnsupportedTypeError(f"column {rule.column!r} holds {type(value).__name__} values; {rule.action} "
                               f"{'to ' + rule.to + ' ' if rule.to else ''}takes dates, timestamps or ISO 8601 "
                               "text: cast the column in the source query or choose another action")


def _shift(value: Any, days: int, rule: ColumnRule, row: int) -> Any:
    moment, text = _temporal(value, rule, row)
    delta = dt.timedelta(days=days)
    try:
        if isinstance(moment, dt.datetime) and moment.tzinfo is not None:
            # the instant moves by whole days of 24 hours and keeps its zone (the same wall time in a fixed offset)
            shifted: dt.date = (moment.astimezone(dt.UTC) + delta).astimezone(moment.tzinfo)
        else:
            shifted = moment + delta
    except (OverflowError, ValueError):  # pandas' Timestamp says OutOfBoundsDatetime, a ValueError
        raise_alone(DeidentifyError(
            f"{_at(rule, row)}: the shifted date falls outside the years 1 to 9999 (or the column type's range); "
            "lower max_days, or fix the source date"))
    if text is None:
        return shifted
    return shifted.isoformat() if text == "date" else shifted.isoformat(sep=text)  # type: ignore[call-arg]


def _generalise_date(value: Any, rule: ColumnRule, row: int) -> str:
    moment, _ = _temporal(value, rule, row)
    day = moment.date() if isinstance(moment, dt.datetime) else moment
    if rule.to == "year":
        return f"{day.year:04d}"
    if rule.to == "month":
        return f"{day.year:04d}-{day.month:02d}"
    year, week, _ = day.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _integer(value: Any, rule: ColumnRule, row: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if _INTEGER.match(value):
            return int(value)
        raise_alone(DeidentifyError(f"{_at(rule, row)}: the text is not a whole number, which integer bands need; "
                                    "fix the source, or cast the column to an integer in the source query"))
    kind = "boolean" if isinstance(value, bool) else type(value).__name__
    raise UnsupportedTypeError(f"column {rule.column!r} holds {kind} values; generalise with 'width' takes whole "
                               "numbers: cast the column to an integer in the source query")


def band(value: int, rule: ColumnRule) -> str:
    """The band of an integer: ``"<bottom"``, ``">=top"``, ``"lo-hi"`` (both ends included), or ``"lo"`` for width 1."""
    if rule.bottom is not None and value < rule.bottom:
        return f"<{rule.bottom}"
    if rule.top is not None and value >= rule.top:
        return f">={rule.top}"
    width = rule.width
    assert width is not None
    origin = rule.bottom if rule.bottom is not None else 0
    low = origin + (value - origin) // width * width
    return str(low) if width == 1 else f"{low}-{low + width - 1}"


def _text(value: Any, rule: ColumnRule) -> str:
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise UnsupportedTypeError(f"column {rule.column!r} holds {type(value).__name__} values; {rule.action} takes "
                               "text (or whole numbers, as their digits): cast the column to text in the source query")


def mask(text: str, rule: ColumnRule) -> str:
    """``text`` with all but its first ``keep_first`` or last ``keep_last`` characters replaced; a value no longer
    than that is replaced whole (masking never shows a whole value)."""
    keep = rule.keep_first if rule.keep_first is not None else rule.keep_last
    assert keep is not None
    hidden = len(text) - keep
    if hidden <= 0:
        return rule.mask_char * len(text)
    return text[:keep] + rule.mask_char * hidden if rule.keep_first is not None else rule.mask_char * hidden + text[hidden:]


def _value_function(rule: ColumnRule) -> Callable[[Any, int], Any]:
    """What ``generalise`` or ``mask`` does to one non-NULL value (given its row number)."""
    if rule.action == "mask":
        return lambda v, row: mask(_text(v, rule), rule)
    if rule.to is not None:
        return lambda v, row: _generalise_date(v, rule, row)
    if rule.width is not None:
        return lambda v, row: band(_integer(v, rule, row), rule)
    length = rule.prefix
    return lambda v, row: _text(v, rule)[:length]


# --- the engine ---------------------------------------------------------------------------------------
class Deidentifier:
    """The de-identifying actions of a policy, for one run.

    :param token: the run's verified pseudonymisation token (its key makes the date-shift MACs).
    :param transit: the Vault Transit client when the token's key is held there.
    :param randomised: draw a fresh key for this run (a randomised project: one offset per subject per run).
    """

    def __init__(self, policy: ColumnPolicy, token: Token, transit: TransitMac | None = None,
                 randomised: bool = False) -> None:
        self.rules = [r for r in policy.rules.values() if r.action in DEIDENTIFY_ACTIONS]
        self._policy = policy
        self._token, self._transit = token, transit
        self._run_key = os.urandom(32) if randomised else None
        self._macs: dict[str, Macs] = {}

    @classmethod
    def of(cls, policy: ColumnPolicy, token: Token, transit: TransitMac | None = None,
           randomised: bool = False) -> Deidentifier | None:
        """A deidentifier when the policy has a de-identifying action, else ``None`` (nothing to do per batch)."""
        return cls(policy, token, transit, randomised) if policy.deidentified_columns else None

    def _macs_for(self, domain: str) -> Macs:
        macs = self._macs.get(domain)
        if macs is None:
            label = date_shift_label(domain)
            macs = self._macs[domain] = (keyed(self._run_key, label) if self._run_key is not None
                                         else token_macs(self._token, self._transit, label))
        return macs

    def subject_offsets(self, subjects: Sequence[Any], rule: ColumnRule) -> list[int | None]:
        """The day offset of each subject value (``None`` for a NULL subject), under ``rule``'s max_days and domain.

        A subject column that the policy pseudonymises with normalisers is normalised the same way first, so the
        offset follows the identity its pseudonym follows.
        """
        assert rule.subject is not None and rule.max_days is not None
        subject_rule = self._policy.rules.get(rule.subject)
        normalise = (build_normaliser(subject_rule.normalise, rule.subject)
                     if subject_rule is not None and subject_rule.action == "pseudonymise" else None)
        present = [v for v in subjects if v is not None]
        if normalise is not None:
            present = list(map(normalise, present))
        if not present:
            return [None] * len(subjects)
        _, data = canonical_many(present, rule.subject)
        shifts = iter(offsets(self._macs_for(rule.domain).mac_many(data), rule.max_days).tolist())
        return [None if v is None else next(shifts) for v in subjects]

    # --- columns of Python values ---
    def columns(self, batch: Mapping[str, Sequence[Any]], first_row: int,
                rules: Sequence[ColumnRule] | None = None) -> dict[str, list[Any]]:
        """The new values of every de-identified column of a batch of columns (``first_row``: rows before it), or
        only of those ``rules`` name."""
        rows = len(next(iter(batch.values()))) if batch else 0
        decoded: dict[str, list[Any]] = {}

        def values(name: str) -> list[Any]:
            if name not in decoded:
                column = batch[name]
                decoded[name] = decode_column(column) if isinstance(column, CopyText) else list(column)
            return decoded[name]

        out: dict[str, list[Any]] = {}
        shifts: dict[tuple[str, int, str], list[int | None]] = {}
        for rule in self.rules if rules is None else rules:
            if rule.action == "suppress":
                out[rule.column] = [None] * rows
                continue
            column = values(rule.column)
            if rule.action == "date_shift":
                key = (rule.subject, rule.max_days, rule.domain)
                if key not in shifts:
                    shifts[key] = self.subject_offsets(values(rule.subject), rule)  # type: ignore[arg-type]
                text = _iso_dates(column)
                out[rule.column] = (
                    [None if v is None or d is None else _shift(v, d, rule, first_row + i)
                     for i, (v, d) in enumerate(zip(column, shifts[key], strict=True), 1)] if text is None
                    else _shift_days(text, shifts[key], rule, first_row).cast(pa.string()).to_pylist())
            else:
                change = _value_function(rule)
                out[rule.column] = [None if v is None else change(v, first_row + i) for i, v in enumerate(column, 1)]
        return out

    # --- Arrow record batches ---
    def arrays(self, batch: pa.RecordBatch, first_row: int) -> dict[str, pa.Array]:
        """The new arrays of every de-identified column of a record batch: dates shifted keep their Arrow type,
        generalised and masked values are ``pa.string()``, suppressed columns all NULL of their own type."""
        names = batch.schema.names
        out: dict[str, pa.Array] = {}
        pending: list[ColumnRule] = []
        shifts: dict[tuple[str, int, str], list[int | None]] = {}
        for rule in self.rules:
            array = batch.column(names.index(rule.column))
            if rule.action == "suppress":
                out[rule.column] = pa.nulls(len(array), type=array.type)
            elif rule.action == "date_shift" and (pa.types.is_date32(array.type) or
                                                  (days := _iso_dates(array)) is not None):
                key = (rule.subject, rule.max_days, rule.domain)
                if key not in shifts:
                    shifts[key] = self.subject_offsets(_pylist(batch.column(names.index(rule.subject)),  # type: ignore[arg-type]
                                                               rule.subject), rule)  # type: ignore[arg-type]
                if pa.types.is_date32(array.type):
                    out[rule.column] = _shift_days(array, shifts[key], rule, first_row)
                else:  # ISO date text stays text, of its own Arrow type
                    out[rule.column] = _shift_days(days, shifts[key], rule, first_row).cast(array.type)
            else:
                pending.append(rule)
        if pending:
            lists = {name: _pylist(batch.column(names.index(name)), name)
                     for name in {*(r.column for r in pending), *(r.subject for r in pending if r.subject)}}
            done = self.columns(lists, first_row, pending)
            for rule in pending:
                kind = batch.column(names.index(rule.column)).type if rule.action == "date_shift" else pa.string()
                try:
                    out[rule.column] = pa.array(done[rule.column], type=kind)
                except (pa.ArrowException, OverflowError, ValueError):
                    raise_alone(DeidentifyError(
                        f"column {rule.column!r}: a shifted timestamp does not fit the column's Arrow type {kind}; "
                        "lower max_days, or cast the column to a wider type"))
        return out


def _pylist(array: pa.Array, column: str) -> list[Any]:
    try:
        return array.to_pylist()  # type: ignore[no-any-return]
    except (pa.ArrowException, ValueError, OverflowError):  # e.g. a date past year 9999: its text names it
        error = UnsupportedTypeError(f"column {column!r}: its Arrow {array.type} values cannot be read as Python "
                                     "values; cast the column in the source")
    raise_alone(error)


def _iso_dates(values: Sequence[Any] | pa.Array) -> pa.Array | None:
    """Text that is all ISO dates (``YYYY-MM-DD``, as COPY text, CSV files and SQLite hold dates) as a date32
    array, parsed by Arrow; ``None`` when any value is of another form (the per-value path then takes the column,
    with its timestamps, other ISO forms and row-numbered errors)."""
    try:
        array = values if isinstance(values, pa.Array) else pa.array(values, type=pa.string())
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            return None
        return array.cast(pa.date32())
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # not all ISO dates: per value
        return None


def _shift_days(array: pa.Array, shifts: list[int | None], rule: ColumnRule, first_row: int) -> pa.Array:
    """A date32 array moved by the offsets of its rows' subjects, in numpy (NULL date or subject: NULL)."""
    days = array.cast(pa.int32()).to_numpy(zero_copy_only=False)
    nulls = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool) | np.array(
        [d is None for d in shifts], dtype=bool)
    moved = np.nan_to_num(days, nan=0).astype(np.int64) + np.array([d or 0 for d in shifts], dtype=np.int64)
    bad = ~nulls & ((moved < _FIRST_DAY) | (moved > _LAST_DAY))
    if bad.any():
        raise DeidentifyError(f"{_at(rule, first_row + int(np.flatnonzero(bad)[0]) + 1)}: the shifted date falls "
                              "outside the years 1 to 9999 (or the column type's range); lower max_days, or fix the "
                              "source date")
    return pa.array(np.where(nulls, 0, moved).astype(np.int32), type=pa.int32(), mask=nulls).cast(pa.date32())


__all__ = ["DATE_SHIFT_LABEL", "Deidentifier", "band", "date_shift_label", "mask", "offsets"]
