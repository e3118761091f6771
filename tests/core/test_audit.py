"""The audit log (docs/design.md §6) on SQLite and PostgreSQL: pairs, the hash chain and its verifier, fail closed."""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.audit import FIELDS, GENESIS, AuditLog, AuditUse, row_hash
from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import AuditError
from pseudonymise.core.issuer import Issuer

from scripts.services import free_port
from tests import reference

CONTEXT = {"dag_id": "patients_daily", "task_id": "pseudonymise", "run_id": "scheduled__2026-11-01",
           "map_index": -1, "try_number": 1, "logical_date": datetime(2026, 11, 1, tzinfo=UTC),
           "host": "worker-1"}


def a_use(n: int = 0, **kwargs: Any) -> AuditUse:
    return AuditUse(operation="pseudonymise", project="research-a", token_jti=f"jti-{n}", token_kind="pseudonymisation",
                    token_fingerprint=f"{n:016x}", source="table:patients", target="table:patients_p",
                    columns=["patient_id"], context=dict(CONTEXT), **kwargs)


def fill(audit: AuditLog, uses: int = 3) -> list[dict[str, Any]]:
    for n in range(uses):
        use = a_use(n)
        audit.start(use)
        audit.finish(use, "success", counts={"rows_in": 10 + n, "rows_out": 10 + n, "nulls": n, "escrow_rows": 1})
    return list(audit.iter_rows())


def execute(audit: AuditLog, *statements: Any) -> None:
    with audit.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)


# --- writing ---------------------------------------------------------------------------------
def test_start_and_finish_pairs(audit: AuditLog) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    use = a_use()
    started = audit.start(use)
    assert started["seq"] == 1 and started["prev_hash"] == GENESIS
    assert audit.incomplete_uses() == [use.use_id]
    finished = audit.finish(use, "success", counts={"rows_in": 5, "rows_out": 5, "nulls": 2, "escrow_rows": 3},
                            details={"note": "ok"})
    assert finished["prev_hash"] == started["row_hash"]
    assert audit.incomplete_uses() == []
    rows = list(audit.iter_rows())
    assert [(r["seq"], r["event"], r["outcome"]) for r in rows] == [(1, "started", "started"), (2, "finished", "success")]
    assert {r["use_id"] for r in rows} == {use.use_id}
    done = rows[1]
    assert (done["rows_in"], done["rows_out"], done["rows_null"], done["escrow_rows"]) == (5, 5, 2, 3)
    assert done["rows_in"] is not None and rows[0]["rows_in"] is None
    assert json.loads(done["columns"]) == ["patient_id"]
    assert json.loads(done["details"]) == {"note": "ok"}
    assert (done["dag_id"], done["task_id"], done["run_id"], done["map_index"], done["try_number"]) == (
        "patients_daily", "pseudonymise", "scheduled__2026-11-01", -1, 1)
    assert done["logical_date"] == "2026-11-01T00:00:00+00:00"
    assert done["host"] == "worker-1"
    for row in rows:  # the database's clock, as an aware UTC instant
        assert row["recorded_at"].tzinfo is not None
        assert before < row["recorded_at"] < datetime.now(UTC) + timedelta(minutes=5)
    assert rows[0]["recorded_at"] <= rows[1]["recorded_at"]
    result = audit.verify()
    assert result.ok and result.rows_checked == 2 and result.last_seq == 2 and result.broken_at is None


def test_unknown_outcome_is_refused(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="outcome"):
        audit.finish(a_use(), "maybe")


def test_error_messages_of_foreign_exceptions_are_not_recorded(audit: AuditLog) -> None:
    use = a_use()
    audit.start(use)
    try:
        raise ValueError("invalid literal for int(): 'P100000'")
    except ValueError as exc:
        row = audit.finish(use, "failed", error=exc)
    assert row["error_class"] == "ValueError"
    assert "P100000" not in row["error_message"]
    assert "test_audit.py" in row["error_message"]


def test_empty_chain_verifies(audit: AuditLog) -> None:
    result = audit.verify()
    assert result.ok and result.rows_checked == 0 and result.last_seq == 0


def test_chain_of_several_uses_verifies(audit: AuditLog) -> None:
    rows = fill(audit)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for prev, row in itertools.pairwise(rows):
        assert row["prev_hash"] == prev["row_hash"]
        assert row["row_hash"] == row_hash(row["prev_hash"], row)
    assert audit.verify().ok
    assert "6 rows" in str(audit.verify())


# --- the verifier catches tampering ----------------------------------------------------------
def test_edited_row(audit: AuditLog) -> None:
    fill(audit)
    t = audit.table
    execute(audit, sa.update(t).where(t.c.seq == 3).values(rows_in=999_999))
    result = audit.verify()
    assert not result.ok and result.broken_at == 3 and result.rows_checked == 2
    assert "edited" in (result.reason or "")
    assert "BROKEN at row 3" in str(result)


@pytest.mark.parametrize("column", ["outcome", "project", "error_message", "recorded_at", "use_id"])
def test_edit_of_any_column_is_caught(audit: AuditLog, column: str) -> None:
    fill(audit)
    t = audit.table
    value: Any = datetime(2020, 1, 1, tzinfo=UTC) if column == "recorded_at" else "forged"
    execute(audit, sa.update(t).where(t.c.seq == 4).values({column: value}))
    assert audit.verify().broken_at == 4


def test_edited_row_with_its_hash_recomputed(audit: AuditLog) -> None:
    rows = fill(audit)
    t = audit.table
    forged = {**rows[2], "outcome": "denied"}
    execute(audit, sa.update(t).where(t.c.seq == 3).values(outcome="denied", row_hash=row_hash(forged["prev_hash"], forged)))
    result = audit.verify()
    assert not result.ok and result.broken_at == 4
    assert "prev_hash" in (result.reason or "")


def test_deleted_middle_row(audit: AuditLog) -> None:
    fill(audit)
    t = audit.table
    execute(audit, sa.delete(t).where(t.c.seq == 3))
    result = audit.verify()
    assert not result.ok and result.broken_at == 4
    assert "3..3 are missing" in (result.reason or "")


def test_deleted_first_row(audit: AuditLog) -> None:
    fill(audit)
    t = audit.table
    execute(audit, sa.delete(t).where(t.c.seq == 1))
    assert audit.verify().broken_at == 2


def test_deleted_last_row(audit: AuditLog) -> None:
    fill(audit)
    t = audit.table
    execute(audit, sa.delete(t).where(t.c.seq == 6))
    result = audit.verify()
    assert not result.ok and result.broken_at == 6 and result.rows_checked == 5
    assert "head" in (result.reason or "")


def test_row_appended_outside_the_plugin(audit: AuditLog) -> None:
    rows = fill(audit)
    forged = {**rows[-1], "seq": 7, "prev_hash": rows[-1]["row_hash"], "outcome": "success"}
    forged["row_hash"] = row_hash(forged["prev_hash"], forged)
    execute(audit, sa.insert(audit.table).values(**forged))
    result = audit.verify()
    assert not result.ok and result.broken_at == 7


def test_inserted_row(audit: AuditLog) -> None:
    rows = fill(audit)
    t = audit.table
    renumber = [sa.update(t).where(t.c.seq == seq).values(seq=seq + 1) for seq in range(6, 2, -1)]
    forged = {name: rows[1].get(name) for name in FIELDS}
    forged.update(seq=3, use_id="00000000-0000-0000-0000-000000000000", event="finished", outcome="success",
                  prev_hash=rows[1]["row_hash"])
    forged["row_hash"] = row_hash(forged["prev_hash"], forged)
    execute(audit, *renumber, sa.insert(t).values(**forged))
    assert [r["seq"] for r in audit.iter_rows()] == [1, 2, 3, 4, 5, 6, 7]
    result = audit.verify()
    assert not result.ok and result.broken_at == 4  # the forged row is consistent; its successor is not
    assert "prev_hash" in (result.reason or "")


def test_reordered_rows(audit: AuditLog) -> None:
    fill(audit)
    t = audit.table
    execute(audit,
            sa.update(t).where(t.c.seq == 3).values(seq=-1),
            sa.update(t).where(t.c.seq == 4).values(seq=3),
            sa.update(t).where(t.c.seq == -1).values(seq=4))
    result = audit.verify()
    assert not result.ok and result.broken_at == 3


def test_head_missing_is_refused_for_appends(audit: AuditLog) -> None:
    fill(audit, 1)
    execute(audit, sa.delete(audit.head))
    with pytest.raises(AuditError, match="head"):
        audit.start(a_use())
    assert not audit.verify().ok


# --- concurrency --------------------------------------------------------------------------------
def test_concurrent_appends_keep_one_chain(audit: AuditLog, db_url: str) -> None:
    threads, uses_each = 8, 10
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(n: int) -> None:
        log = AuditLog(make_engine(db_url))  # its own engine and connections, like another worker
        try:
            barrier.wait()
            for i in range(uses_each):
                use = a_use(n * 100 + i)
                log.start(use)
                log.finish(use, "success", counts={"rows_in": i})
        except BaseException as exc:
            errors.append(exc)
        finally:
            log.engine.dispose()

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    assert errors == []
    rows = list(audit.iter_rows())
    assert len(rows) == threads * uses_each * 2
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    per_use = Counter(r["use_id"] for r in rows)
    assert len(per_use) == threads * uses_each and set(per_use.values()) == {2}
    result = audit.verify()
    assert result.ok and result.rows_checked == len(rows)
    assert audit.incomplete_uses() == []


def test_first_use_by_many_workers_creates_the_tables_once(db_url: str) -> None:
    """Mapped tasks start together on a fresh database: each creates the tables if absent."""
    workers = 8
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def worker() -> None:
        log = AuditLog(make_engine(db_url))
        try:
            barrier.wait()
            log.start(a_use())
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            log.engine.dispose()

    pool = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    assert errors == []
    log = AuditLog(make_engine(db_url))
    result = log.verify()
    assert result.ok and result.rows_checked == workers
    log.engine.dispose()


def test_context_values_are_hashed_as_the_database_stores_them(audit: AuditLog) -> None:
    """Templated context often arrives as text ("1"); the chain must not break when it is read back as 1."""
    use = AuditUse(operation="pseudonymise", context={"try_number": "2", "map_index": "7", "run_id": 42,
                                                      "host": "worker-1"})
    audit.start(use)
    audit.finish(use, "success", counts={"rows_in": 3})
    row = next(iter(audit.iter_rows()))
    assert (row["try_number"], row["map_index"], row["run_id"]) == (2, 7, "42")
    assert audit.verify().ok


# --- fail closed ---------------------------------------------------------------------------------
def test_unreachable_audit_database_raises_audit_error() -> None:
    log = AuditLog(make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    with pytest.raises(AuditError) as info:
        log.start(a_use())
    assert "NOT used" in str(info.value) or "reachable" in str(info.value)


def test_unwritable_sqlite_audit_raises_audit_error(tmp_path: Any) -> None:
    log = AuditLog(make_engine(f"sqlite:///{tmp_path}/no/such/folder/audit.db"))
    with pytest.raises(AuditError):
        log.start(a_use())


def test_an_audit_made_before_revocation_is_upgraded(audit: AuditLog, issuer: Issuer) -> None:
    """An audit created by an earlier release (no revocation table, no token_jti index, no token_max_uses
    column, on PostgreSQL no start and revoke functions) gets them on first use by its owner; its rows
    and chain stay as they were and the new checks work on it."""
    from pseudonymise.core.errors import TokenRevokedError
    from pseudonymise.core.use import GivenToken, TokenUse

    first = issuer.issue("research-a", "pseudonymisation")
    with TokenUse(audit, "pseudonymise", GivenToken(first, issuer.public_keys()), kind="pseudonymisation"):
        pass
    before = list(audit.iter_rows())
    postgres = audit.engine.dialect.name == "postgresql"
    with audit.engine.begin() as conn:  # what the earlier release had
        conn.execute(sa.text("DROP TABLE pseudonymise_revoked"))
        conn.execute(sa.text("DROP INDEX ix_pseudonymise_audit_token_jti"))
        if postgres:
            conn.execute(sa.text("DROP FUNCTION pseudonymise_audit_start(jsonb, integer, jsonb, jsonb)"))
            conn.execute(sa.text("DROP FUNCTION pseudonymise_audit_revoke(jsonb, text, text)"))
        conn.execute(sa.text("ALTER TABLE pseudonymise_audit DROP COLUMN token_max_uses"))
    upgraded = AuditLog(make_engine(str(audit.engine.url.render_as_string(hide_password=False))))
    upgraded.create()
    inspector = sa.inspect(upgraded.engine)
    assert "pseudonymise_revoked" in inspector.get_table_names()
    assert "ix_pseudonymise_audit_token_jti" in {i["name"] for i in inspector.get_indexes("pseudonymise_audit")}
    def without_new_column(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "token_max_uses"} for r in rows]

    assert without_new_column(list(upgraded.iter_rows())) == without_new_column(before)
    assert upgraded.verify().ok
    once = issuer.issue("research-a", "reverse", max_uses=1)
    jti = reference.claims(once)["jti"]
    upgraded.revoke(jti, "issued by mistake", AuditUse(operation="revoke"))
    with pytest.raises(TokenRevokedError), TokenUse(upgraded, "reverse", GivenToken(once, issuer.public_keys()),
                                                    kind="reverse"):
        pytest.fail("a revoked token was handed out")
    assert upgraded.verify().ok
    upgraded.engine.dispose()


def _forge(audit: AuditLog, use_id: str, **fields: Any) -> None:
    """What any role that may append can write: a row through the append function (PostgreSQL) or in-process."""
    with audit.engine.begin() as conn:
        audit.append(conn, {"use_id": use_id, "operation": "reverse", **fields})


def test_a_forged_denied_row_gives_a_used_up_token_no_use_back(audit: AuditLog, issuer: Issuer) -> None:
    """``max_uses`` is counted in the admissions table, which only the start function writes: a ``denied`` row
    appended for an earlier use (its use id is in XCom, logs and the audit pages) does not make that use not
    count, and ``started`` rows appended with a token's id are no uses of it."""
    from pseudonymise.core.errors import TokenUsedUpError
    from pseudonymise.core.use import GivenToken, TokenUse

    once = issuer.issue("research-a", "reverse", max_uses=1)
    keys = issuer.public_keys()
    with TokenUse(audit, "reverse", GivenToken(once, keys), kind="reverse") as first:
        pass
    _forge(audit, first.use_id, event="finished", outcome="denied")
    with pytest.raises(TokenUsedUpError), TokenUse(audit, "reverse", GivenToken(once, keys), kind="reverse"):
        pytest.fail("a used-up token was handed out again after a forged denied row")
    twice = issuer.issue("research-a", "reverse", max_uses=2)
    jti = reference.claims(twice)["jti"]
    for n in range(3):
        _forge(audit, f"00000000-0000-0000-0000-00000000000{n}", event="started", outcome="started", token_jti=jti)
    for _ in range(2):
        with TokenUse(audit, "reverse", GivenToken(twice, keys), kind="reverse"):
            pass
    with pytest.raises(TokenUsedUpError), TokenUse(audit, "reverse", GivenToken(twice, keys), kind="reverse"):
        pytest.fail("a token was handed out a third time")
    assert audit.admissions() == {reference.claims(once)["jti"]: 1, jti: 2}
    assert audit.verify().ok


def test_an_audit_made_before_the_admissions_table_keeps_its_counted_uses(audit: AuditLog, issuer: Issuer) -> None:
    """On an audit made by an earlier release (no admissions table, on PostgreSQL the start function that
    counted the audit's rows), its owner's first use creates the table with the uses the audit shows let
    through (a ``started`` row with a verified token id and no ``denied`` row): no token gets a use back."""
    from pseudonymise.core.errors import TokenUsedUpError
    from pseudonymise.core.use import GivenToken, TokenUse

    keys = issuer.public_keys()
    twice, once = issuer.issue("research-a", "reverse", max_uses=2), issuer.issue("research-a", "reverse", max_uses=1)
    with TokenUse(audit, "reverse", GivenToken(twice, keys), kind="reverse") as used:
        pass
    with TokenUse(audit, "reverse", GivenToken(once, keys), kind="reverse"):
        pass
    with pytest.raises(TokenUsedUpError), TokenUse(audit, "reverse", GivenToken(once, keys), kind="reverse"):
        pass
    expected = audit.admissions()
    assert expected == {reference.claims(twice)["jti"]: 1, reference.claims(once)["jti"]: 1}
    execute(audit, sa.text("DROP TABLE pseudonymise_admitted"))
    upgraded = AuditLog(make_engine(str(audit.engine.url.render_as_string(hide_password=False))))
    upgraded.create()
    assert upgraded.admissions() == expected
    with audit.engine.connect() as conn:
        ledger = {r.use_id for r in conn.execute(sa.text("SELECT use_id FROM pseudonymise_admitted"))}
    assert used.use_id in ledger
    with TokenUse(upgraded, "reverse", GivenToken(twice, keys), kind="reverse"):
        pass
    with pytest.raises(TokenUsedUpError), TokenUse(upgraded, "reverse", GivenToken(twice, keys), kind="reverse"):
        pytest.fail("the upgrade gave a token its uses back")
    assert upgraded.verify().ok
    upgraded.engine.dispose()
