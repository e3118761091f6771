"""Erasing subjects (core/erase.py) on SQLite and PostgreSQL: escrow rows and target rows of the subjects
go, everything else stays (other subjects of the same escrow batch stay revealable), each step audited
with counts only. Pseudonyms are checked against docs/design.md §4 written out again (:mod:`tests.reference`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.db import make_engine
from pseudonymise.core.erase import ErasureTarget, erase_by_identifiers, erase_by_pseudonyms
from pseudonymise.core.errors import ErasureError
from pseudonymise.core.escrow import reveal
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.tokens import verify_token
from pseudonymise.core.use import GivenToken

from tests import reference
from tests.core.conftest import Rows

PATIENTS = ["P-1", "P-2", "P-3", "P-2", "P-4"]


@pytest.fixture
def store(db_url: str) -> Store:
    store = Store(make_engine(db_url))
    store.create()
    yield store
    store.engine.dispose()


def _load(store: Store, issuer: Issuer, project: str, table: str = "visits") -> str:
    """Pseudonymise the patients (one escrow batch) into ``table`` of the store's database."""
    raw = issuer.issue(project, "pseudonymisation")
    policy = ColumnPolicy.pseudonymise("pid", default="keep")
    target = TableTarget(table, mode="replace")
    run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy,
                         plan_transfer(Rows({"id": list(range(len(PATIENTS))), "pid": list(PATIENTS)}),
                                       SinkFactory(lambda cols, conn: target.sink(conn, cols)), policy))
    return raw


def _revealed(store: Store, issuer: Issuer, pseudonyms: list[str]) -> dict[str, Any]:
    token = verify_token(issuer.issue("research-a", "reverse"), issuer.public_keys())
    with store.engine.connect() as conn:
        return reveal(conn, store.escrow, token, pseudonyms, lambda: store.audit.listed_escrow_batches(conn, store.escrow.values)).values


def _pids(store: Store, table: str = "visits") -> list[str]:
    with store.engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(sa.text(f"SELECT pid FROM {table}")))


def test_erasing_by_identifier_severs_reversal_for_that_subject_only(store: Store, issuer: Issuer) -> None:
    raw = _load(store, issuer, "research-a")
    key = reference.claims(raw)["key"]
    pseudonym = {p: reference.pseudonym(reference.b64url_decode(key), p) for p in set(PATIENTS)}
    assert _revealed(store, issuer, list(pseudonym.values())) == {v: k for k, v in pseudonym.items()}
    summary = erase_by_identifiers(store, GivenToken(raw, issuer.public_keys()), ["P-2", "  "], [ColumnRule("pid")],
                                   [ErasureTarget(store.engine, "visits", "pid")])
    assert summary.counts["escrow_rows"] == 1 and summary.counts["rows_deleted:visits"] == 2
    # P-2 can never be revealed again; the others of the same escrow batch still are
    assert _revealed(store, issuer, [pseudonym["P-2"]]) == {}
    assert _revealed(store, issuer, [pseudonym[p] for p in ("P-1", "P-3", "P-4")]) == {
        pseudonym[p]: p for p in ("P-1", "P-3", "P-4")}
    assert _pids(store) == sorted(pseudonym[p] for p in ("P-1", "P-3", "P-4"))
    assert store.audit.verify().ok
    erasures = [r for r in store.audit.iter_rows() if r["operation"] == "erase" and r["event"] == "finished"]
    assert [(r["outcome"], r["escrow_rows"], r["rows_out"], r["target"]) for r in erasures] == [
        ("success", 1, None, "visits"), ("success", None, 2, "visits")]
    every_row = json.dumps(list(store.audit.iter_rows()), default=str)
    assert "P-2" not in every_row and pseudonym["P-2"] not in every_row  # counts only


def test_domains_and_normalisers_are_the_loads(store: Store, issuer: Issuer) -> None:
    raw = issuer.issue("research-a", "pseudonymisation")
    policy = ColumnPolicy({"pid": ColumnRule("pid", normalise=("strip", "upper"), domain="visits")}, "keep")
    target = TableTarget("visits", mode="replace")
    run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy,
                         plan_transfer(Rows({"pid": ["p-7 ", "P-8"]}),
                                       SinkFactory(lambda cols, conn: target.sink(conn, cols)), policy))
    erased = erase_by_identifiers(store, GivenToken(raw, issuer.public_keys()), [" P-7"],
                                  [ColumnRule("pid", normalise=("strip", "upper"), domain="visits")],
                                  [ErasureTarget(store.engine, "visits", "pid")])
    assert erased.counts["escrow_rows"] == 1 and erased.counts["rows_deleted:visits"] == 1
    key = reference.b64url_decode(reference.claims(raw)["key"])
    assert _pids(store) == [reference.pseudonym(key, "P-8", domain="visits")]


def test_a_randomised_project_is_erased_by_pseudonym_not_by_identifier(store: Store, issuer: Issuer) -> None:
    raw = _load(store, issuer, "random-r")
    with pytest.raises(ErasureError, match="randomised: its pseudonyms are random"):
        erase_by_identifiers(store, GivenToken(raw, issuer.public_keys()), ["P-1"], [ColumnRule("pid")])
    shared = _pids(store)
    summary = erase_by_pseudonyms(store, "random-r", shared[:2], [ErasureTarget(store.engine, "visits", "pid")])
    assert summary.counts["escrow_rows"] == 2 and summary.counts["rows_deleted:visits"] == 2
    assert _pids(store) == shared[2:]
    outcomes = [(r["operation"], r["outcome"]) for r in store.audit.iter_rows() if r["event"] == "finished"]
    assert outcomes[-3:] == [("erase", "failed"), ("erase", "success"), ("erase", "success")]


def test_bad_requests_erase_nothing(store: Store, issuer: Issuer) -> None:
    raw = _load(store, issuer, "research-a")
    before = _pids(store)
    with pytest.raises(ErasureError, match="no identifier"):
        erase_by_identifiers(store, GivenToken(raw, issuer.public_keys()), [], [ColumnRule("pid")])
    with pytest.raises(ErasureError, match="no pseudonym"):
        erase_by_pseudonyms(store, "research-a", [])
    with pytest.raises(ErasureError, match="'nope' does not exist"):
        erase_by_pseudonyms(store, "research-a", before[:1], [ErasureTarget(store.engine, "nope", "pid")])
    with pytest.raises(ErasureError, match="has no column 'patient'"):
        erase_by_pseudonyms(store, "research-a", before[:1], [ErasureTarget(store.engine, "visits", "patient")])
    assert _pids(store) == before
    assert store.audit.verify().ok
