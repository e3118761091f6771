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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from pseudonymise.core.canonical import build_normaliser, canonical_many
from pseudonymise.core.collisions import CollisionGuard
from pseudonymise.core.errors import PolicyError, TokenKindError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.tokens import Token

Action = Literal["pseudonymise", "keep", "drop"]
ACTIONS: tuple[str, ...] = ("pseudonymise", "keep", "drop")
DEFAULTS: tuple[str, ...] = ("error", "keep", "drop")
PRIMARY_LABEL = b"pseudonymise/v1\x00"
SECONDARY_LABEL = b"pseudonymise/v1/secondary\x00"


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
    """The MACs a deterministic run has already handed to escrow, in a fixed table (32 MiB at most).

    A value sealed in an earlier batch of the run is not sealed and written again: its row is
    already in this run's transaction. The table is direct-mapped on the MAC's first bits and holds
    whole MACs, so a value is skipped only when its exact MAC is there; a slot another value took
    merely forgets (the value is then sealed again and escrow keeps its first row).
    """

    def __init__(self, slots: int = 1 << 20) -> None:
        self._macs = np.zeros((slots, 4), dtype=np.uint64)  # zero pages cost nothing until touched
        self._used = np.zeros(slots, dtype=bool)
        self._mask = np.uint64(slots - 1)
        self._batch: list[np.ndarray] = []

    def unsealed(self, macs: bytes) -> np.ndarray | None:
        """Positions of the MACs an earlier batch did not seal; ``None`` when it sealed none of them."""
        words = np.frombuffer(macs, dtype=np.uint64).reshape(-1, 4)
        self._batch.append(words)
        slot = (words[:, 0] & self._mask).astype(np.intp)
        known = self._used[slot] & (self._macs[slot] == words).all(axis=1)
        return np.flatnonzero(~known) if known.any() else None

    def end_batch(self) -> None:
        """The batch's MACs are sealed (its escrow is written before the next batch's, in one transaction)."""
        for words in self._batch:
            slot = (words[:, 0] & self._mask).astype(np.intp)
            self._macs[slot] = words
            self._used[slot] = True
        self._batch.clear()


def _with_nulls(values: Sequence[Any], pseudonyms: list[str], nulls: int) -> list[str | None]:
    """``pseudonyms`` put back in the rows of the non-NULL ``values``, NULL elsewhere."""
    if not nulls:
        return pseudonyms  # type: ignore[return-value]
    it = iter(pseudonyms)
    return [None if v is None else next(it) for v in values]


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
    """What escrow must seal for one pseudonym: the value's type tag and canonical bytes."""

    pseudonym: str
    type_tag: str
    canonical: bytes = field(repr=False)


class EscrowItems(Sequence[EscrowItem]):
    """The :class:`EscrowItem` of a batch held column by column (no object per value until one is asked for)."""

    __slots__ = ("canonicals", "pseudonyms", "type_tags")

    def __init__(self) -> None:
        self.pseudonyms: list[str] = []
        self.type_tags: list[str] = []
        self.canonicals: list[bytes] = []

    def add(self, pseudonyms: Sequence[str], type_tags: Sequence[str], canonicals: Sequence[bytes]) -> None:
        self.pseudonyms.extend(pseudonyms)
        self.type_tags.extend(type_tags)
        self.canonicals.extend(canonicals)

    def __len__(self) -> int:
        return len(self.pseudonyms)

    @overload
    def __getitem__(self, index: int) -> EscrowItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[EscrowItem]: ...

    def __getitem__(self, index: int | slice) -> EscrowItem | list[EscrowItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return EscrowItem(self.pseudonyms[index], self.type_tags[index], self.canonicals[index])

    def __iter__(self) -> Iterator[EscrowItem]:
        return map(EscrowItem, self.pseudonyms, self.type_tags, self.canonicals)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EscrowItems({len(self)} items)"


@dataclass
class Batch:
    """An output batch: columns in order, their counts, and the items escrow must seal.

    In a deterministic run, a value already sealed by an earlier batch of the same run is mostly not
    listed again (see :class:`_Escrowed`): write every batch's escrow, in order, in the run's transaction.
    """

    columns: dict[str, list[Any]]
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
class Pseudonymiser:
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

    def _keyed_for(self, domain: str) -> _Keyed:
        keyed = self._keyed.get(domain)
        if keyed is None:
            label = PRIMARY_LABEL + domain.encode("utf-8") + b"\x00"
            keyed = self._keyed[domain] = (
                _TransitKeyed(self._transit, label) if self._transit is not None else _Keyed(self._key, label)  # type: ignore[assignment]
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
                escrow.add(sealed, sealed_tags, sealed_data)
            else:
                escrow.extend(map(EscrowItem, sealed, sealed_tags, sealed_data))
        stats.nulls += nulls
        stats.values_pseudonymised += len(pseudonyms)
        return _with_nulls(values, pseudonyms, nulls)

    def pseudonymise_batch(self, columns: Mapping[str, Sequence[Any]]) -> Batch:
        """Apply the policy to one batch; the policy is checked against the batch's columns first."""
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


class SecondaryPseudonymiser:
    """Turns a source project's pseudonyms into second-level ones with a ``secondary`` token (§4 step 5)."""

    def __init__(self, token: Token, policy: ColumnPolicy, transit: Any = None) -> None:
        if token.kind != "secondary" or (token.key is None and token.key_ref is None):
            raise TokenKindError(f"token {token.jti} is a {token.kind!r} token; this operation needs a 'secondary' token")
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
        self.stats = Stats()
        self._keyed = _TransitKeyed(transit, SECONDARY_LABEL) if transit is not None else \
            _Keyed(token.key, SECONDARY_LABEL)  # type: ignore[arg-type]
        self._guard = CollisionGuard(self.format, randomised=False)

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
        macs = self._keyed.mac_many(list(map(str.encode, present)))
        pseudonyms = self.format.encode_many(macs)
        self._guard.add(column, macs, pseudonyms)
        stats.nulls += nulls
        stats.values_pseudonymised += len(pseudonyms)
        return _with_nulls(values, pseudonyms, nulls)

    def pseudonymise_batch(self, columns: Mapping[str, Sequence[Any]]) -> Batch:
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
