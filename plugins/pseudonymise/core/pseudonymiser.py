"""The pseudonym engine (DESIGN.md §4): column policies applied to whole batches of columns.

A :class:`Pseudonymiser` is made from a verified pseudonymisation token and a
:class:`ColumnPolicy`; it turns a batch (a mapping of column name to a sequence of values) into
the output batch, counts NULLs and values, collects what escrow must seal for reversible
projects, and fails the run if two different values ever meet in one pseudonym.
:class:`SecondaryPseudonymiser` does the same with a secondary token over existing pseudonyms.

Work is done a column at a time: canonical bytes of the whole column, then its MACs in one tight
loop, then all pseudonyms at once (:meth:`PseudonymFormat.encode_many`), with no object per value
beyond the bytes and texts themselves. Call ``finish()`` once the last batch is done and before
committing the output: large runs complete their collision check there.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from pseudonymise.core.canonical import build_normaliser, canonical_many
from pseudonymise.core.collisions import CollisionGuard, RecentMacs
from pseudonymise.core.copytext import CopyBlock, _pg_text
from pseudonymise.core.errors import DataIOError, InvalidTextError, PolicyError, TokenKindError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.tokens import Token

Action = Literal["pseudonymise", "keep", "drop"]
ACTIONS: tuple[str, ...] = ("pseudonymise", "keep", "drop")
DEFAULTS: tuple[str, ...] = ("error", "keep", "drop")
PRIMARY_LABEL = b"pseudonymise/v1\x00"
SECONDARY_LABEL = b"pseudonymise/v1/secondary\x00"

try:  # the C engine (core/_native.c); the pure-Python one below gives the same pseudonyms
    from pseudonymise.core import _native
except ImportError:  # pragma: no cover - built with the package wherever a C compiler and libcrypto are
    _native = None  # type: ignore[assignment]
if os.environ.get("PSEUDONYMISE_PURE_PYTHON") == "1":
    _native = None  # type: ignore[assignment]


def native_engine() -> bool:
    """Whether the C engine is in use (set ``PSEUDONYMISE_PURE_PYTHON=1`` to run without it)."""
    return _native is not None


# --- policy -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnRule:
    """What happens to one column: ``pseudonymise`` (after ``normalise``, within ``domain``), ``keep`` or ``drop``."""

    column: str
    action: Action = "pseudonymise"
    normalise: tuple[str, ...] = ()
    domain: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise PolicyError(f"column {self.column!r}: action {self.action!r} is unknown; use {', '.join(ACTIONS)}")
        if self.action != "pseudonymise" and (self.normalise or self.domain):
            raise PolicyError(f"column {self.column!r}: normalise/domain only apply to pseudonymised columns")
        build_normaliser(self.normalise, self.column)  # validates the names early
        if "\x00" in self.domain:
            raise PolicyError(f"column {self.column!r}: the domain must not contain NUL characters")

    @classmethod
    def parse(cls, column: str, spec: Any) -> ColumnRule:
        """Build a rule from a policy entry: an action name or ``{"action", "normalise", "domain"}``."""
        if isinstance(spec, str):
            return cls(column, spec)  # type: ignore[arg-type]
        if isinstance(spec, ColumnRule):
            return spec
        if not isinstance(spec, Mapping):
            raise PolicyError(f"column {column!r}: rule must be an action name or an object, not {type(spec).__name__}")
        unknown = set(spec) - {"action", "normalise", "domain"}
        if unknown:
            raise PolicyError(f"column {column!r}: unknown rule field(s) {sorted(unknown)}; use action, normalise, domain")
        normalise = spec.get("normalise", ())
        if isinstance(normalise, str):
            normalise = (normalise,)
        return cls(column, spec.get("action", "pseudonymise"), tuple(normalise), spec.get("domain", "") or "")


@dataclass(frozen=True)
class ColumnPolicy:
    """Rules by column, and what to do with columns no rule names (``error`` by default, the safe choice).

    A new column appearing in the source must not leave the organisation unnoticed, so unlisted
    columns are an error unless the policy says ``keep`` or ``drop``.
    """

    rules: Mapping[str, ColumnRule]
    default: str = "error"

    def __post_init__(self) -> None:
        if self.default not in DEFAULTS:
            raise PolicyError(f"policy default {self.default!r} is unknown; use {', '.join(DEFAULTS)}")
        if not self.rules:
            raise PolicyError("the column policy names no column; say which columns to pseudonymise")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ColumnPolicy:
        """``{"columns": {"id": "pseudonymise", "name": "drop", ...}, "default": "error"}``, or just the columns."""
        if not isinstance(data, Mapping):
            raise PolicyError("a column policy must be a JSON object")
        columns = data.get("columns", data)
        default = data.get("default", "error") if "columns" in data else "error"
        if isinstance(columns, (list, tuple)):
            columns = {c: "pseudonymise" for c in columns}
        if not isinstance(columns, Mapping):
            raise PolicyError('policy "columns" must map column names to rules')
        return cls({str(c): ColumnRule.parse(str(c), s) for c, s in columns.items()}, default)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ColumnPolicy:
        try:
            return cls.from_mapping(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise PolicyError(f"cannot read column policy {str(path)!r}: {exc.__class__.__name__}; check the path and JSON") from exc

    @classmethod
    def pseudonymise(cls, *columns: str, default: str = "keep") -> ColumnPolicy:
        """Shortcut: pseudonymise these columns and ``default`` the rest."""
        return cls({c: ColumnRule(c) for c in columns}, default)

    def plan(self, columns: Sequence[str]) -> list[ColumnRule]:
        """The rule of every input column, in order; raise before any work if columns do not match."""
        missing = [c for c in self.rules if c not in columns]
        if missing:
            raise PolicyError(
                f"column(s) {', '.join(map(repr, missing))} named by the policy are not in the source "
                f"(it has {', '.join(map(repr, columns))}); fix the policy or the source query"
            )
        unlisted = [c for c in columns if c not in self.rules]
        if unlisted and self.default == "error":
            raise PolicyError(
                f"column(s) {', '.join(map(repr, unlisted))} of the source have no rule; add them to the policy "
                'as "keep", "drop" or "pseudonymise", or set the policy default to "keep" or "drop"'
            )
        return [self.rules.get(c) or ColumnRule(c, self.default) for c in columns]  # type: ignore[arg-type]

    @property
    def pseudonymised_columns(self) -> list[str]:
        return [c for c, r in self.rules.items() if r.action == "pseudonymise"]

    def to_mapping(self) -> dict[str, Any]:
        return {
            "columns": {
                c: {"action": r.action, **({"normalise": list(r.normalise)} if r.normalise else {}),
                    **({"domain": r.domain} if r.domain else {})}
                for c, r in self.rules.items()
            },
            "default": self.default,
        }


# --- HMAC with precomputed states -------------------------------------------------------------
class _Keyed:
    """HMAC-SHA256(key, label + message) with the inner/outer states computed once (RFC 2104)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, label: bytes) -> None:
        block = key.ljust(64, b"\x00") if len(key) <= 64 else hashlib.sha256(key).digest().ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block) + label)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def mac(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def mac_many(self, messages: Sequence[bytes]) -> bytes:
        """The MACs of ``messages``, 32 bytes each, one after the other (the method lookups hoisted
        out of the loop: this loop is where a run spends most of its time)."""
        inner_copy, outer_copy = self._inner.copy, self._outer.copy
        out: list[bytes] = []
        append = out.append
        for message in messages:
            inner = inner_copy()
            inner.update(message)
            outer = outer_copy()
            outer.update(inner.digest())
            append(outer.digest())
        return b"".join(out)


def _make_keyed(key: bytes, label: bytes) -> Any:
    """:class:`_Keyed`, or its C twin with the same ``mac``/``mac_many`` when the C engine is there."""
    return _native.Keyed(key, label) if _native is not None else _Keyed(key, label)


class _TransitKeyed:
    """The same messages as :class:`_Keyed`, HMAC'd by Vault Transit in whole batches."""

    def __init__(self, transit: Any, label: bytes) -> None:
        self._transit, self._label = transit, label

    def mac_many(self, messages: Sequence[bytes]) -> bytes:
        label = self._label
        return b"".join(self._transit.macs([label + m for m in messages]))


def _require_transit(token: Token, transit: Any) -> None:
    if token.key_ref is not None and transit is None:
        raise TokenKindError(
            f"token {token.jti}'s key is held in Vault Transit ({token.key_ref['mount']}/{token.key_ref['name']}); "
            "give the connection a transit_vault_conn_id so HMACs can be computed there"
        )
    if token.key_ref is None and transit is not None:
        raise TokenKindError(f"token {token.jti} carries its key; it does not use Vault Transit")


def _random_macs(count: int) -> bytes:
    """``count`` MACs of 32 bytes from the OS CSPRNG (randomised treatment: a fresh one per occurrence)."""
    return os.urandom(32 * count)


def _without_nulls(values: Sequence[Any]) -> tuple[list[Any], int]:
    """The non-NULL values of a column, and how many NULLs there were (by identity: no ``__eq__`` runs)."""
    values = values if isinstance(values, list) else list(values)
    nulls = sum(map(operator.is_, values, repeat(None)))
    return ([v for v in values if v is not None] if nulls else values), nulls


class _Escrowed:
    """The MACs a deterministic run has already handed to escrow (a :class:`RecentMacs` table).

    A value sealed in an earlier batch of the run is not sealed and written again: its row is
    already in this run's transaction. Only whole MACs match, so a value is skipped only when its
    exact MAC is there; a slot another value took merely forgets (the value is then sealed again and
    escrow keeps one row). A batch's MACs are remembered once the batch is done.
    """

    def __init__(self, slots: int = 1 << 20) -> None:
        self._table = RecentMacs(slots)
        self._batch: list[np.ndarray] = []

    def unsealed(self, macs: bytes) -> np.ndarray | None:
        """Positions of the MACs an earlier batch did not seal; ``None`` when it sealed none of them."""
        words = RecentMacs.words(macs)
        self._batch.append(words)
        known = self._table.known(words)
        return np.flatnonzero(~known) if known.any() else None

    def end_batch(self) -> None:
        """The batch's MACs are sealed (its escrow is written before the next batch's, in one transaction)."""
        for words in self._batch:
            self._table.remember(words)
        self._batch.clear()


def _with_nulls(values: Sequence[Any], pseudonyms: list[str], nulls: int) -> list[str | None]:
    """``pseudonyms`` put back in the rows of the non-NULL ``values``, NULL elsewhere."""
    if not nulls:
        return pseudonyms  # type: ignore[return-value]
    it = iter(pseudonyms)
    return [None if v is None else next(it) for v in values]


# --- COPY text blocks (the C engine) ----------------------------------------------------------
_ALPHABET_CODES = {"hex": 0, "base32": 1, "base64url": 2, "digits": 3}
_KEEP = (0, None, 0, 0, "", False, None, b"")
_DROP = (1, None, 0, 0, "", False, None, b"")
_ASCII_STEPS = {"strip": b"s", "lower": b"l", "casefold": b"l", "upper": b"u", "remove_whitespace": b"w"}


def _nfc_utf8(value: bytes) -> bytes:
    """The C engine's callback for non-ASCII values: canonical bytes of text (NFC, UTF-8)."""
    return unicodedata.normalize("NFC", value.decode("utf-8")).encode("utf-8")


def _canonical_callback(names: Sequence[str], column: str) -> Any:
    """The C engine's callback for a column's non-ASCII values: its normalisers, then NFC, as UTF-8."""
    normalise = build_normaliser(names, column)
    if normalise is None:
        return _nfc_utf8

    def canonical_text(value: bytes) -> bytes:
        return unicodedata.normalize("NFC", normalise(value.decode("utf-8"))).encode("utf-8")

    return canonical_text


def _ascii_program(names: Sequence[str]) -> bytes:
    """The column's normalisers as the C engine's program for ASCII values (``ascii_normalise`` in
    _native.c): on ASCII text, casefold is lower and only ASCII characters can be removed."""
    program = b""
    for name in names:
        if name in _ASCII_STEPS:
            program += _ASCII_STEPS[name]
        else:  # remove:<characters> (build_normaliser has checked the names)
            chars = bytes(sorted({ord(c) for c in name[len("remove:"):] if ord(c) < 128}))
            program += b"r" + bytes([len(chars)]) + chars
    return program


def _pseudonymise_block(block: CopyBlock, plan: list[tuple[Any, ...]]) -> tuple[bytes, int, list[tuple[Any, ...]]]:
    """Run the C engine over a block; its errors become the engine's own."""
    assert _native is not None
    try:
        return _native.copy_block(block.data, plan)
    except UnicodeError as exc:
        raise InvalidTextError(
            "a pseudonymised column holds text that is not valid UTF-8; fix the source encoding"
        ) from exc
    except ValueError as exc:
        raise DataIOError(f"the source's COPY text could not be read: {exc}") from exc


def _column_plan(fmt: PseudonymFormat, keyed: Any, collect: bool, callback: Any = None,
                 program: bytes = b"", source_format: PseudonymFormat | None = None) -> tuple[Any, ...]:
    """The C engine's entry for a pseudonymised column; with ``source_format``, the engine also counts
    the values not written in that format (``copy_block``'s ``check``)."""
    check = None if source_format is None else (
        _ALPHABET_CODES[source_format.alphabet], source_format.length, source_format.prefix.encode("utf-8"))
    return (2, keyed, _ALPHABET_CODES[fmt.alphabet], fmt.length, _pg_text(fmt.prefix), collect, callback, program,
            check)


@dataclass(frozen=True)
class _CopyPlan:
    """The C engine's entry for every source column, and the pseudonymised columns its results follow."""

    entries: list[tuple[Any, ...]]
    pseudonymised: list[str]


class _CopyBlocks(ABC):
    """What both engines share for :class:`CopyBlock` rows: the C engine's plan for a set of source
    columns (made once), and one block run through it with its collision records and counts."""

    policy: ColumnPolicy
    format: PseudonymFormat
    _guard: CollisionGuard
    _transit: Any
    _plans: dict[tuple[str, ...], _CopyPlan | None]

    @abstractmethod
    def _column_entry(self, rule: ColumnRule) -> tuple[Any, ...]:
        """The C engine's entry for a pseudonymised column (each engine says how it pseudonymises)."""

    def _refuse_input(self, column: str, mismatched: int, values: int) -> PolicyError:
        """The error for a column whose input the engine's entry checked and found wrong."""
        return PolicyError(f"column {column!r}: {mismatched} of {values} values are not in the expected format")

    def takes_copy_blocks(self, columns: Sequence[str]) -> bool:
        """Whether :meth:`pseudonymise_batch` can take :class:`CopyBlock` rows of these source columns:
        with the C engine and the key at hand (not in Vault Transit)."""
        return self._copy_plan(columns) is not None

    def _copy_plan(self, columns: Sequence[str]) -> _CopyPlan | None:
        key = tuple(columns)
        if key not in self._plans:
            plan = None
            if _native is not None and self._transit is None:
                rules = self.policy.plan(columns)
                if any(r.action != "drop" for r in rules):
                    plan = _CopyPlan([self._column_entry(r) if r.action == "pseudonymise" else
                                      _KEEP if r.action == "keep" else _DROP for r in rules],
                                     [r.column for r in rules if r.action == "pseudonymise"])
            self._plans[key] = plan
        return self._plans[key]

    def _run_block(self, block: CopyBlock, columns: Sequence[str]) -> tuple[bytes, int, Stats, list[Any]]:
        """The block through the C engine: output rows, their count, the block's counts, and per
        pseudonymised column ``(column, macs, canonicals, ends)``; the collision check has seen them."""
        plan = self._copy_plan(columns)
        if plan is None:
            raise PolicyError("this run cannot pseudonymise COPY text directly; read the source as columns")
        out, rows, results = _pseudonymise_block(block, plan.entries)
        for column, (macs, _nulls, _canonicals, _ends, mismatched) in zip(plan.pseudonymised, results, strict=True):
            if mismatched:
                raise self._refuse_input(column, mismatched, len(macs) // 32)
        stats = Stats(rows_in=rows, rows_out=rows)
        columns_out = []
        for column, (macs, nulls, canonicals, ends, _) in zip(plan.pseudonymised, results, strict=True):
            count = len(macs) // 32
            self._guard.add(column, macs, None, count=count)
            stats.nulls += nulls
            stats.values_pseudonymised += count
            columns_out.append((column, macs, canonicals, ends))
        return out, rows, stats, columns_out


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


@dataclass(frozen=True)
class EscrowItem:
    """What escrow must seal for one pseudonym: the value's type tag and canonical bytes, and the column's
    pseudonymisation domain (bound into the escrow's associated data, and needed to recompute the pseudonym)."""

    pseudonym: str
    type_tag: str
    canonical: bytes = field(repr=False)
    domain: str = ""


class _Items(Sequence[EscrowItem]):
    """A sequence of :class:`EscrowItem` made on demand from column-wise storage (``_item``)."""

    __slots__ = ()

    @abstractmethod
    def _item(self, index: int) -> EscrowItem:
        """Item ``index`` (already checked to be in range)."""

    @overload
    def __getitem__(self, index: int) -> EscrowItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[EscrowItem]: ...

    def __getitem__(self, index: int | slice) -> EscrowItem | list[EscrowItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._item(range(len(self))[index])


class EscrowItems(_Items):
    """The :class:`EscrowItem` of a batch held column by column (no object per value until one is asked for)."""

    __slots__ = ("canonicals", "domains", "pseudonyms", "type_tags")

    def __init__(self) -> None:
        self.pseudonyms: list[str] = []
        self.type_tags: list[str] = []
        self.canonicals: list[bytes] = []
        self.domains: list[str] = []

    def add(self, pseudonyms: Sequence[str], type_tags: Sequence[str], canonicals: Sequence[bytes],
            domain: str = "") -> None:
        self.pseudonyms.extend(pseudonyms)
        self.type_tags.extend(type_tags)
        self.canonicals.extend(canonicals)
        self.domains.extend([domain] * len(pseudonyms))

    def __len__(self) -> int:
        return len(self.pseudonyms)

    def _item(self, index: int) -> EscrowItem:
        return EscrowItem(self.pseudonyms[index], self.type_tags[index], self.canonicals[index], self.domains[index])

    def __iter__(self) -> Iterator[EscrowItem]:
        return map(EscrowItem, self.pseudonyms, self.type_tags, self.canonicals, self.domains)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EscrowItems({len(self)} items)"


class EscrowBlock(_Items):
    """What escrow must seal for a block of COPY text rows, without an object per value: the pseudonyms
    (UTF-8, ``width`` bytes each, one after the other), the canonical bytes one after the other with
    their ``ends`` (``ends[i]:ends[i+1]`` is value ``i``; ``ends[0] == 0``), and one type tag and one
    pseudonymisation domain for all."""

    __slots__ = ("canonicals", "domain", "ends", "pseudonyms", "type_tag", "width")

    def __init__(self, pseudonyms: bytes, width: int, canonicals: bytes, ends: np.ndarray, type_tag: str = "str",
                 domain: str = "") -> None:
        self.pseudonyms, self.width, self.canonicals, self.type_tag = pseudonyms, width, canonicals, type_tag
        self.domain = domain
        self.ends = np.asarray(ends, dtype=np.uint64)
        if len(self.ends) != len(pseudonyms) // max(width, 1) + 1 or len(pseudonyms) % max(width, 1):
            raise ValueError("an escrow block needs n pseudonyms of `width` bytes and n + 1 ends")

    @classmethod
    def concat(cls, blocks: Sequence[EscrowBlock]) -> EscrowBlock:
        """One block of blocks that share their width, type tag and domain."""
        first = blocks[0]
        if len(blocks) == 1:
            return first
        if any((b.width, b.type_tag, b.domain) != (first.width, first.type_tag, first.domain) for b in blocks):
            raise ValueError("escrow blocks of different widths, types or domains cannot be concatenated")
        offsets = np.cumsum([0] + [len(b.canonicals) for b in blocks[:-1]], dtype=np.uint64)
        ends = np.concatenate([blocks[0].ends[:1]] + [b.ends[1:] + o for b, o in zip(blocks, offsets, strict=True)])
        return cls(b"".join(b.pseudonyms for b in blocks), first.width, b"".join(b.canonicals for b in blocks),
                   ends, first.type_tag)

    def take(self, positions: Sequence[int] | np.ndarray) -> EscrowBlock:
        """The values at ``positions`` (in that order)."""
        positions = np.asarray(positions, dtype=np.intp)
        starts, stops = self.ends[:-1][positions], self.ends[1:][positions]
        canonicals = b"".join(map(self.canonicals.__getitem__, map(slice, starts.tolist(), stops.tolist())))
        ends = np.zeros(len(positions) + 1, dtype=np.uint64)
        np.cumsum(stops - starts, out=ends[1:])
        names = (np.frombuffer(self.pseudonyms, dtype=f"S{self.width}")[positions].tobytes()
                 if self.width and len(positions) else b"")
        return EscrowBlock(names, self.width, canonicals, ends, self.type_tag, self.domain)

    def __len__(self) -> int:
        return len(self.ends) - 1

    def _item(self, index: int) -> EscrowItem:
        pseudonym = self.pseudonyms[index * self.width:(index + 1) * self.width].decode("utf-8")
        return EscrowItem(pseudonym, self.type_tag, self.canonicals[int(self.ends[index]):int(self.ends[index + 1])],
                          self.domain)

    def items(self) -> EscrowItems:
        """The same values as :class:`EscrowItems` (for a store other than PostgreSQL)."""
        out = EscrowItems()
        bounds = self.ends.tolist()
        out.add([self.pseudonyms[i:i + self.width].decode("utf-8") for i in range(0, len(self.pseudonyms), self.width)],
                [self.type_tag] * len(self),
                list(map(self.canonicals.__getitem__, map(slice, bounds[:-1], bounds[1:]))), self.domain)
        return out

    def __repr__(self) -> str:
        return f"EscrowBlock({len(self)} items)"


class EscrowBlocks:
    """The escrow blocks of one batch, one per pseudonymised column (each with its own domain).

    ``len`` counts values, as for the other escrow item sequences."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: Sequence[EscrowBlock]) -> None:
        self.blocks = [b for b in blocks if len(b)]

    def __iter__(self) -> Iterator[EscrowBlock]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return sum(map(len, self.blocks))

    def __repr__(self) -> str:
        return f"EscrowBlocks({len(self.blocks)} blocks, {len(self)} items)"


@dataclass
class Batch:
    """An output batch: columns in order, their counts, and the items escrow must seal.

    In a deterministic run, a value already sealed by an earlier batch of the same run is mostly not
    listed again (see :class:`_Escrowed`): write every batch's escrow, in order, in the run's transaction.
    """

    columns: dict[str, list[Any]] | CopyBlock
    stats: Stats
    escrow: Sequence[EscrowItem] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.stats.rows_out


def _batch_size(columns: Mapping[str, Sequence[Any]]) -> int:
    sizes = {len(v) for v in columns.values()}
    if len(sizes) > 1:
        raise PolicyError("the batch's columns have different lengths; every column must have one value per row")
    return sizes.pop() if sizes else 0


# --- pseudonymisers ---------------------------------------------------------------------------
class Pseudonymiser(_CopyBlocks):
    """Applies a column policy with a verified ``pseudonymisation`` token to batches of a run."""

    def __init__(self, token: Token, policy: ColumnPolicy, transit: Any = None) -> None:
        """:param transit: a :class:`~pseudonymise.core.transit.TransitMac` when the token's key is held in
        Vault Transit (the token then carries ``key_ref`` instead of ``key``)."""
        if token.kind != "pseudonymisation" or (token.key is None and token.key_ref is None):
            raise TokenKindError(
                f"token {token.jti} is a {token.kind!r} token; pseudonymising needs a 'pseudonymisation' token"
            )
        _require_transit(token, transit)
        self._transit = transit
        self.token = token
        self.policy = policy
        self.format: PseudonymFormat = token.format
        self.randomised = token.treatment == "randomised"
        self.reversible = token.reversible
        self.stats = Stats()
        self._guard = CollisionGuard(self.format, self.randomised)
        self._escrowed = _Escrowed() if self.reversible and not self.randomised else None
        self._keyed: dict[str, _Keyed] = {}
        self._key = token.key
        self._plans: dict[tuple[str, ...], _CopyPlan | None] = {}

    def _keyed_for(self, domain: str) -> _Keyed:
        keyed = self._keyed.get(domain)
        if keyed is None:
            label = PRIMARY_LABEL + domain.encode("utf-8") + b"\x00"
            keyed = self._keyed[domain] = (
                _TransitKeyed(self._transit, label) if self._transit is not None else _make_keyed(self._key, label)  # type: ignore[assignment]
            )
        return keyed

    def output_columns(self, columns: Sequence[str]) -> list[str]:
        return [r.column for r in self.policy.plan(columns) if r.action != "drop"]

    def pseudonymise_values(self, values: Sequence[Any], rule: ColumnRule, stats: Stats | None = None,
                            escrow: EscrowItems | list[EscrowItem] | None = None) -> list[str | None]:
        """Pseudonymise one column of a batch under ``rule``; what escrow must seal goes to ``escrow``."""
        return self._pseudonymise(values, rule, stats if stats is not None else Stats(), escrow, None)

    def _pseudonymise(self, values: Sequence[Any], rule: ColumnRule, stats: Stats,
                      escrow: EscrowItems | list[EscrowItem] | None, escrowed: _Escrowed | None) -> list[str | None]:
        present, nulls = _without_nulls(values)
        normalise = build_normaliser(rule.normalise, rule.column)
        if normalise is not None:
            present = list(map(normalise, present))
        tags, data = canonical_many(present, rule.column)
        macs = _random_macs(len(data)) if self.randomised else self._keyed_for(rule.domain).mac_many(data)
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

    def _column_entry(self, rule: ColumnRule) -> tuple[Any, ...]:
        keyed = None if self.randomised else self._keyed_for(rule.domain)
        return _column_plan(self.format, keyed, self.reversible, _canonical_callback(rule.normalise, rule.column),
                            _ascii_program(rule.normalise))

    def _pseudonymise_copy(self, block: CopyBlock, columns: Sequence[str]) -> Batch:
        out, rows, stats, results = self._run_block(block, columns)
        sealed: list[EscrowBlock] = []
        if self.reversible:
            prefix = self.format.prefix.encode("utf-8")
            for column, macs, canonicals, ends in results:
                fresh = self._escrowed.unsealed(macs) if self._escrowed is not None else None
                names = _native.encode(macs, _ALPHABET_CODES[self.format.alphabet], self.format.length, prefix)
                # COPY text gives text: the same type tag as the column path, which decodes it to str
                items = EscrowBlock(names, len(prefix) + self.format.length, canonicals,
                                    np.frombuffer(ends, dtype=np.uint64), domain=self.policy.rules[column].domain)
                sealed.append(items if fresh is None else items.take(fresh))
        if self._escrowed is not None:
            self._escrowed.end_batch()
        self.stats.add(stats)
        return Batch(CopyBlock(out, rows), stats, EscrowBlocks(sealed))

    def pseudonymise_batch(self, columns: Mapping[str, Sequence[Any]] | CopyBlock,
                           source_columns: Sequence[str] | None = None) -> Batch:
        """Apply the policy to one batch; the policy is checked against the batch's columns first.

        A :class:`CopyBlock` (rows of ``source_columns`` in COPY text) gives a :class:`Batch` whose
        ``columns`` is a :class:`CopyBlock` too, when :meth:`takes_copy_blocks` says so.
        """
        if isinstance(columns, CopyBlock):
            return self._pseudonymise_copy(columns, source_columns or ())
        rows = _batch_size(columns)
        plan = self.policy.plan(list(columns))
        stats = Stats(rows_in=rows, rows_out=rows)
        escrow = EscrowItems() if self.reversible else None
        out: dict[str, list[Any]] = {}
        for rule in plan:
            if rule.action == "drop":
                continue
            if rule.action == "keep":
                out[rule.column] = _as_list(columns[rule.column])
            else:
                out[rule.column] = self._pseudonymise(columns[rule.column], rule, stats, escrow, self._escrowed)
        if self._escrowed is not None:
            self._escrowed.end_batch()
        self.stats.add(stats)
        return Batch(out, stats, escrow or [])

    def finish(self) -> None:
        """End of the run: complete the collision check (DESIGN §4.6); raise before anything is committed."""
        self._guard.finish()

    def close(self) -> None:
        """Release what the run holds (temporary files of the collision check), e.g. after a failure."""
        self._guard.close()


def _as_list(values: Sequence[Any]) -> list[Any]:
    """A kept column passes through: lists (and their subclasses) as they are, anything else copied."""
    return values if isinstance(values, list) else list(values)


class SecondaryPseudonymiser(_CopyBlocks):
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

    def __init__(self, token: Token, policy: ColumnPolicy, transit: Any = None) -> None:
        if token.kind != "secondary" or (token.key is None and token.key_ref is None):
            raise TokenKindError(f"token {token.jti} is a {token.kind!r} token; this operation needs a 'secondary' token")
        if token.source_format is None:
            raise TokenKindError(
                f"secondary token {token.jti} was issued before token format v1.1 (it names no source_format, so "
                "its input cannot be checked); ask the issuer to re-issue it"
            )
        _require_transit(token, transit)
        for rule in policy.rules.values():
            if rule.action == "pseudonymise" and (rule.normalise or rule.domain):
                raise PolicyError(
                    f"column {rule.column!r}: normalise/domain do not apply to secondary pseudonymisation; "
                    "the input is already a pseudonym"
                )
        self.token = token
        self.policy = policy
        self.format = token.format
        self.source_format: PseudonymFormat = token.source_format
        self.stats = Stats()
        self._keyed = _TransitKeyed(transit, SECONDARY_LABEL) if transit is not None else \
            _make_keyed(token.key, SECONDARY_LABEL)  # type: ignore[arg-type]
        self._guard = CollisionGuard(self.format, randomised=False)
        self._transit = transit
        self._plans: dict[tuple[str, ...], _CopyPlan | None] = {}

    def _column_entry(self, rule: ColumnRule) -> tuple[Any, ...]:
        # pseudonyms as they are (no normaliser, no NFC), each checked against the source format
        return _column_plan(self.format, self._keyed, False, source_format=self.source_format)

    def _refuse_input(self, column: str, mismatched: int, values: int) -> PolicyError:
        fmt = self.source_format
        prefix = f"the prefix {fmt.prefix!r} then " if fmt.prefix else ""
        return PolicyError(
            f"column {column!r}: {mismatched} of {values} values are not pseudonyms of the source project "
            f"{self.token.source_project!r} ({prefix}{fmt.length} {fmt.alphabet} characters); a secondary token "
            "re-pseudonymises that project's pseudonyms, never raw identifiers: pseudonymise the column with a "
            "pseudonymisation token of that project first, or fix the policy if it names the wrong column"
        )

    def _pseudonymise_copy(self, block: CopyBlock, columns: Sequence[str]) -> Batch:
        out, rows, stats, _ = self._run_block(block, columns)
        self.stats.add(stats)
        return Batch(CopyBlock(out, rows), stats)

    def output_columns(self, columns: Sequence[str]) -> list[str]:
        return [r.column for r in self.policy.plan(columns) if r.action != "drop"]

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
        macs = self._keyed.mac_many(list(map(str.encode, present)))
        pseudonyms = self.format.encode_many(macs)
        self._guard.add(column, macs, pseudonyms)
        stats.nulls += nulls
        stats.values_pseudonymised += len(pseudonyms)
        return _with_nulls(values, pseudonyms, nulls)

    def pseudonymise_batch(self, columns: Mapping[str, Sequence[Any]] | CopyBlock,
                           source_columns: Sequence[str] | None = None) -> Batch:
        if isinstance(columns, CopyBlock):
            return self._pseudonymise_copy(columns, source_columns or ())
        rows = _batch_size(columns)
        stats = Stats(rows_in=rows, rows_out=rows)
        out: dict[str, list[Any]] = {}
        for rule in self.policy.plan(list(columns)):
            if rule.action == "keep":
                out[rule.column] = _as_list(columns[rule.column])
            elif rule.action == "pseudonymise":
                out[rule.column] = self.pseudonymise_values(columns[rule.column], rule.column, stats)
        self.stats.add(stats)
        return Batch(out, stats)

    def finish(self) -> None:
        """End of the run: complete the collision check; raise before anything is committed."""
        self._guard.finish()

    def close(self) -> None:
        self._guard.close()
