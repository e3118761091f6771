"""Shared settings of the example DAGs: where include/ is, and the column policy they load."""

from __future__ import annotations

import json
from pathlib import Path

INCLUDE = Path(__file__).resolve().parent.parent / "include"


def column_policy(name: str) -> dict:
    """A column policy from include/policies/ (kept as data so reviewers can read it without code)."""
    return json.loads((INCLUDE / "policies" / f"{name}.json").read_text(encoding="utf-8"))
