"""Erasing one subject (or a few): their escrow rows, and on request the target rows carrying their pseudonyms.

Health-data services delete a person's pseudonyms on request (gPAS, Mainzelliste); the GDPR's right
to erasure asks the same of a pipeline. Given the subject's **original identifiers** and the project's
pseudonymisation token, the pseudonyms are computed exactly as the loads computed them (the same
column rules: normalisers and domain); given **pseudonyms**, they are used as they are.

- **Escrow**: the subject's rows are deleted from ``pseudonymise_escrow``: nobody can reveal them again,
  with any reverse token, ever. The rows kept in the same escrow batches stay revealable: the erasure's
  ``success`` audit row lists the new digest of every batch it changed (over the rows that remain), which
  the reader takes over the earlier listing (docs/design.md §5.1): on PostgreSQL only because the erasing
  role may delete escrow rows, so an ``erase`` row appended by any other role re-lists nothing.
- **Targets** (when named): the rows whose column holds one of the pseudonyms are deleted, each target in
  one transaction with its own audited use (operation ``erase``, counts only).

What cannot be erased this way: in a **randomised** project a pseudonym is random, so it cannot be
recomputed from the identifiers: erase by the pseudonyms themselves (from what was shared), or open the
project's escrow with a reverse token to find them (not done here: that reveals every subject). And
a pseudonym already shared with a third party stays in their copy: erasure here cannot reach it.
Audit rows are never erased: they hold no identifier or pseudonym of the subject, only counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from pseudonymise.core.audit import AuditUse
from pseudonymise.core.errors import ErasureError, database_error, raise_alone
from pseudonymise.core.escrow import EscrowTables, batch_digest
from pseudonymise.core.pipeline import RunSummary, Store
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.use import RunContext, TokenSource, TokenUse

_CHUNK = 1000


@dataclass(frozen=True)
class ErasureTarget:
    """A table whose rows carrying one of the subject's pseudonyms in ``column`` are deleted."""

    engine: Engine
    table: str
    column: str
    schema: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or (f"{self.schema}.{self.table}" if self.schema else self.table)


def erase_by_identifiers(store: Store, tokens: TokenSource, identifiers: Sequence[Any], rules: Sequence[ColumnRule],
                         targets: Sequence[ErasureTarget] = (), run: RunContext | None = None) -> RunSummary:
    """Erase the subjects whose original identifiers are ``identifiers``: their pseudonyms under each of
    ``rules`` (the column rules of the loads: normalisers, domain) are computed with the project's
    pseudonymisation token of ``tokens`` (an audited use, operation ``erase``)."""
    if not rules:
        raise ErasureError("name at least one column rule (the domain and normalisers the loads used)")
    if not identifiers:
        raise ErasureError("no identifier to erase: the list, query or file gave none")
    store.create()
    with TokenUse(store.audit, "erase", tokens, kind="pseudonymisation", columns=[r.column for r in rules],
                  target=", ".join(t.name for t in targets) or None, run=run) as use:
        token = use.token
        assert token is not None
        if token.treatment == "randomised":
            raise ErasureError(
                f"project {token.project!r} is randomised: its pseudonyms are random, so they cannot be computed from "
                "the identifiers. Erase by the pseudonyms themselves (--pseudonyms, from what was shared)")
        engine = Pseudonymiser(token, ColumnPolicy({r.column: r for r in rules}, "keep"), use.mac_service())
        pseudonyms: set[str] = set()
        for rule in rules:
            pseudonyms.update(p for p in engine.pseudonymise_values(list(identifiers), rule) if p is not None)
        counts, _ = _erase(store, token.project, pseudonyms, targets, run, use.use_id, use)
    return RunSummary("erase", use.use_id, token.project, token.jti, token.fingerprint, [r.column for r in rules],
                      counts)


def erase_by_pseudonyms(store: Store, project: str, pseudonyms: Iterable[str], targets: Sequence[ErasureTarget] = (),
                        run: RunContext | None = None) -> RunSummary:
    """Erase the subjects whose pseudonyms in ``project`` are ``pseudonyms`` (no token needed: any project,
    randomised ones included). Audited as operation ``erase``."""
    wanted = {p for p in pseudonyms if p}
    if not project:
        raise ErasureError("name the project whose pseudonyms these are")
    if not wanted:
        raise ErasureError("no pseudonym to erase: the list, query or file gave none")
    store.create()
    use = AuditUse(operation="erase", project=project, target=", ".join(t.name for t in targets) or None,
                   context=(run or RunContext()).audit_fields())
    store.audit.start(use)
    try:
        counts, _ = _erase(store, project, wanted, targets, run, use.use_id, None, finish=use)
    except BaseException as exc:
        store.audit.finish(use, "failed", error=exc)
        raise
    return RunSummary("erase", use.use_id, project, None, None, [], counts)


def _erase(store: Store, project: str, pseudonyms: set[str], targets: Sequence[ErasureTarget],
           run: RunContext | None, parent: str, token_use: TokenUse | None,
           finish: AuditUse | None = None) -> tuple[dict[str, int], dict[str, Any]]:
    """Escrow first (with the use's ``success`` in the same transaction), then each target."""
    counts = {"values_pseudonymised": len(pseudonyms)}
    try:
        with store.engine.begin() as conn:
            deleted, relisted = erase_escrow(conn, store.escrow, project, pseudonyms)
            counts["escrow_rows"] = deleted
            details = {"escrow_batches": relisted, "erased_from_escrow": deleted}
            if token_use is not None:
                token_use.succeed(conn, counts, details)
            elif finish is not None:
                store.audit.finish(finish, "success", conn=conn, counts=counts, details=details)
    except SQLAlchemyError as exc:
        raise_alone(database_error(exc, "erasing escrow rows failed"))
    for target in targets:
        counts[f"rows_deleted:{target.name}"] = erase_from_target(store, project, pseudonyms, target, run, parent)
    return counts, details


def erase_escrow(conn: Connection, tables: EscrowTables, project: str, pseudonyms: set[str]) -> tuple[int, dict[str, str]]:
    """Delete the escrow rows of ``pseudonyms`` in ``project``; return the rows deleted and, for every
    batch that lost rows, the digest of the rows it keeps (to list in the erasure's ``success`` row)."""
    v = tables.values
    ordered = sorted(pseudonyms)
    batches: set[str] = set()
    deleted = 0
    for i in range(0, len(ordered), _CHUNK):
        chunk = ordered[i:i + _CHUNK]
        cond = sa.and_(v.c.project == project, v.c.pseudonym.in_(chunk))
        batches.update(r[0] for r in conn.execute(sa.select(v.c.batch_id).where(cond).distinct()))
        deleted += conn.execute(sa.delete(v).where(cond)).rowcount or 0
    relisted = {}
    for batch_id in sorted(batches):
        rows = conn.execute(sa.select(v.c.pseudonym, v.c.nonce, v.c.ciphertext)
                            .where(v.c.batch_id == batch_id).order_by(v.c.nonce))
        relisted[batch_id] = batch_digest((r.pseudonym, bytes(r.nonce), bytes(r.ciphertext)) for r in rows)
    return deleted, relisted


def erase_from_target(store: Store, project: str, pseudonyms: set[str], target: ErasureTarget,
                      run: RunContext | None, parent: str) -> int:
    """Delete the rows of ``target`` carrying one of ``pseudonyms``, in one transaction, audited as its own
    ``erase`` use (in the same transaction when the target is in the audit's database)."""
    use = AuditUse(operation="erase", project=project, source=f"erasure {parent}", target=target.name,
                   columns=[target.column], context=(run or RunContext()).audit_fields())
    store.audit.start(use)
    try:
        try:
            table = sa.Table(target.table, sa.MetaData(), schema=target.schema, autoload_with=target.engine)
        except NoSuchTableError:
            raise_alone(ErasureError(f"the target table {target.name!r} does not exist; check its name and schema"))
        if target.column not in table.c:
            raise_alone(ErasureError(f"the target table {target.name!r} has no column {target.column!r}"))
        shared = target.engine is store.engine or str(target.engine.url) == str(store.engine.url)
        ordered = sorted(pseudonyms)
        try:
            with target.engine.begin() as conn:
                deleted = sum(conn.execute(sa.delete(table).where(table.c[target.column].in_(ordered[i:i + _CHUNK])))
                              .rowcount or 0 for i in range(0, len(ordered), _CHUNK))
                if shared:
                    store.audit.finish(use, "success", conn=conn, counts={"rows_out": deleted})
        except SQLAlchemyError as exc:
            raise_alone(database_error(exc, f"erasing rows of {target.name} failed", columns=[target.column]))
        if not shared:
            store.audit.finish(use, "success", counts={"rows_out": deleted})
    except BaseException as exc:
        store.audit.finish(use, "failed", error=exc)
        raise
    return deleted
