"""Re-keying after a rotation (run_rekey), on SQLite and PostgreSQL: every row gets the pseudonym the new
key gives its original value, once, in one transaction, and the new pseudonyms open through escrow."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from pseudonymise.core.errors import EscrowError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation, run_rekey
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken

from tests import reference
from tests.core.conftest import Rows

VALUES = [f"P{i % 700}" for i in range(2000)] + [None] * 10


def _pseudonymise(store: Store, issuer: Issuer, table: str) -> None:
    target = TableTarget(table, mode="replace")
    policy = ColumnPolicy({"pid": ColumnRule("pid"), "mrn": ColumnRule("mrn", domain="mrn")}, "keep")
    run_pseudonymisation(store, GivenToken(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()),
                         policy, plan_transfer(Rows({"n": list(range(len(VALUES))), "pid": VALUES, "mrn": VALUES[::-1]}),
                                               SinkFactory(lambda cols, conn: target.sink(conn, cols)), policy))


def test_rekey_gives_every_row_the_new_keys_pseudonym(issuer: Issuer, db_url: str) -> None:
    engine = sa.create_engine(db_url)
    store = Store(engine)
    _pseudonymise(store, issuer, "visits")
    issuer.rotate_key("research-a")
    new_token = issuer.issue("research-a", "pseudonymisation")
    keys = issuer.public_keys()
    summary = run_rekey(store, GivenToken(issuer.issue("research-a", "reverse"), keys), GivenToken(new_token, keys),
                        "visits", {"pid": "", "mrn": "mrn"}, batch_size=300)
    assert summary.counts["values_pseudonymised"] == 2 * 700
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT pid, mrn FROM visits ORDER BY n")).all()
    assert [r.pid for r in rows] == reference.token_pseudonyms(new_token, VALUES)
    assert [r.mrn for r in rows] == reference.token_pseudonyms(new_token, VALUES[::-1], domain="mrn")


def test_rekey_without_escrow_changes_nothing(issuer: Issuer, db_url: str) -> None:
    engine = sa.create_engine(db_url)
    store = Store(engine)
    _pseudonymise(store, issuer, "visits")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE visits SET pid = 'not-from-escrow' WHERE n = 5"))
        before = conn.execute(sa.text("SELECT pid, mrn FROM visits ORDER BY n")).all()
    issuer.rotate_key("research-a")
    with pytest.raises(EscrowError, match="no escrow"):
        run_rekey(store, GivenToken(issuer.issue("research-a", "reverse"), issuer.public_keys()),
                  GivenToken(issuer.issue("research-a", "pseudonymisation"), issuer.public_keys()),
                  "visits", {"pid": "", "mrn": "mrn"}, batch_size=300)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT pid, mrn FROM visits ORDER BY n")).all() == before
