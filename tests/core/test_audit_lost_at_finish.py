"""The audit database lost just before the ``finished`` row, when the audit lives apart from the target.

The documented divergence (README, Configuration): the target commits first, so its rows exist
while the use shows ``started`` without ``finished``; the run fails loudly and the verifier lists
the use as incomplete. When the audit lives with the target, both roll back together instead
(tests/core/test_use.py::test_success_rolled_back_with_the_data_becomes_failed)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.errors import AuditError, DatabaseIOError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.sql import TableTarget
from pseudonymise.core.use import GivenToken

pytestmark = pytest.mark.postgres


class _Rows:
    columns = ("id",)

    def batches(self):  # type: ignore[no-untyped-def]
        yield {"id": ["A1", "A2", "A3"]}


def test_audit_lost_before_finish_leaves_a_visible_incomplete_use(pg_url: str, sqlite_url: str,
                                                                  issuer: Issuer) -> None:
    audit_engine = sa.create_engine(pg_url)
    target_engine = sa.create_engine(sqlite_url)
    store = Store(audit_engine)

    class TargetThenLoseAudit:
        """A target in its own database; right after it commits, the audit database drops every session."""

        def __init__(self) -> None:
            self.conn = target_engine.connect()
            self.txn = self.conn.begin()
            self.sink = TableTarget("out").sink(self.conn, ["id"], pseudonymised=["id"])

        def write(self, batch: dict[str, list[Any]]) -> None:
            self.sink.write(batch)

        def commit(self) -> None:
            self.sink.commit()
            self.txn.commit()
            with sa.create_engine(pg_url, isolation_level="AUTOCOMMIT").connect() as admin:
                admin.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid()"))

        def abort(self) -> None:
            if self.txn.is_active:
                self.txn.rollback()

    # the lost connection fails the audit row, or the run's COMMIT (as the plugin's error, without the driver's text)
    with pytest.raises((AuditError, DatabaseIOError)):
        policy = ColumnPolicy.pseudonymise("id")
        run_pseudonymisation(store, GivenToken(issuer.issue("research-b", "pseudonymisation"), issuer.public_keys()),
                             policy, plan_transfer(_Rows(), SinkFactory(lambda cols, conn: TargetThenLoseAudit()), policy))
    with target_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM out")).scalar() == 3
    audit = AuditLog(sa.create_engine(pg_url))
    outcomes = [r["outcome"] for r in audit.iter_rows()]
    assert outcomes[0] == "started" and "success" not in outcomes
    assert audit.verify().ok
    if outcomes == ["started"]:
        assert len(audit.incomplete_uses()) == 1
