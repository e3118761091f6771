"""The column policy (docs/design.md §4 step 1): what happens to each column, and the normalisers a rule may name.

A :class:`ColumnPolicy` maps column names to :class:`ColumnRule` objects (``pseudonymise``, ``keep``,
``drop``, or one of the de-identifying actions ``date_shift``, ``generalise``, ``mask`` and ``suppress``,
whose transformations are in ``deidentify.py``) and says what to do with columns no rule names. It is checked against a source's
columns before any value is read (:meth:`ColumnPolicy.plan`), so a policy that does not fit the
data fails the run up front, naming columns and never values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pseudonymise.core.errors import PolicyError

Action = Literal["pseudonymise", "keep", "drop", "date_shift", "generalise", "mask", "suppress"]
#: The actions that change a value without pseudonymising it (``deidentify.py`` applies them).
DEIDENTIFY_ACTIONS: tuple[str, ...] = ("date_shift", "generalise", "mask", "suppress")
ACTIONS: tuple[str, ...] = ("pseudonymise", "keep", "drop", *DEIDENTIFY_ACTIONS)
#: What ``generalise`` turns a date or timestamp into.
DATE_LEVELS: tuple[str, ...] = ("year", "month", "iso_week")
#: The largest ``max_days`` of a date shift: the days from 0001-01-01 to 9999-12-31 (any larger shift is out of range).
MAX_SHIFT_DAYS = 3_652_058
#: The fields of a rule, by action (``action`` itself aside).
_FIELDS: dict[str, tuple[str, ...]] = {
    "pseudonymise": ("normalise", "domain"), "keep": (), "drop": (), "suppress": (),
    "date_shift": ("subject", "max_days", "domain"),
    "generalise": ("to", "width", "bottom", "top", "prefix"),
    "mask": ("keep_first", "keep_last", "char"),
}
_ALL_FIELDS = ("action", "normalise", "domain", "subject", "max_days", "to", "width", "bottom", "top", "prefix",
               "keep_first", "keep_last", "char")
DEFAULTS: tuple[str, ...] = ("error", "keep", "drop")


# --- normalisers ------------------------------------------------------------------------------
def _remove_whitespace(s: str) -> str:
    return "".join(s.split())


_SIMPLE: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lower": str.lower,
    "upper": str.upper,
    "casefold": str.casefold,
    "remove_whitespace": _remove_whitespace,
}
NORMALISERS = (*_SIMPLE, "remove:<characters>")


def build_normaliser(names: Sequence[str], column: str) -> Callable[[Any], Any] | None:
    """Compose named normalisers; they apply to text values and leave other types unchanged.

    ``remove:<characters>`` removes each of the given separator characters, e.g. ``remove:-./``.
    """
    steps: list[Callable[[str], str]] = []
    for name in names:
        if name in _SIMPLE:
            steps.append(_SIMPLE[name])
        elif isinstance(name, str) and name.startswith("remove:") and len(name) > len("remove:"):
            table = str.maketrans("", "", name[len("remove:"):])
            steps.append(lambda s, t=table: s.translate(t))
        else:
            raise PolicyError(
                f"column {column!r}: normaliser {name!r} is unknown; use {', '.join(NORMALISERS)}"
            )
    if not steps:
        return None

    def normalise(value: Any) -> Any:
        if isinstance(value, str):
            for step in steps:
                value = step(value)
        return value

    return normalise


# --- rules and policies -----------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ColumnRule:
    """What happens to one column: ``pseudonymise`` (after ``normalise``, within ``domain``), ``keep``, ``drop``,
    or a de-identifying action (``docs/deidentification.md``):

    - ``date_shift``: every date or timestamp moved by the non-zero offset of its row's ``subject`` (a column
      name), in ``[-max_days, max_days]`` days (docs/design.md §4.7), within ``domain``;
    - ``generalise``: dates and timestamps ``to`` ``year``, ``month`` or ``iso_week``; integers to bands of
      ``width`` (optionally everything below ``bottom`` in one band, and from ``top`` up in one); text to its
      first ``prefix`` characters;
    - ``mask``: all characters but the first ``keep_first`` or the last ``keep_last`` replaced by ``char``;
    - ``suppress``: every value NULL.
    """

    column: str
    action: Action = "pseudonymise"
    normalise: tuple[str, ...] = ()
    domain: str = ""
    subject: str | None = None
    max_days: int | None = None
    to: str | None = None
    width: int | None = None
    bottom: int | None = None
    top: int | None = None
    prefix: int | None = None
    keep_first: int | None = None
    keep_last: int | None = None
    char: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise PolicyError(f"column {self.column!r}: action {self.action!r} is unknown; use {', '.join(ACTIONS)}")
        allowed = _FIELDS[self.action]
        given = [name for name in _ALL_FIELDS[1:] if getattr(self, name) not in (None, (), "")]
        stray = [name for name in given if name not in allowed]
        if stray:
            if self.action != "pseudonymise" and set(stray) <= {"normalise", "domain"} and not allowed:
                raise PolicyError(f"column {self.column!r}: normalise/domain only apply to pseudonymised columns")
            raise PolicyError(
                f"column {self.column!r}: {', '.join(stray)} do(es) not apply to the action {self.action!r}; "
                f"it takes {', '.join(allowed) or 'no parameter'}"
            )
        build_normaliser(self.normalise, self.column)  # validates the names early
        if "\x00" in self.domain:
            raise PolicyError(f"column {self.column!r}: the domain must not contain NUL characters")
        check = getattr(self, f"_check_{self.action}", None)
        if check is not None:
            check()

    def _fail(self, parameter: str, problem: str, fix: str) -> PolicyError:
        return PolicyError(f"column {self.column!r}: {self.action} parameter {parameter!r} {problem}; {fix}")

    def _check_date_shift(self) -> None:
        if not isinstance(self.subject, str) or not self.subject:
            raise self._fail("subject", "is missing", "name the column that identifies the subject (e.g. the "
                             "patient id) whose dates shift together")
        if self.subject == self.column:
            raise self._fail("subject", "names the shifted column itself", "name the column that identifies the "
                             "subject")
        if not _is_int(self.max_days) or not 0 < self.max_days <= MAX_SHIFT_DAYS:  # type: ignore[operator]
            raise self._fail("max_days", f"must be a whole number of days from 1 to {MAX_SHIFT_DAYS}",
                             "give the largest shift in days, e.g. 30")

    def _check_generalise(self) -> None:
        modes = [name for name in ("to", "width", "prefix") if getattr(self, name) is not None]
        if len(modes) != 1:
            raise PolicyError(
                f"column {self.column!r}: generalise needs exactly one of 'to' (dates: {', '.join(DATE_LEVELS)}), "
                "'width' (integers to bands) or 'prefix' (text to its first N characters)"
                + (f"; it has {', '.join(modes)}" if modes else "")
            )
        if self.to is not None and self.to not in DATE_LEVELS:
            raise self._fail("to", "is unknown", f"use {', '.join(DATE_LEVELS)}")
        if self.prefix is not None and (not _is_int(self.prefix) or self.prefix <= 0):
            raise self._fail("prefix", "must be a whole number above 0", "give how many characters to keep")
        if self.width is None:
            if self.bottom is not None or self.top is not None:
                raise self._fail("bottom" if self.bottom is not None else "top", "only applies to integer bands",
                                 "give a 'width' too, or remove it")
            return
        if not _is_int(self.width) or self.width <= 0:
            raise self._fail("width", "must be a whole number above 0", "give the width of a band, e.g. 5")
        for name in ("bottom", "top"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise self._fail(name, "must be a whole number", "give an integer band edge")
        origin = self.bottom if self.bottom is not None else 0
        if self.top is not None and (self.top <= origin if self.bottom is not None else False):
            raise self._fail("top", "must be above 'bottom'", "raise top or lower bottom")
        if self.top is not None and (self.top - origin) % self.width:
            raise self._fail("top", f"must be {'bottom' if self.bottom is not None else '0'} plus a multiple of "
                             "'width'", "move it to a band edge so the last band is whole")

    def _check_mask(self) -> None:
        kept = [name for name in ("keep_first", "keep_last") if getattr(self, name) is not None]
        if len(kept) != 1:
            raise PolicyError(f"column {self.column!r}: mask needs exactly one of 'keep_first' or 'keep_last' "
                              "(how many characters stay visible)")
        if not _is_int(getattr(self, kept[0])) or getattr(self, kept[0]) < 0:
            raise self._fail(kept[0], "must be a whole number, 0 or more", "give how many characters stay visible")
        if self.char is not None and (not isinstance(self.char, str) or len(self.char) != 1):
            raise self._fail("char", "must be one character", 'give e.g. "*"')

    @property
    def mask_char(self) -> str:
        return self.char if self.char is not None else "*"

    @classmethod
    def parse(cls, column: str, spec: Any) -> ColumnRule:
        """Build a rule from a policy entry: an action name or ``{"action", "normalise", "domain"}``."""
        if isinstance(spec, str):
            return cls(column, spec)  # type: ignore[arg-type]
        if isinstance(spec, ColumnRule):
            return spec
        if not isinstance(spec, Mapping):
            raise PolicyError(f"column {column!r}: rule must be an action name or an object, not {type(spec).__name__}")
        unknown = set(spec) - set(_ALL_FIELDS)
        if unknown:
            raise PolicyError(f"column {column!r}: unknown rule field(s) {sorted(unknown)}; use "
                              f"{', '.join(_ALL_FIELDS)}")
        normalise = spec.get("normalise", ())
        if isinstance(normalise, str):
            normalise = (normalise,)
        extra = {name: spec[name] for name in _ALL_FIELDS[3:] if name in spec}
        return cls(column, spec.get("action", "pseudonymise"), tuple(normalise), spec.get("domain", "") or "",
                   **extra)

    def to_mapping(self) -> dict[str, Any]:
        """The rule as a policy entry (only the fields it sets)."""
        out: dict[str, Any] = {"action": self.action}
        if self.normalise:
            out["normalise"] = list(self.normalise)
        out.update({name: getattr(self, name) for name in _ALL_FIELDS[2:]
                    if name != "normalise" and getattr(self, name) not in (None, "")})
        return out


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
        for rule in self.rules.values():
            if rule.subject is not None and rule.subject not in columns:
                raise PolicyError(
                    f"column {rule.column!r}: date_shift parameter 'subject' names {rule.subject!r}, which is not in "
                    "the source; name a source column that identifies the subject, or add it to the source query"
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

    @property
    def deidentified_columns(self) -> list[str]:
        """The columns a de-identifying action (``date_shift``, ``generalise``, ``mask``, ``suppress``) changes."""
        return [c for c, r in self.rules.items() if r.action in DEIDENTIFY_ACTIONS]

    @property
    def text_columns(self) -> list[str]:
        """The output columns that are text whatever the source type: pseudonyms, generalised and masked values."""
        return [c for c, r in self.rules.items() if r.action in ("pseudonymise", "generalise", "mask")]

    @property
    def audited_columns(self) -> list[str]:
        """What the audit's ``columns`` lists: the pseudonymised columns by name (as before de-identifying actions
        existed), then each de-identified column as ``column:action`` (an action, never a value or an offset)."""
        return [*self.pseudonymised_columns,
                *(f"{c}:{r.action}" for c, r in self.rules.items() if r.action in DEIDENTIFY_ACTIONS)]

    def to_mapping(self) -> dict[str, Any]:
        return {"columns": {c: r.to_mapping() for c, r in self.rules.items()}, "default": self.default}
