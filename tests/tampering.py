"""What the owner of the audit database can do to it (issue 11 §4), and the uses to do it to.

``truncate`` cuts off the last rows and sets the head to the new last row; ``rewrite_without`` removes
every row of an operation, re-hashes the rest and sets the head. ``AuditLog.verify()`` says "verified"
after either; only a signed checkpoint in a witness tells (the checkpoint tests, the CLI and the operator).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from pseudonymise.core.audit import GENESIS, AuditLog, row_hash
from pseudonymise.core.checkpoint import CheckpointTable
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.use import GivenToken, RunContext, TokenUse


def make_uses(audit: AuditLog, issuer: Issuer, operations: list[str],
              on_finished: Callable[[AuditLog], None] | None) -> None:
    """One audited token use per operation (``reverse`` with a reverse token), each calling ``on_finished``."""
    for operation in operations:
        kind = "reverse" if operation == "reverse" else "pseudonymisation"
        raw = issuer.issue("research-a", kind)  # type: ignore[arg-type]
        with TokenUse(audit, operation, GivenToken(raw, issuer.public_keys(), "research-a"), kind=kind,
                      run=RunContext(on_finished=on_finished)):
            pass


def truncate(audit: AuditLog, keep: int) -> None:
    """Delete the rows after ``keep``, set the head to row ``keep``, and remove the checkpoints above it."""
    t, head, cps = audit.table, audit.head, CheckpointTable(audit).table
    with audit.engine.begin() as conn:
        conn.execute(sa.delete(t).where(t.c.seq > keep))
        last = conn.execute(sa.select(t.c.seq, t.c.row_hash).where(t.c.seq == keep)).one()
        conn.execute(sa.update(head).values(seq=last.seq, row_hash=last.row_hash))
        conn.execute(sa.delete(cps).where(cps.c.seq > keep))


def rewrite_without(audit: AuditLog, operation: str) -> int:
    """Remove every row of ``operation``, renumber and re-hash the rest, set the head; drop the checkpoints."""
    rows = [r for r in audit.iter_rows() if r["operation"] != operation]
    prev = GENESIS
    with audit.engine.begin() as conn:
        conn.execute(sa.delete(audit.table))
        conn.execute(sa.delete(CheckpointTable(audit).table))
        for seq, row in enumerate(rows, 1):
            row.update(seq=seq, prev_hash=prev)
            row["row_hash"] = prev = row_hash(prev, row)
            conn.execute(audit.table.insert().values(**row))
        conn.execute(sa.update(audit.head).values(seq=len(rows), row_hash=prev))
    return len(rows)
