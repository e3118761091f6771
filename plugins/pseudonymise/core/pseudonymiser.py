"""The pseudonym engines (docs/design.md §4): a column policy applied to whole batches, first-level or secondary.

A :class:`Pseudonymiser` is made from a verified pseudonymisation token and a
:class:`~pseudonymise.core.policy.ColumnPolicy`; it turns a batch (a mapping of column name to a
sequence of values, a :class:`CopyBlock` of rows, or a ``pyarrow.RecordBatch``) into the output batch
of the same kind, counts NULLs and values,
collects what escrow must seal for reversible projects, and fails the run if two different values
ever meet in one pseudonym. :class:`SecondaryPseudonymiser` does the same with a secondary token over
existing pseudonyms. Both share :class:`PseudonymEngine`: the per-batch flow, the C engine's plans for
COPY blocks and Arrow arrays, the collision check and the counts.

Work is done a column at a time: canonical bytes of the whole column, then its MACs in one tight
loop (``mac.py``), then all pseudonyms at once (:meth:`PseudonymFormat.encode_many`), with no object
per value beyond the bytes and texts themselves. Call ``finish()`` once the last batch is done and
before committing the output: large runs complete their collision check there.
"""

from __future__ import annotations

import operator
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pseudonymise.core import native
from pseudonymise.core.canonical import canonical_many
from pseudonymise.core.collisions import CollisionGuard, GuardAside, RecentMacs
from pseudonymise.core.copytext import CopyBlock
from pseudonymise.core.deidentify import Deidentifier
from pseudonymise.core.errors import PolicyError, TokenKindError, UnsupportedTypeError, raise_alone
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.mac import (
    SECONDARY_LABEL,
    Macs,
    check_custody,
    primary_label,
    random_macs,
    token_macs,
)
from pseudonymise.core.macsets import LIMIT as MAC_SET_LIMIT
from pseudonymise.core.macsets import MacSet
from pseudonymise.core.policy import ColumnPolicy, ColumnRule, build_normaliser
from pseudonymise.core.sealer import EscrowBlock, EscrowBlocks, EscrowItem, EscrowItems
from pseudonymise.core.tokens import Token

if TYPE_CHECKING:
    from pseudonymise.core.transit import TransitMac


# --- results ----------------------------------------------------------------------------------
@dataclass
class Stats:
    """Counts of a run; never a data value."""

    rows_in: int = 0
    rows_out: int = 0
    nulls: int = 0
    values_pseudonymised: int = 0
    escrow_rows: int = 0

    def add(self, other: Stats) -> None:
        for name in ("rows_in", "rows_out", "nulls", "values_pseudonymised", "escrow_rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "nulls": self.nulls,
            "values_pseudonymised": self.values_pseudonymised,
            "escrow_rows": self.escrow_rows,
        }


@dataclass
class Batch:
    """An output batch: columns in order, their counts, and the items escrow must seal.

    In a deterministic run, a value already listed earlier in the same run is not listed again (past
    2**20 distinct values, mostly not: see :class:`_Escrowed`): write every batch's escrow, in order, in
    the run's transaction.
    """

    columns: dict[str, list[Any]] | CopyBlock | pa.RecordBatch
    stats: Stats
    escrow: Sequence[EscrowItem] | EscrowBlocks = field(default_factory=list)


# --- columns ----------------------------------------------------------------------------------
def _without_nulls(values: Sequence[Any]) -> tuple[list[Any], int]:
    """The non-NULL values of a column, and how many NULLs there were (by identity: no ``__eq__`` runs)."""
    values = values if isinstance(values, list) else list(values)
    nulls = sum(map(operator.is_, values, repeat(None)))
    return ([v for v in values if v is not None] if nulls else values), nulls


def _with_nulls(values: Sequence[Any], pseudonyms: list[str], nulls: int) -> list[str | None]:
    """``pseudonyms`` put back in the rows of the non-NULL ``values``, NULL elsewhere."""
    if not nulls:
        return pseudonyms  # type: ignore[return-value]
    it = iter(pseudonyms)
    return [None if v is None else next(it) for v in values]


def _as_list(values: Sequence[Any]) -> list[Any]:
    """A kept column passes through: lists (and their subclasses) as they are, anything else copied."""
    return values if isinstance(values, list) else list(values)


def _python_values(array: pa.Array, column: str) -> list[Any]:
    """An Arrow array's values as Python objects (for the pure-Python engine), or a clear error naming the column."""
    try:
        return array.to_pylist()  # type: ignore[no-any-return]
    except (pa.ArrowException, ValueError, OverflowError) as exc:  # e.g. a date past year 9999: its text names it
        error = UnsupportedTypeError(
            f"column {column!r}: its Arrow {array.type} values cannot be read as Python values "
            f"({exc.__class__.__name__}); cast the column in the source"
        )
    raise_alone(error)


def _batch_size(columns: Mapping[str, Sequence[Any]]) -> int:
    sizes = {len(v) for v in columns.values()}
    if len(sizes) > 1:
        raise PolicyError("the batch's columns have different lengths; every column must have one value per row")
    return sizes.pop() if sizes else 0


def _nfc_utf8(value: bytes) -> bytes:
    """The C engine's callback for non-ASCII values: canonical bytes of text (NFC, UTF-8)."""
    return unicodedata.normalize("NFC", value.decode("utf-8")).encode("utf-8")


def _canonical_callback(names: Sequence[str], column: str) -> Callable[[bytes], bytes]:
    """The C engine's callback for a column's non-ASCII values: its normalisers, then NFC, as UTF-8."""
    normalise = build_normaliser(names, column)
    if normalise is None:
        return _nfc_utf8

    def canonical_text(value: bytes) -> bytes:
        return unicodedata.normalize("NFC", normalise(value.decode("utf-8"))).encode("utf-8")

    return canonical_text


class _Escrowed:
    """The MACs a deterministic run has already handed to escrow.

    A value listed for escrow earlier in the run (an earlier batch, or an earlier column of the same
    batch) is not sealed and written again: its row is already in this run's transaction. The MACs
    go into an exact :class:`MacSet`, so each distinct value of the run is sealed and staged once
    (repeats within one column of one batch are left to the escrow writer, which keeps the first).
    Past the set's limit, the MACs it leaves out go to a :class:`RecentMacs` table, which forgets:
    such a value may be sealed again (escrow keeps one row).
    """

    def __init__(self, limit: int = MAC_SET_LIMIT) -> None:
        self._sealed = MacSet(limit)
        self._recent: RecentMacs | None = None  # past the set's limit only

    @property
    def exact(self) -> bool:
        """Whether every MAC listed so far is remembered (the set has not overflowed): then what
        :meth:`unsealed` gives holds no value listed before."""
        return self._recent is None

    def unsealed(self, macs: bytes) -> np.ndarray | None:
        """Positions of the MACs not listed before (``None``: none was); all are remembered from now on."""
        new, left_out = self._sealed.add_new(macs)
        count = len(macs) // 32
        if new is not None and self._recent is not None:
            new = new[~self._recent.known(RecentMacs.words(macs)[new])]
        if left_out is not None:
            if self._recent is None:
                self._recent = RecentMacs()
            self._recent.remember(RecentMacs.words(macs)[left_out])
        if new is None:
            return np.zeros(0, dtype=np.intp) if count else None
        return None if len(new) == count else new


@dataclass(frozen=True)
class _CopyPlan:
    """The C engine's plan for every source column, and the pseudonymised columns its results follow."""

    block: native.BlockPlan
    pseudonymised: list[str]


# --- the engines ------------------------------------------------------------------------------
class PseudonymEngine(ABC):
    """What both engines share: one batch's flow through the policy (columns or :class:`CopyBlock` rows),
    the C engine's plan for a set of source columns (made once), the collision check and the counts.

    An engine says how it pseudonymises one column (:meth:`_column`), what the C engine does with one
    (:meth:`_column_plan`), and what escrow a batch leaves (:meth:`_new_escrow`, :meth:`_block_escrow`).
    """

    def __init__(self, token: Token, policy: ColumnPolicy, transit: TransitMac | None, fmt: PseudonymFormat,
                 randomised: bool) -> None:
        self.token = token
        self.policy = policy
        self.format = fmt
        self.stats = Stats()
        self._transit = transit
        self._guard: CollisionGuard | GuardAside = CollisionGuard(fmt, randomised)
        self._plans: dict[tuple[str, ...], _CopyPlan | None] = {}
        self._arrow_plans: dict[str, native.ColumnPlan] = {}
        self._beside: ThreadPoolExecutor | None = None  # the helper thread of hash_columns_side_by_side
        #: the policy's de-identifying actions (``None`` when it has none: then no batch pays for them)
        self._deidentifier: Deidentifier | None = None

    # --- what each engine says ---
    @abstractmethod
    def _column(self, values: Sequence[Any], rule: ColumnRule, stats: Stats,
                escrow: EscrowItems | None) -> list[str | None]:
        """One pseudonymised column of a batch, its counts added to ``stats`` and what escrow must seal to ``escrow``."""

    @abstractmethod
    def _column_plan(self, rule: ColumnRule) -> native.ColumnPlan:
        """The C engine's plan for a pseudonymised column."""

    def _new_escrow(self) -> EscrowItems | None:
        """Where a batch's column path collects what escrow must seal (``None``: nothing to seal)."""
        return None

    def _block_escrow(self, results: list[tuple[str, native.ColumnResult, str]]) -> Sequence[EscrowItem] | EscrowBlocks:
        """What escrow must seal of the C engine's pseudonymised columns: (column, result, type tag) each."""
        return []

    def _arrow_type_tag(self, arrow_type: pa.DataType) -> str | None:
        """The type tag of a pseudonymised Arrow column's values when the C engine reads it (``None``: it does not)."""
        return native.arrow_type_tag(arrow_type)

    def _refuse_input(self, column: str, mismatched: int, values: int) -> PolicyError:
        """The error for a column whose input the engine's plan checked and found wrong."""
        return PolicyError(f"column {column!r}: {mismatched} of {values} values are not in the expected format")

    # --- the shared flow ---
    def output_columns(self, columns: Sequence[str]) -> list[str]:
        return [r.column for r in self.policy.plan(columns) if r.action != "drop"]

    def pseudonymise_batch(self, columns: Mapping[str, Sequence[Any]] | CopyBlock,
                           source_columns: Sequence[str] | None = None) -> Batch:
        """Apply the policy to one batch; the policy is checked against the batch's columns first.

        A :class:`CopyBlock` (rows of ``source_columns`` in COPY text) gives a :class:`Batch` whose
        ``columns`` is a :class:`CopyBlock` too, when :meth:`takes_copy_blocks` says so.
        """
        if isinstance(columns, CopyBlock):
            return self._pseudonymise_block(columns, source_columns or ())
        if isinstance(columns, pa.RecordBatch):
            return self.pseudonymise_record_batch(columns)
        rows = _batch_size(columns)
        plan = self.policy.plan(list(columns))
        changed = self._deidentifier.columns(columns, self.stats.rows_in) if self._deidentifier else None
        done, stats, escrow = self._python_columns([(r, columns[r.column]) for r in plan if r.action == "pseudonymise"],
                                                   rows)
        if changed:
            done.update(changed)
        out = {rule.column: _as_list(columns[rule.column]) if rule.action == "keep" else done[rule.column]
               for rule in plan if rule.action != "drop"}
        return Batch(out, stats, escrow)

    def pseudonymise_record_batch(self, batch: pa.RecordBatch) -> Batch:
        """Apply the policy to one ``pyarrow.RecordBatch``; the :class:`Batch` it gives holds a ``pyarrow.RecordBatch``.

        Accepts any ``pyarrow.RecordBatch`` whose column names are the source's columns (distinct; the policy is
        checked against them first, as :meth:`pseudonymise_batch` does), of any length, sliced or not. Out comes a
        record batch of the same rows: kept columns as they are (same Arrow type, not copied), dropped columns
        left out, pseudonymised columns as ``pa.string()`` arrays, NULL where the input was NULL. The output's
        columns are :meth:`output_columns`, in the input's order.

        Pseudonymised columns of type string, large_string, binary, large_binary, (u)int8-64, date32 or bool are
        read by the C engine straight from their Arrow buffers, with no Python object per value. Any other type
        (timestamps, dictionaries, ...), a key held in Vault Transit, or no C engine: the batch's pseudonymised
        columns go through the pure-Python engine instead (``to_pylist``), with the same pseudonyms, counts and
        escrow, and the same errors (floats refused, secondary input checked against the source format).
        ``Batch.escrow`` is what escrow must seal (write every batch's, in order, with ``EscrowWriter``); the
        collision check sees every value; call :meth:`finish` after the last batch, before committing.

        Columns of a de-identifying action (``date_shift``, ``generalise``, ``mask``, ``suppress``) come from
        ``deidentify.py``, computed from this batch's source values (a ``date_shift`` subject before it is
        pseudonymised): shifted dates keep their Arrow type, generalised and masked values are ``pa.string()``.
        """
        names = batch.schema.names
        if len(set(names)) != len(names):
            raise PolicyError("the record batch has duplicate column names; give every column its own name")
        plan = self.policy.plan(names)
        changed = self._deidentifier.arrays(batch, self.stats.rows_in) if self._deidentifier else None
        targets = [(i, rule) for i, rule in enumerate(plan) if rule.action == "pseudonymise"]
        tags = [self._arrow_type_tag(batch.column(i).type) for i, _ in targets]
        done: dict[str, pa.Array]
        if native.available() and self._transit is None and None not in tags:
            arrays = self._arrow_columns(batch, targets)
            done = {rule.column: array for (_, rule), (array, _) in zip(targets, arrays, strict=True)}
            stats, escrow = self._native_results([r.column for _, r in targets], [found for _, found in arrays],
                                                 batch.num_rows, tags)  # type: ignore[arg-type]
        else:
            values = [(rule, _python_values(batch.column(i), rule.column)) for i, rule in targets]
            lists, stats, escrow = self._python_columns(values, batch.num_rows)
            done = {column: pa.array(pseudonyms, type=pa.string()) for column, pseudonyms in lists.items()}
        if changed:
            done.update(changed)
        kept = [(rule.column, batch.column(i) if rule.action == "keep" else done[rule.column])
                for i, rule in enumerate(plan) if rule.action != "drop"]
        out = pa.RecordBatch.from_arrays([a for _, a in kept], names=[n for n, _ in kept])
        return Batch(out, stats, escrow)

    def _arrow_columns(self, batch: pa.RecordBatch,
                       targets: list[tuple[int, ColumnRule]]) -> list[tuple[pa.StringArray, native.ColumnResult]]:
        """The batch's pseudonymised columns through the C engine, in order: after :meth:`hash_columns_side_by_side`,
        the second half of them on the helper thread while this thread does the first (the C engine lets go of the
        GIL). An error is the one the columns give in order, raised once both halves are done."""
        def run(part: list[tuple[int, ColumnRule]]) -> list[tuple[pa.StringArray, native.ColumnResult]]:
            return [native.arrow_column(batch.column(i), self._arrow_plan(rule), rule.column) for i, rule in part]

        if self._beside is None or len(targets) < 2:
            return run(targets)
        for _, rule in targets:
            self._arrow_plan(rule)  # made here, once, not by two threads at once
        half = len(targets) // 2
        rest = self._beside.submit(run, targets[half:])
        try:
            first = run(targets[:half])
        except BaseException:
            wait([rest])
            raise
        return first + rest.result()

    def hash_columns_side_by_side(self) -> None:
        """Let a record batch's pseudonymised columns go through the C engine two at a time, half of them on a
        helper thread (files: the run's other threads leave a core to it); :meth:`finish` or :meth:`close` ends
        that thread."""
        if self._beside is None:
            self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pseudonymise-engine")

    def _python_columns(self, columns: Sequence[tuple[ColumnRule, Sequence[Any]]],
                        rows: int) -> tuple[dict[str, list[Any]], Stats, Sequence[EscrowItem]]:
        """A batch's pseudonymised columns through the pure-Python engine: their pseudonyms, the counts, the escrow."""
        stats = Stats(rows_in=rows, rows_out=rows)
        escrow = self._new_escrow()
        out = {rule.column: self._column(values, rule, stats, escrow) for rule, values in columns}
        self.stats.add(stats)
        return out, stats, escrow or []

    def _arrow_plan(self, rule: ColumnRule) -> native.ColumnPlan:
        """The C engine's plan of a pseudonymised column for Arrow arrays, made once per column."""
        plan = self._arrow_plans.get(rule.column)
        if plan is None:
            plan = self._arrow_plans[rule.column] = self._column_plan(rule)
        return plan

    def takes_copy_blocks(self, columns: Sequence[str]) -> bool:
        """Whether :meth:`pseudonymise_batch` can take :class:`CopyBlock` rows of these source columns:
        with the C engine and the key at hand (not in Vault Transit)."""
        return self._copy_plan(columns) is not None

    def _copy_plan(self, columns: Sequence[str]) -> _CopyPlan | None:
        key = tuple(columns)
        if key not in self._plans:
            plan = None
            if native.available() and self._transit is None and self._deidentifier is None:
                rules = self.policy.plan(columns)
                if any(r.action != "drop" for r in rules):
                    plan = _CopyPlan(native.BlockPlan(tuple(self._column_plan(r) if r.action == "pseudonymise" else
                                                            native.KEEP if r.action == "keep" else native.DROP
                                                            for r in rules)),
                                     [r.column for r in rules if r.action == "pseudonymise"])
            self._plans[key] = plan
        return self._plans[key]

    def _pseudonymise_block(self, block: CopyBlock, columns: Sequence[str]) -> Batch:
        """The block through the C engine; the collision check sees every column before any escrow is listed."""
        plan = self._copy_plan(columns)
        if plan is None:
            raise PolicyError("this run cannot pseudonymise COPY text directly (no C engine, a key in Vault Transit, "
                              "or de-identifying actions in the policy); read the source as columns")
        result = native.copy_block(block.data, plan.block)
        # COPY text gives text: the same type tag as the column path, which decodes it to str
        stats, escrow = self._native_results(plan.pseudonymised, result.columns, result.rows,
                                             ["str"] * len(plan.pseudonymised))
        return Batch(CopyBlock(result.data, result.rows), stats, escrow)

    def _native_results(self, columns: Sequence[str], results: Sequence[native.ColumnResult], rows: int,
                        tags: Sequence[str]) -> tuple[Stats, Sequence[EscrowItem] | EscrowBlocks]:
        """A batch's pseudonymised columns as the C engine left them (COPY block or Arrow arrays): input the
        plan's check found wrong refused, the collision check fed with every column before any escrow is
        listed, the counts, and what escrow must seal (values of the type ``tags`` name)."""
        for column, found in zip(columns, results, strict=True):
            if found.mismatched:
                raise self._refuse_input(column, found.mismatched, len(found.macs) // 32)
        stats = Stats(rows_in=rows, rows_out=rows)
        for column, found in zip(columns, results, strict=True):
            count = len(found.macs) // 32
            self._guard.add(column, found.macs, None, count=count)
            stats.nulls += found.nulls
            stats.values_pseudonymised += count
        escrow = self._block_escrow(list(zip(columns, results, tags, strict=True)))
        self.stats.add(stats)
        return stats, escrow

    def value_function(self, rule: ColumnRule, flush_every: int) -> Any:
        """A pseudonymised column as the C engine's per-value callable (:func:`native.value_function`), for SQLite
        to call: the column's plan (key, normalisers, domain, format) bound in, its MACs fed to this run's
        collision check every ``flush_every`` values. Only with the C engine and the key at hand, for a run that
        seals no escrow and checks no input format (first-level, irreversible)."""
        if self._transit is not None or not native.available():
            raise PolicyError("pseudonymising inside SQLite needs the C engine and the key at hand (not in Vault Transit)")

        def collide(macs: bytes) -> None:
            self._guard.add(rule.column, macs, None, count=len(macs) // 32)

        return native.value_function(self._column_plan(rule), collide, flush_every)

    def add_counts(self, rows: int, nulls: int, values: int) -> None:
        """Counts of rows pseudonymised outside :meth:`pseudonymise_batch` (inside SQLite, say)."""
        self.stats.add(Stats(rows_in=rows, rows_out=rows, nulls=nulls, values_pseudonymised=values))
    def check_collisions_aside(self) -> None:
        """Run this run's collision check on a background thread (before the first batch): a collision is then
        raised by a later batch or by :meth:`finish`, still before anything is committed."""
        if isinstance(self._guard, CollisionGuard):
            self._guard = GuardAside(self._guard)

    def finish(self) -> None:
        """End of the run: complete the collision check (docs/design.md §4.6); raise before anything is committed."""
        self._end_beside()
        self._guard.finish()

    def close(self) -> None:
        """Release what the run holds (temporary files of the collision check, the helper thread), e.g. after a
        failure."""
        self._end_beside()
        self._guard.close()

    def _end_beside(self) -> None:
        if self._beside is not None:
            self._beside.shutdown(wait=True)
            self._beside = None


class Pseudonymiser(PseudonymEngine):
    """Applies a column policy with a verified ``pseudonymisation`` token to batches of a run."""

    def __init__(self, token: Token, policy: ColumnPolicy, transit: TransitMac | None = None) -> None:
        """:param transit: a :class:`~pseudonymise.core.transit.TransitMac` when the token's key is held in
        Vault Transit (the token then carries ``key_ref`` instead of ``key``)."""
        if token.kind != "pseudonymisation" or (token.key is None and token.key_ref is None):
            raise TokenKindError(
                f"token {token.jti} is a {token.kind!r} token; pseudonymising needs a 'pseudonymisation' token"
            )
        check_custody(token, transit)
        randomised = token.treatment == "randomised"
        super().__init__(token, policy, transit, token.format, randomised)
        self.randomised = randomised
        self.reversible = token.reversible
        self._escrowed = _Escrowed() if self.reversible and not self.randomised else None
        self._macs: dict[str, Macs] = {}
        self._deidentifier = Deidentifier.of(policy, token, transit, randomised)

    def _macs_for(self, domain: str) -> Macs:
        macs = self._macs.get(domain)
        if macs is None:
            macs = self._macs[domain] = token_macs(self.token, self._transit, primary_label(domain))
        return macs

    def pseudonymise_values(self, values: Sequence[Any], rule: ColumnRule, stats: Stats | None = None,
                            escrow: EscrowItems | list[EscrowItem] | None = None) -> list[str | None]:
        """Pseudonymise one column of a batch under ``rule``; what escrow must seal goes to ``escrow``."""
        return self._pseudonymise(values, rule, stats if stats is not None else Stats(), escrow, None)

    def _column(self, values: Sequence[Any], rule: ColumnRule, stats: Stats,
                escrow: EscrowItems | None) -> list[str | None]:
        return self._pseudonymise(values, rule, stats, escrow, self._escrowed)

    def _pseudonymise(self, values: Sequence[Any], rule: ColumnRule, stats: Stats,
                      escrow: EscrowItems | list[EscrowItem] | None, escrowed: _Escrowed | None) -> list[str | None]:
        present, nulls = _without_nulls(values)
        normalise = build_normaliser(rule.normalise, rule.column)
        if normalise is not None:
            present = list(map(normalise, present))
        tags, data = canonical_many(present, rule.column)
        macs = random_macs(len(data)) if self.randomised else self._macs_for(rule.domain).mac_many(data)
        pseudonyms = self.format.encode_many(macs)
        self._guard.add(rule.column, macs, pseudonyms)
        if escrow is not None:
            sealed, sealed_tags, sealed_data = pseudonyms, tags, data
            fresh = escrowed.unsealed(macs) if escrowed is not None else None
            if fresh is not None:
                keep = fresh.tolist()
                sealed = [pseudonyms[i] for i in keep]
                sealed_tags = [tags[i] for i in keep]
                sealed_data = [data[i] for i in keep]
            if isinstance(escrow, EscrowItems):
                escrow.add(sealed, sealed_tags, sealed_data, rule.domain)
            else:
                escrow.extend(map(EscrowItem, sealed, sealed_tags, sealed_data, repeat(rule.domain)))
        stats.nulls += nulls
        stats.values_pseudonymised += len(pseudonyms)
        return _with_nulls(values, pseudonyms, nulls)

    def _column_plan(self, rule: ColumnRule) -> native.ColumnPlan:
        keyed = None if self.randomised else self._macs_for(rule.domain)
        return native.ColumnPlan.pseudonymise(self.format, keyed, collect=self.reversible,  # type: ignore[arg-type]
                                              canonical=_canonical_callback(rule.normalise, rule.column),
                                              program=native.ascii_program(rule.normalise))

    def _new_escrow(self) -> EscrowItems | None:
        return EscrowItems() if self.reversible else None

    def _block_escrow(self, results: list[tuple[str, native.ColumnResult, str]]) -> EscrowBlocks:
        sealed: list[EscrowBlock] = []
        if self.reversible:
            for column, found, tag in results:
                # exact before this column: nothing it leaves unsealed was listed earlier in the run
                exact = self._escrowed is not None and self._escrowed.exact
                fresh = self._escrowed.unsealed(found.macs) if self._escrowed is not None else None
                names = native.encode(found.macs, self.format)
                items = EscrowBlock(names, len(self.format.prefix.encode("utf-8")) + self.format.length,
                                    found.canonicals or b"", np.frombuffer(found.ends or b"", dtype=np.uint64),
                                    type_tag=tag, domain=self.policy.rules[column].domain, repeats=not exact)
                sealed.append(items if fresh is None else items.take(fresh))
        return EscrowBlocks(sealed)


class SecondaryPseudonymiser(PseudonymEngine):
    """Turns a source project's pseudonyms into second-level ones with a ``secondary`` token (§4 step 5).

    Input must be the source project's pseudonyms: every value is checked against the token's
    ``source_format`` (prefix, length, alphabet) before any is used, in the column path (a whole
    batch at once, :meth:`PseudonymFormat.count_mismatches`) and in the C engine's COPY path alike,
    and a column holding any other value fails the run with a :class:`PolicyError` naming the column
    and how many values failed (never a value). A secondary token is thus no way to pseudonymise raw
    identifiers. Secondary tokens issued before v1.1 have no ``source_format`` and carry their
    project's own key: they are refused when verified (see ``tokens.py``) and here, with a message
    saying to re-issue them.
    """

    def __init__(self, token: Token, policy: ColumnPolicy, transit: TransitMac | None = None) -> None:
        if token.kind != "secondary" or (token.key is None and token.key_ref is None):
            raise TokenKindError(f"token {token.jti} is a {token.kind!r} token; this operation needs a 'secondary' token")
        if token.source_format is None:
            raise TokenKindError(
                f"secondary token {token.jti} was issued before token format v1.1 (it names no source_format, so "
                "its input cannot be checked); ask the issuer to re-issue it"
            )
        check_custody(token, transit)
        if policy.deidentified_columns:
            raise PolicyError(
                f"column(s) {', '.join(map(repr, policy.deidentified_columns))}: date_shift, generalise, mask and "
                "suppress apply when data is first pseudonymised, not in a secondary run; apply them with the "
                "source project's pseudonymisation token, or keep or drop these columns here"
            )
        for rule in policy.rules.values():
            if rule.action == "pseudonymise" and (rule.normalise or rule.domain):
                raise PolicyError(
                    f"column {rule.column!r}: normalise/domain do not apply to secondary pseudonymisation; "
                    "the input is already a pseudonym"
                )
        super().__init__(token, policy, transit, token.format, randomised=False)
        self.source_format: PseudonymFormat = token.source_format
        self._macs = token_macs(token, transit, SECONDARY_LABEL)

    def _column_plan(self, rule: ColumnRule) -> native.ColumnPlan:
        # pseudonyms as they are (no normaliser, no NFC), each checked against the source format
        return native.ColumnPlan.pseudonymise(self.format, self._macs, check=self.source_format)  # type: ignore[arg-type]

    def _arrow_type_tag(self, arrow_type: pa.DataType) -> str | None:
        # the input is text pseudonyms; any other type goes to the column path, which refuses it by name
        tag = native.arrow_type_tag(arrow_type)
        return tag if tag == "str" else None

    def _refuse_input(self, column: str, mismatched: int, values: int) -> PolicyError:
        fmt = self.source_format
        prefix = f"the prefix {fmt.prefix!r} then " if fmt.prefix else ""
        return PolicyError(
            f"column {column!r}: {mismatched} of {values} values are not pseudonyms of the source project "
            f"{self.token.source_project!r} ({prefix}{fmt.length} {fmt.alphabet} characters); a secondary token "
            "re-pseudonymises that project's pseudonyms, never raw identifiers: pseudonymise the column with a "
            "pseudonymisation token of that project first, or fix the policy if it names the wrong column"
        )

    def _column(self, values: Sequence[Any], rule: ColumnRule, stats: Stats,
                escrow: EscrowItems | None) -> list[str | None]:
        return self.pseudonymise_values(values, rule.column, stats)

    def pseudonymise_values(self, values: Sequence[Any], column: str, stats: Stats | None = None) -> list[str | None]:
        stats = stats if stats is not None else Stats()
        present, nulls = _without_nulls(values)
        if not all(map(isinstance, present, repeat(str))):
            kind = next(type(v).__name__ for v in present if not isinstance(v, str))
            raise PolicyError(
                f"column {column!r} holds {kind} values; secondary pseudonymisation takes "
                "the text pseudonyms of the source project"
            )
        mismatched = self.source_format.count_mismatches(present)
        if mismatched:  # before any HMAC: no raw identifier is hashed, nor sent to Vault Transit
            raise self._refuse_input(column, mismatched, len(present))
        macs = self._macs.mac_many(list(map(str.encode, present)))
        pseudonyms = self.format.encode_many(macs)
        self._guard.add(column, macs, pseudonyms)
        stats.nulls += nulls
        stats.values_pseudonymised += len(pseudonyms)
        return _with_nulls(values, pseudonyms, nulls)
