"""Retention end to end: once escrow is purged past the retention end, no reverse token can reveal
those pseudonyms any more, and the audit shows the purge."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation, run_purge, run_reversal
from pseudonymise.core.pseudonymiser import ColumnPolicy


class _Rows:
    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = list(columns)
        self._data = columns

    def batches(self):  # type: ignore[no-untyped-def]
        yield {k: list(v) for k, v in self._data.items()}


class _Collect:
    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = {}

    def write(self, batch: dict[str, list[Any]]) -> None:
        for k, v in batch.items():
            self.rows.setdefault(k, []).extend(v)

    def commit(self) -> None: ...
    def abort(self) -> None: ...


def test_purge_after_retention_severs_the_link_for_ever(issuer: Issuer, db_url: str) -> None:
    store = Store(sa.create_engine(db_url))
    keys = issuer.public_keys()
    out = _Collect()
    run_pseudonymisation(store, issuer.issue("research-a", "pseudonymisation"), keys,
                         ColumnPolicy.pseudonymise("id"), _Rows({"id": ["A1", "A2"]}), lambda c, conn: out)
    pseudonyms = out.rows["id"]
    reverse = issuer.issue("research-a", "reverse")

    before = _Collect()
    run_reversal(store, reverse, keys, ["id"], _Rows({"id": pseudonyms}), lambda c, conn: before)
    assert before.rows["id"] == ["A1", "A2"]

    retention_end = issuer.project("research-a").retention_until
    early = run_purge(store, project="research-a", now=retention_end - timedelta(seconds=1))
    assert early.counts["escrow_rows"] == 0
    purged = run_purge(store, project="research-a", now=retention_end + timedelta(seconds=1))
    assert purged.counts["escrow_rows"] == 2

    after = _Collect()
    summary = run_reversal(store, reverse, keys, ["id"], _Rows({"id": pseudonyms}), lambda c, conn: after)
    assert after.rows["id"] == [None, None] and summary.counts["not_found"] == 2

    rows = list(store.audit.iter_rows())
    purges = [r for r in rows if r["operation"] == "purge" and r["event"] == "finished"]
    assert [(r["outcome"], r["escrow_rows"]) for r in purges] == [("success", 0), ("success", 2)]
    last_reverse = [r for r in rows if r["operation"] == "reverse" and r["event"] == "finished"][-1]
    assert json.loads(last_reverse["details"])["not_found"] == 2
    assert store.audit.verify().ok
