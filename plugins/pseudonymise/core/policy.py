"""The column policy (DESIGN.md §4 step 1): what happens to each column, and the normalisers a rule may name.

A :class:`ColumnPolicy` maps column names to :class:`ColumnRule` objects (``pseudonymise``, ``keep``
or ``drop``) and says what to do with columns no rule names. It is checked against a source's
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

Action = Literal["pseudonymise", "keep", "drop"]
ACTIONS: tuple[str, ...] = ("pseudonymise", "keep", "drop")
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
