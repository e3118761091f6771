"""Retention end to end: once escrow is purged past the retention end, no reverse token can reveal
those pseudonyms any more, and the audit shows the purge."""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation, run_purge, run_reversal
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.use import GivenToken

from tests.core.conftest import Collect, Rows


def test_purge_after_retention_severs_the_link_for_ever(issuer: Issuer, db_url: str) -> None:
    store = Store(sa.create_engine(db_url))
    keys = issuer.public_keys()
    out = Collect()
    policy = ColumnPolicy.pseudonymise("id")
    run_pseudonymisation(store, GivenToken(issuer.issue("research-a", "pseudonymisation"), keys), policy,
                         plan_transfer(Rows({"id": ["A1", "A2"]}), SinkFactory(lambda c, conn: out), policy))
    pseudonyms = out.rows["id"]
    reverse = GivenToken(issuer.issue("research-a", "reverse"), keys)

    before = Collect()
    run_reversal(store, reverse, ["id"], plan_transfer(Rows({"id": pseudonyms}), SinkFactory(lambda c, conn: before)))
    assert before.rows["id"] == ["A1", "A2"]

    retention_end = issuer.project("research-a").retention_until
    early = run_purge(store, project="research-a", now=retention_end - timedelta(seconds=1))
    assert early.counts["escrow_rows"] == 0
    purged = run_purge(store, project="research-a", now=retention_end + timedelta(seconds=1))
    assert purged.counts["escrow_rows"] == 2

    after = Collect()
    summary = run_reversal(store, reverse, ["id"],
                           plan_transfer(Rows({"id": pseudonyms}), SinkFactory(lambda c, conn: after)))
    assert after.rows["id"] == [None, None] and summary.counts["not_found"] == 2

    rows = list(store.audit.iter_rows())
    purges = [r for r in rows if r["operation"] == "purge" and r["event"] == "finished"]
    assert [(r["outcome"], r["escrow_rows"]) for r in purges] == [("success", 0), ("success", 2)]
    last_reverse = [r for r in rows if r["operation"] == "reverse" and r["event"] == "finished"][-1]
    assert json.loads(last_reverse["details"])["not_found"] == 2
    assert store.audit.verify().ok
