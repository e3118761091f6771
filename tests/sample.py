"""The sample patients (``include/sample/patients.csv``) and the check that none of their values leaks.

docs/design.md §6: no data value in any error, log or audit row. The error-value tests of the core, the
operators and the HTTP API run real faults over the sample and search everything they produce for
its identifying values.
"""

from __future__ import annotations

import csv
import json
import traceback
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog

ROOT = Path(__file__).resolve().parents[1]


def sample_rows() -> list[dict[str, str]]:
    with open(ROOT / "include/sample/patients.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def sample_values() -> list[str]:
    """The identifying values of the sample: every patient id (as stored and stripped) and every name."""
    values: set[str] = set()
    for row in sample_rows():
        values.update({row["patient_id"].strip(), row["name"]})
    return sorted(values)


def exception_texts(exc: BaseException) -> list[str]:
    """Everything an exception can print: str, repr, the formatted traceback, and the same of every exception
    reachable through ``__cause__`` and ``__context__``, whether or not the traceback would show it."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), "".join(traceback.format_exception(current, chain=False)),
                  repr(getattr(current, "args", ()))]
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
    return texts


def assert_no_value(texts: Iterable[str], values: Iterable[str] | None = None, where: str = "") -> None:
    blob = "\n".join(texts)
    leaked = [v for v in (values if values is not None else sample_values()) if v in blob]
    assert not leaked, f"{len(leaked)} sample value(s) in {where}, e.g. {leaked[:3]}:\n{blob[:3000]}"


def audit_texts(engine: sa.Engine) -> list[str]:
    rows = list(AuditLog(engine).iter_rows())
    return [json.dumps(rows, default=str)]


def load_sample(engine: sa.Engine, *, strict: bool = False) -> None:
    """The sample patients, typed (visit_id, birth_year integers), as a source table."""
    rows = sample_rows()
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE patient_visits (visit_id bigint PRIMARY KEY, patient_id text, name text, birth_year integer,"
            " ward text)"))
        conn.execute(sa.text("INSERT INTO patient_visits VALUES (:visit_id, :patient_id, :name, :birth_year, :ward)"),
                     [{"visit_id": i, "patient_id": r["patient_id"], "name": r["name"],
                       "birth_year": int(r["birth_year"]), "ward": r["ward"]} for i, r in enumerate(rows, 1)])
