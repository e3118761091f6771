"""Four eyes bound to what is revealed (docs/threat-model.md, requester): an approval names one pseudonym set by
its digest, a reversal reveals only if it reads that very set, and one approval of a task reveals once."""

from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa
from pseudonymise.core.approval import (
    SET_DIGEST_LABEL,
    Approval,
    PseudonymSet,
    approved_set_digest,
    pseudonym_set_digest,
)
from pseudonymise.core.audit import AuditUse
from pseudonymise.core.errors import ApprovalError
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.pipeline import Store, run_pseudonymisation, run_reversal
from pseudonymise.core.plan import SinkFactory, plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.use import GivenToken, RunContext

from tests.core.conftest import Collect, Rows


def _independent(pairs: set[tuple[str, str]]) -> str:
    """The digest written out again: SHA-256 of the sorted pairs as compact JSON."""
    return hashlib.sha256(json.dumps(sorted(pairs), separators=(",", ":")).encode()).hexdigest()


def test_the_set_digest_ignores_order_repetition_and_nulls_and_streams() -> None:
    one = {"a": ["P2", "P1", None, "P1"], "b": ["Q1", None, None, "Q1"]}
    digest, count = pseudonym_set_digest(["a", "b"], one)
    assert (digest, count) == (_independent({("a", "P1"), ("a", "P2"), ("b", "Q1")}), 3)
    streamed = PseudonymSet(["a", "b"])
    streamed.add({"a": ["P1"], "b": ["Q1"]})
    streamed.add({"a": ["P2", "P1"], "b": [None, "Q1"]})
    assert streamed.digest() == (digest, 3)
    assert pseudonym_set_digest(["a"], one)[0] != digest  # the columns are part of the set


def test_an_approval_names_exactly_one_set() -> None:
    d, other = "ab" * 32, "cd" * 32
    assert approved_set_digest(f"alice asks.\n\n{SET_DIGEST_LABEL} {d} (3 pseudonyms in patient_id)", what="t") == d
    assert approved_set_digest(f"{SET_DIGEST_LABEL} {d}\nagain: {SET_DIGEST_LABEL} {d}", what="t") == d
    with pytest.raises(ApprovalError, match=r"does not name the pseudonyms.*PseudonymSetDigestOperator"):
        approved_set_digest("alice asks to reveal the pseudonyms in /tmp/x.csv", what="t")
    with pytest.raises(ApprovalError, match="does not name"):
        approved_set_digest(None, what="t")
    # a requester's reason quoting another set's digest makes the approval name no one set
    with pytest.raises(ApprovalError, match="2 different pseudonym sets"):
        approved_set_digest(f"{SET_DIGEST_LABEL} {d}\nReason: see {SET_DIGEST_LABEL} {other}", what="t")


def _load(store: Store, issuer: Issuer) -> list[str]:
    raw = issuer.issue("research-a", "pseudonymisation")
    out = Collect()
    policy = ColumnPolicy.pseudonymise("pid", default="keep")
    run_pseudonymisation(store, GivenToken(raw, issuer.public_keys()), policy,
                         plan_transfer(Rows({"pid": ["P1", "P2", "P3"]}), SinkFactory(lambda c, conn: out), policy))
    return list(out.rows["pid"])


def _approval(digest: str | None) -> Approval:
    return Approval(requester="alice", approver="bob", reason="SAR 12", approved_at=None, via="airflow-hitl",
                    reference="approve_reversal", pseudonym_set_digest=digest)


def test_a_reversal_reveals_only_the_approved_set(db_url: str, issuer: Issuer) -> None:
    store = Store(sa.create_engine(db_url))
    p1, p2, p3 = _load(store, issuer)
    approved, _ = pseudonym_set_digest(["pid"], {"pid": [p1, p2]})
    reverse = issuer.issue("research-a", "reverse", max_uses=None)

    def reveal(pseudonyms: list[str], approval: Approval) -> Collect:
        sink = Collect()
        run_reversal(store, GivenToken(reverse, issuer.public_keys()), ["pid"],
                     plan_transfer(Rows({"pid": pseudonyms}), SinkFactory(lambda c, conn: sink)),
                     RunContext(triggered_by="alice"), approval=approval)
        return sink

    # another set (one more pseudonym), or a subset: refused before the sink commits, audited failed
    for asked in ([p1, p2, p3], [p1]):
        refused = Collect()
        with pytest.raises(ApprovalError, match=r"not the set that was approved.*nothing was written"):
            run_reversal(store, GivenToken(reverse, issuer.public_keys()), ["pid"],
                         plan_transfer(Rows({"pid": asked}), SinkFactory(lambda c, conn, sink=refused: sink)),
                         RunContext(triggered_by="alice"), approval=_approval(approved))
        assert not refused.committed
        last = list(store.audit.iter_rows())[-1]
        assert (last["operation"], last["outcome"], last["error_class"]) == ("reverse", "failed", "ApprovalError")
    # the approved set, in another order and with repeats, is revealed; the audit names the digest
    sink = reveal([p2, p1, p2, None], _approval(approved))
    assert sink.committed and sink.rows["pid"] == ["P2", "P1", "P2", None]
    last = list(store.audit.iter_rows())[-1]
    assert last["outcome"] == "success" and json.loads(last["details"])["four_eyes"]["pseudonym_set_digest"] == approved
    assert store.audit.verify().ok
    store.engine.dispose()


def test_the_audit_says_whether_a_task_instance_succeeded_already(db_url: str) -> None:
    store = Store(sa.create_engine(db_url))
    store.create()
    where = {"dag_id": "reversal", "run_id": "manual__1", "task_id": "reveal", "map_index": -1}
    assert store.audit.succeeded("reverse", **where) is None
    failed = AuditUse(operation="reverse", context=dict(where))
    store.audit.start(failed)
    store.audit.finish(failed, "failed", error=RuntimeError("x"))
    other = AuditUse(operation="reverse", context={**where, "run_id": "manual__2"})
    store.audit.start(other)
    store.audit.finish(other, "success")
    assert store.audit.succeeded("reverse", **where) is None  # a failed try, or another run, uses nothing up
    done = AuditUse(operation="reverse", context=dict(where))
    store.audit.start(done)
    store.audit.finish(done, "success")
    assert store.audit.succeeded("reverse", **where) == done.use_id
    assert store.audit.succeeded("reverse", **{**where, "map_index": 0}) is None
    assert store.audit.succeeded("pseudonymise", **where) is None
    store.engine.dispose()


