"""The audited flows every entry point shares: pseudonymise, secondary, reverse, re-key, purge, dry run, risk report.

Each flow takes a :class:`~pseudonymise.core.use.TokenSource` (where the token comes from), a
:class:`~pseudonymise.core.plan.Transfer` planned by :func:`~pseudonymise.core.plan.plan_transfer`
(the open source, its path, the sink) and a :class:`~pseudonymise.core.use.RunContext` (who and when),
and keeps escrow and the audit ``finished`` row in one transaction of the :class:`Store`'s database.
A run reads top-down: open the audited use (the token read, verified and its ``started`` row
committed), stream the batches through the pseudonymiser, write the sink and escrow, commit with the
audit's ``finished`` row. Nothing here calls back into the CLI, the operators or the HTTP API.

When the store is PostgreSQL, or the rows travel as Arrow record batches (files), a pseudonymisation
run hands each batch's writes (target rows, escrow) to one background thread, in order, so the
database or the file writer works on batch *n* while batch *n + 1* is being pseudonymised (the C
engine and pyarrow's writer both release the GIL); at most two batches wait, so memory stays flat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pseudonymise.core.approval import Approval, PseudonymSet, ReverseRequests
from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.checkpoint import CheckpointTable
from pseudonymise.core.db import make_engine, sqlite_write_transaction
from pseudonymise.core.defaults import DRY_RUN_SAMPLE
from pseudonymise.core.errors import (
    TARGET_DATA_FIX,
    AuditError,
    EscrowError,
    EscrowNotFoundError,
    PolicyError,
    database_errors,
)
from pseudonymise.core.escrow import EscrowReader, EscrowTables, EscrowWriter, purge
from pseudonymise.core.plan import SharedTransaction, Sink, TableDestination, Transfer
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.pseudonymiser import Pseudonymiser, SecondaryPseudonymiser, Stats
from pseudonymise.core.risk import MEMORY_GROUPS, PostgresRiskTap, RiskReport, RiskSpec, SpillRiskTap, gate
from pseudonymise.core.sql import TableSink, reflect_table
from pseudonymise.core.sqlite_direct import SqliteDirect
from pseudonymise.core.threads import Jobs
from pseudonymise.core.use import RunContext, TokenSource, TokenUse

Progress = Callable[[Stats], None]


class Store:
    """The database that holds the audit and escrow tables (SQLite file by default)."""

    def __init__(self, engine: Engine | str, audit_table: str = "pseudonymise_audit", schema: str | None = None,
                 escrow_prefix: str = "pseudonymise") -> None:
        self.engine = make_engine(engine) if isinstance(engine, str) else engine
        self.audit = AuditLog(self.engine, audit_table, schema)
        self.escrow = EscrowTables.define(self.audit.metadata, escrow_prefix, schema)
        # created with the escrow tables on a new database; the HTTP API creates it on an older one
        ReverseRequests.define(self.audit.metadata, schema)

    def listed_escrow_batches(self, conn: Connection) -> dict[str, str]:
        """The escrow batches the verified audit lists, with their digests (erasures judged against this store's
        escrow table: :meth:`AuditLog.listed_escrow_batches`)."""
        return self.audit.listed_escrow_batches(conn, self.escrow.values)

    def create(self) -> None:
        if self.engine.dialect.name == "sqlite":
            self._create_on_sqlite()
            return
        self.audit.create()
        CheckpointTable(self.audit).create()
        try:
            with self.engine.begin() as conn:
                if self._escrow_ready(conn):
                    return
                self.audit.metadata.create_all(conn, checkfirst=True)
                self.escrow.upgrade(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise EscrowError(f"cannot create the escrow tables ({exc.__class__.__name__}); check the database") from exc

    def _create_on_sqlite(self) -> None:
        """On SQLite: look (a read, no lock), and only when a table, an index or a newer column is missing create
        them all in one transaction that holds the write lock (one commit to disk instead of one per statement;
        workers starting together wait for each other, and IF NOT EXISTS lets the later ones through)."""
        checkpoint = CheckpointTable(self.audit)
        try:
            with self.engine.connect() as conn:
                if self._sqlite_ready(conn, checkpoint.table):
                    return
            with sqlite_write_transaction(self.engine) as conn:
                self.audit.create(within=conn)
                checkpoint.create(within=conn)
                self.audit.metadata.create_all(conn, checkfirst=True)
                self.escrow.upgrade(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise AuditError(f"cannot create the audit and escrow tables ({exc.__class__.__name__}); check that the "
                             "audit database is reachable and may be written") from exc

    def _sqlite_ready(self, conn: Connection, checkpoint: sa.Table) -> bool:
        """Whether every table and index of the store exists on SQLite, with the columns of this release."""
        tables = [*self.audit.metadata.sorted_tables, checkpoint]
        wanted = {t.name for t in tables} | {str(i.name) for t in tables for i in t.indexes}
        schema = conn.dialect.identifier_preparer.quote(self.audit.table.schema) + "." if self.audit.table.schema else ""
        present = {name for (name,) in conn.exec_driver_sql(f"SELECT name FROM {schema}sqlite_master")}
        if not wanted <= present:
            return False
        return not self.escrow.missing_columns(conn) and not self.audit.missing_columns(conn)

    def _escrow_ready(self, conn: Connection) -> bool:
        """On PostgreSQL, whether the escrow tables exist with their v1.1 columns: a least-privilege
        pipeline role can then go on without the catalogue look-ups and DDL it may not run."""
        if conn.dialect.name != "postgresql":
            return False
        prep = conn.dialect.identifier_preparer
        if any(conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": prep.format_table(t)}).scalar() is None
               for t in (self.escrow.batches, self.escrow.values)):
            return False
        present = {c["name"] for c in sa.inspect(conn).get_columns(self.escrow.batches.name,
                                                                 schema=self.escrow.batches.schema)}
        return {"domain", "key_version", "ad_version"} <= present


@dataclass
class RunSummary:
    """What a run did, for logs and XCom: counts and ids, never a value or a secret."""

    operation: str
    use_id: str
    project: str | None
    token_jti: str | None
    token_fingerprint: str | None
    columns: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    #: the risk gate's figures (counts), when the run had one
    risk: dict[str, Any] | None = None
    #: a dry run's report: rows sampled, actions, target, risk (counts and names only)
    dry_run: dict[str, Any] | None = None
    #: ``"sqlite"`` when SQLite itself ran the pseudonymisation (``sqlite_direct.py``), else unset
    path: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "use_id": self.use_id, "project": self.project,
                "token_jti": self.token_jti, "token_fingerprint": self.token_fingerprint,
                "columns": self.columns, **self.counts, **({"risk": self.risk} if self.risk is not None else {}),
                **({"dry_run": self.dry_run} if self.dry_run is not None else {}),
                **({"path": self.path} if self.path is not None else {})}


def _summary(use: TokenUse, columns: Sequence[str], counts: Mapping[str, int]) -> RunSummary:
    token = use.token
    return RunSummary(use.use.operation, use.use_id, token.project if token else use.use.project,
                      token.jti if token else None, use.use.token_fingerprint, list(columns), dict(counts))


def run_pseudonymisation(store: Store, tokens: TokenSource, policy: ColumnPolicy, transfer: Transfer,
                         run: RunContext | None = None, *, secondary: bool = False,
                         progress: Progress | None = None, risk: RiskSpec | None = None,
                         risk_memory_groups: int = MEMORY_GROUPS) -> RunSummary:
    """Pseudonymise (or, with ``secondary``, re-pseudonymise) the transfer's source into its sink, audited.

    :param tokens: where the token comes from; its MAC service computes the MACs of a token whose key
        is held in Vault Transit.
    :param run: who runs the use and when; its ``on_finished`` runs after the use (e.g. a signed checkpoint).
    :param progress: called with the running counts after each batch.
    :param risk: the re-identification risk gate over this run's output rows, checked after the last write and
        before the commit: when it falls short, :class:`~pseudonymise.core.errors.RiskGateError` and nothing is
        committed (target, escrow; a file is not renamed into place); its figures go to the audit's details.
    :param risk_memory_groups: classes the gate counts in memory before it spills them to disk (off PostgreSQL).
    """
    store.create()
    columns = transfer.columns
    with TokenUse(store.audit, "secondary" if secondary else "pseudonymise", tokens,
                  kind="secondary" if secondary else "pseudonymisation", source=transfer.source_label,
                  target=transfer.target_label, columns=policy.audited_columns, run=run) as use:
        assert use.token is not None
        mac = use.mac_service()
        engine: Pseudonymiser | SecondaryPseudonymiser = (
            SecondaryPseudonymiser(use.token, policy, mac) if secondary else Pseudonymiser(use.token, policy, mac)
        )
        out_columns = engine.output_columns(columns)  # policy errors before anything is written
        if risk is not None:
            risk.check(columns, out_columns)
        if transfer.arrow:  # files: reader, C engine, collision check and writer each on a thread of their own
            engine.check_collisions_aside()
            engine.hash_columns_side_by_side()
        escrow = EscrowWriter(use.token, store.escrow, defer=True) if not secondary and use.token.reversible else None
        escrow_rows = [0]  # counted by the writer, added to the stats once the writes are done
        ran_in_sqlite = False
        sink: Sink | None = None
        tap: PostgresRiskTap | SpillRiskTap | None = None
        try:
            # a database error escaping the writes or the COMMIT: SQLSTATE and names only, never the driver's text
            # SQLite into SQLite, first-level, irreversible, key at hand, no gate: SQLite itself does the run
            direct = transfer.sqlite_direct if (mac is None and escrow is None and risk is None
                                                and isinstance(engine, Pseudonymiser)) else None
            with database_errors("writing the target, escrow and audit failed; nothing was committed",
                                 columns=out_columns, data_fix=TARGET_DATA_FIX), \
                    _transaction(store.engine, direct) as (conn, attached), \
                    Jobs(background=_writes_in_background(store.engine), name="pseudonymise-writer") as writes:
                sink = transfer.open_sink(out_columns, conn)
                tap = _risk_tap(risk, out_columns, transfer, conn, risk_memory_groups)
                if isinstance(sink, TableSink) and sink.creates_without_rows:
                    # the writer creates the target (and applies the write mode) while the first batch is read;
                    # from here on only the writer uses the transaction's connection, until the writes are drained
                    writes.submit(functools.partial(sink.open_table, {}))
                if direct is not None and attached is not None \
                        and direct.prepare(sink, transfer.source):  # type: ignore[arg-type]
                    direct.run(engine, attached, sink, columns)  # type: ignore[arg-type]
                    ran_in_sqlite = True
                    use.counts.update(engine.stats.as_dict(), escrow_rows=0)
                    if progress:
                        progress(engine.stats)
                else:
                    with _cycle_collection_paused():
                        for batch in transfer.batches(key_at_hand=mac is None):
                            out = engine.pseudonymise_batch(batch, columns)
                            writes.submit(_writer(sink, escrow, conn, out.columns, out.escrow, escrow_rows, tap))
                            use.counts.update(engine.stats.as_dict(), escrow_rows=escrow_rows[0])
                            if progress:
                                progress(engine.stats)
                engine.finish()  # the collision check completes before anything commits
                writes.drain()
                if escrow is not None:
                    escrow_rows[0] += escrow.flush(conn)
                engine.stats.escrow_rows += escrow_rows[0]
                if tap is not None:  # over this run's output rows, before anything commits
                    figures = tap.figures()
                    use.details["risk"] = figures.as_dict()
                    gate(figures)
                sink.commit()
                details: dict[str, Any] = {"key_version": use.token.key_version}
                if escrow is not None and escrow.digests:
                    details["escrow_batches"] = escrow.digests  # what reversal may prove (docs/design.md §5.1)
                use.succeed(conn, engine.stats.as_dict(), details=details)
        except BaseException:
            engine.close()
            if sink is not None:
                sink.abort()
            raise
        finally:
            if tap is not None:
                tap.close()
        summary = _summary(use, out_columns, engine.stats.as_dict())
        if "risk" in use.details:
            summary.risk = use.details["risk"]
        if ran_in_sqlite:
            summary.path = "sqlite"
        return summary


@contextlib.contextmanager
def _transaction(engine: Engine, direct: SqliteDirect | None) -> Iterator[tuple[Connection, str | None]]:
    """The run's transaction on the store's database; for a run SQLite may do itself, the source file attached
    first (SQLite allows no ``ATTACH`` inside a transaction) and detached once the transaction has ended. Yields
    the connection and the schema the source is read by (``None``: the generic path reads it)."""
    if direct is None:
        with engine.begin() as conn:
            yield conn, None
        return
    with engine.connect() as conn, direct.attached(conn) as schema, conn.begin():
        yield conn, schema


def _risk_tap(risk: RiskSpec | None, columns: list[str], transfer: Transfer, conn: Connection,
              memory_groups: int) -> PostgresRiskTap | SpillRiskTap | None:
    """Where the gate counts the run's output: in the run's own transaction when it loads a PostgreSQL table in the
    store's transaction (the target itself when the run replaces it, else a temporary table), else counts that
    spill to disk."""
    if risk is None:
        return None
    destination = transfer.destination
    if (isinstance(destination, TableDestination) and isinstance(destination.transaction, SharedTransaction)
            and conn.dialect.name == "postgresql"):
        target = destination.target
        return PostgresRiskTap(risk, columns, conn, (target.schema, target.table) if target.mode == "replace" else None)
    return SpillRiskTap(risk, columns, memory_groups=memory_groups)


def run_dry_run(store: Store, tokens: TokenSource, policy: ColumnPolicy, transfer: Transfer,
                run: RunContext | None = None, *, secondary: bool = False, sample: int = DRY_RUN_SAMPLE,
                risk: RiskSpec | None = None, risk_memory_groups: int = MEMORY_GROUPS) -> RunSummary:
    """Check a run on the first ``sample`` rows of the source and write nothing but its audited ``dry_run`` use.

    The token is read and verified (its use audited, operation ``dry_run``), the policy is planned against the
    source's columns, the sampled values are pseudonymised (their types checked, the collision check run) and
    the risk gate computed over the sample's output; the target is only inspected (whether it exists and has the
    output columns). No target row, escrow row, signed checkpoint (``run.on_finished`` is not called) or file is
    written. The summary's ``dry_run`` says what a real run would do; a risk gate that falls short on the
    sample is reported (``risk.passed`` false), not raised: a sample's classes are not the full run's.
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise PolicyError(f"a dry run's sample must be a positive number of rows, not {sample!r}")
    if run is not None and run.on_finished is not None:
        run = dataclasses.replace(run, on_finished=None)  # no signed checkpoint either: the next real use's covers it
    store.create()
    columns = transfer.columns
    with TokenUse(store.audit, "dry_run", tokens, kind="secondary" if secondary else "pseudonymisation",
                  source=transfer.source_label, target=transfer.target_label, columns=policy.pseudonymised_columns,
                  run=run) as use:
        assert use.token is not None
        mac = use.mac_service()
        engine: Pseudonymiser | SecondaryPseudonymiser = (
            SecondaryPseudonymiser(use.token, policy, mac) if secondary else Pseudonymiser(use.token, policy, mac)
        )
        out_columns = engine.output_columns(columns)
        if risk is not None:
            risk.check(columns, out_columns)
        target = _inspect_target(transfer, out_columns)
        tap = SpillRiskTap(risk, out_columns, memory_groups=risk_memory_groups) if risk is not None else None
        rows = 0
        try:
            batches = transfer.source.batches()
            try:
                for batch in batches:
                    batch = _first_rows(batch, sample - rows)
                    out = engine.pseudonymise_batch(batch, columns)
                    if tap is not None:
                        tap.add(out.columns)
                    rows += len(next(iter(batch.values()), ()))
                    if rows >= sample:
                        break
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
            engine.finish()  # the collision check over the sample
            report: dict[str, Any] = {
                "sample_rows": rows, "sample": f"the first {sample} rows of the source",
                "actions": {rule.column: rule.action for rule in policy.plan(columns)},
                "output_columns": out_columns, **target,
            }
            if tap is not None:
                report["risk"] = tap.figures().as_dict()
            counts = {**engine.stats.as_dict(), "rows_out": 0, "escrow_rows": 0}
            use.succeed(None, counts=counts, details={"dry_run": report})
        finally:
            engine.close()
            if tap is not None:
                tap.close()
    summary = _summary(use, out_columns, counts)
    summary.dry_run = report
    summary.risk = report.get("risk")
    return summary


def _first_rows(batch: Mapping[str, Sequence[Any]], rows: int) -> dict[str, Any]:
    """The first ``rows`` rows of a batch of columns (a column keeps its type: COPY text stays COPY text)."""
    return {name: values if len(values) <= rows else type(values)(values[:rows]) if isinstance(values, list)
            else list(values)[:rows] for name, values in batch.items()}


def _inspect_target(transfer: Transfer, out_columns: Sequence[str]) -> dict[str, Any]:
    """What a real run would find at the target, read only: the table's existence and missing columns, or the file."""
    destination = transfer.destination
    if isinstance(destination, TableDestination):
        target = destination.target
        with destination.engine.connect() as conn:
            table = reflect_table(conn, target.table, target.schema)
        if table is None:
            if not target.create:
                raise PolicyError(f"the target {target.label} does not exist; create it or set create=True")
            return {"target": target.label, "target_exists": False, "would": f"create {target.label} and write "
                    f"({target.mode})"}
        missing = [c for c in out_columns if c not in table.c]
        if missing:
            raise PolicyError(f"column(s) {', '.join(map(repr, missing))} are not in the target {target.label}; "
                              "add them to the table or drop them in the column policy")
        return {"target": target.label, "target_exists": True, "would": f"write into {target.label} ({target.mode})"}
    path = getattr(destination, "path", None)
    return {"target": transfer.target_label or (f"file:{path}" if path else "sink"),
            "target_exists": bool(path) and os.path.exists(path), "would": "write the file atomically"}


def _writes_in_background(engine: Engine) -> bool:
    """Whether a run's writes go to the background thread: on PostgreSQL, and on a SQLite file (sqlite3 lets
    go of the GIL while it steps, and SQLAlchemy opens file databases for use from any thread; an in-memory
    database's connection belongs to the thread that opened it)."""
    if engine.dialect.name == "postgresql":
        return True
    database = engine.url.database or ""
    return engine.dialect.name == "sqlite" and database not in ("", ":memory:") and "memory" not in database


@contextlib.contextmanager
def _cycle_collection_paused() -> Iterator[None]:
    """Python's cycle collector off while batches stream, and back on after.

    A batch is tens of thousands of row tuples and value lists, freed by reference counting as soon as the
    batch is written: none of them is in a reference cycle. Yet allocating them keeps triggering the
    collector, whose older generations hold every object the worker imported (Airflow, SQLAlchemy, pandas:
    millions), so it rescanned those again and again: a third of a SQLite run's time (issue 13's profile).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _writer(sink: Sink, escrow: EscrowWriter | None, conn: Connection, columns: Any,
            items: Sequence[Any], escrow_rows: list[int],
            tap: PostgresRiskTap | SpillRiskTap | None = None) -> Callable[[], None]:
    def write() -> None:
        sink.write(columns)
        if escrow is not None:
            escrow_rows[0] += escrow.write(conn, items)
        if tap is not None:
            tap.add(columns)
    return write


def run_reversal(store: Store, tokens: TokenSource, columns: Sequence[str] | Mapping[str, str], transfer: Transfer,
                 run: RunContext | None = None, *, progress: Progress | None = None,
                 require_all: bool = False, approval: Approval | None = None) -> RunSummary:
    """Replace pseudonyms in ``columns`` by their originals; the audit ``started`` row commits first.

    ``columns`` may map each column to its pseudonymisation domain, which only escrow written before
    v1.1 needs (it did not record the domain). Rows escrow cannot prove are refused: the run fails,
    audited ``failed``, and nothing is written. ``run.triggered_by`` is the user the audit names as
    having asked for the originals.

    :param require_all: fail, writing nothing, when a pseudonym has no escrow (unknown, or purged).
    :param approval: the second person's approval (four eyes), recorded in the use's ``finished`` row.
    """
    domains = dict(columns) if isinstance(columns, Mapping) else dict.fromkeys(columns, "")
    columns = list(domains)
    source = transfer.source
    store.create()
    with TokenUse(store.audit, "reverse", tokens, kind="reverse", source=transfer.source_label,
                  target=transfer.target_label, columns=list(columns), run=run) as use:
        assert use.token is not None
        if approval is not None:
            use.details.update(approval.details())
        require_columns_to_reverse(source, columns)
        stats = Stats()
        not_found = 0
        sink: Sink | None = None
        read = PseudonymSet(columns) if approval is not None and approval.pseudonym_set_digest else None
        try:
            with database_errors("writing the revealed rows and the audit failed; nothing was committed",
                                 columns=source.columns, data_fix=TARGET_DATA_FIX), store.engine.begin() as conn:
                reader = EscrowReader(conn, store.escrow, use.token, lambda: store.listed_escrow_batches(conn))
                sink = transfer.open_sink(list(source.columns), conn)
                for batch in source.batches():
                    rows = len(next(iter(batch.values()))) if batch else 0
                    stats.rows_in += rows
                    if read is not None:
                        read.add(batch)
                    for column in columns:
                        values = batch[column]
                        revealed = reader.reveal([v for v in values if v is not None], domains[column])
                        stats.nulls += sum(v is None for v in values)
                        batch[column] = [None if v is None else revealed.values.get(v) for v in values]
                        stats.values_pseudonymised += len(revealed.values)
                        not_found += len(revealed.not_found)
                    if require_all and not_found:
                        looked_up = not_found + stats.values_pseudonymised
                        share = f"none of the {looked_up}" if not_found == looked_up else f"{not_found} of the {looked_up}"
                        raise EscrowNotFoundError(
                            f"{share} distinct pseudonym(s) in the first {stats.rows_in:,} rows read have no escrow (unknown, "
                            "purged after retention, or of another project); nothing was written"
                        )
                    sink.write(batch)
                    stats.rows_out += rows
                    use.counts.update({**stats.as_dict(), "not_found": not_found})
                    if progress:
                        progress(stats)
                counts = {**stats.as_dict(), "not_found": not_found}
                if read is not None and approval is not None:
                    approval.require_set(read)
                sink.commit()
                use.succeed(conn, counts=counts,
                            details={"values_revealed": stats.values_pseudonymised, "not_found": not_found})
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        return _summary(use, list(columns), counts)


def require_columns_to_reverse(source: Any, columns: Sequence[str]) -> None:
    """:class:`PolicyError` unless ``columns`` are named and all in ``source``."""
    missing = [c for c in columns if c not in source.columns]
    if missing or not columns:
        raise PolicyError(f"column(s) {', '.join(map(repr, missing)) or '(none)'} to reverse are not in the source "
                          f"(it has {', '.join(map(repr, source.columns))})")


def pseudonym_set_of(source: Any, columns: Sequence[str]) -> PseudonymSet:
    """The ``(column, pseudonym)`` pairs ``source`` holds in ``columns`` (read whole, before any token is used)."""
    require_columns_to_reverse(source, columns)
    pairs = PseudonymSet(columns)
    for batch in source.batches():
        pairs.add(batch)
    return pairs


def record_refusal(store: Store, operation: str, error: BaseException, run: RunContext | None = None, *,
                   source: str | None = None, target: str | None = None, columns: Sequence[str] | None = None,
                   details: Mapping[str, Any] | None = None) -> str:
    """Audit an attempted use refused before its token was read (a reversal without four eyes): a
    ``started`` and a ``denied`` row; returns the use id. The caller raises ``error``."""
    store.create()
    use = AuditUse(operation=operation, source=source, target=target, columns=columns,
                   context=(run or RunContext()).audit_fields())
    store.audit.start(use)
    store.audit.finish(use, "denied", error=error, details=details)
    return use.use_id


def run_purge(store: Store, run: RunContext | None = None, *, project: str | None = None,
              now: datetime | None = None) -> RunSummary:
    """Delete escrow rows past their retention end (of ``project`` only, if given); the purge and its
    audit row commit together. ``now`` stands in for the database clock in tests."""
    store.create()
    use = AuditUse(operation="purge", project=project, context=(run or RunContext()).audit_fields())
    store.audit.start(use)
    try:
        with store.engine.begin() as conn:
            deleted = purge(conn, store.escrow, project=project, now=now)
            store.audit.finish(use, "success", conn=conn, counts={"escrow_rows": deleted})
    except BaseException as exc:
        store.audit.finish(use, "failed", error=exc)
        raise
    return RunSummary("purge", use.use_id, project, None, None, [], {"escrow_rows": deleted})


def run_risk_report(store: Store, describe: Callable[[], RiskReport], run: RunContext | None = None, *,
                    source: str | None = None, columns: Sequence[str] = ()) -> RiskReport:
    """Describe a table's or file's re-identification risk (``describe`` computes it) as an audited
    ``risk_report`` use: no token is used; the report (counts and column names, never a value) goes to the
    ``finished`` row's details, where the plugin's risk page reads it."""
    store.create()
    use = AuditUse(operation="risk_report", source=source, columns=list(columns),
                   context=(run or RunContext()).audit_fields())
    store.audit.start(use)
    try:
        report = describe()
    except BaseException as exc:
        store.audit.finish(use, "failed", error=exc)
        raise
    store.audit.finish(use, "success", counts={"rows_in": report.figures.rows},
                       details={"risk_report": report.as_dict()})
    if run is not None and run.on_finished is not None:
        run.on_finished(store.audit)
    return report


def run_rekey(store: Store, reverse_tokens: TokenSource, new_tokens: TokenSource, table: str,
              columns: Mapping[str, str], run: RunContext | None = None, *, schema: str | None = None,
              batch_size: int = 5_000) -> RunSummary:
    """Re-key a reversible project's pseudonyms in ``table`` after a key rotation, in one transaction.

    For each column (mapped to its pseudonymisation domain), every distinct old pseudonym is opened
    through escrow with the reverse token of ``reverse_tokens`` and pseudonymised again with the new
    token of ``new_tokens`` (new escrow rows are written); the table is updated in place. Both token
    uses are audited; the table must live in the store's database so the new pseudonyms, their escrow
    and both audit rows commit together. A pseudonym without escrow (purged, or made by another
    project) fails the whole run: nothing changes.
    """
    store.create()
    target = f"table:{schema + '.' if schema else ''}{table}"
    with TokenUse(store.audit, "rekey", reverse_tokens, kind="reverse", source=target, target=target,
                  columns=list(columns), run=run) as reverse_use, \
            TokenUse(store.audit, "rekey", new_tokens, kind="pseudonymisation", source=target, target=target,
                     columns=list(columns), run=run) as new_use:
        assert reverse_use.token is not None and new_use.token is not None
        if reverse_use.token.project != new_use.token.project:
            raise PolicyError("the reverse token and the new pseudonymisation token belong to different projects")
        escrow = EscrowWriter(new_use.token, store.escrow) if new_use.token.reversible else None
        stats = Stats()
        with database_errors(f"re-keying {target} failed; nothing was changed", columns=list(columns)), \
                store.engine.begin() as conn:
            reader = EscrowReader(conn, store.escrow, reverse_use.token,
                                  lambda: store.listed_escrow_batches(conn))
            t = sa.Table(table, sa.MetaData(), autoload_with=conn, schema=schema)
            missing = [c for c in columns if c not in t.c]
            if missing:
                raise PolicyError(f"column(s) {', '.join(map(repr, missing))} are not in {target}")
            for column, domain in columns.items():
                pz = Pseudonymiser(new_use.token, ColumnPolicy({column: ColumnRule(column, domain=domain)}))
                col = t.c[column]
                old = [r[0] for r in conn.execute(sa.select(col).where(col.is_not(None)).distinct())]
                # old -> new in a temporary table, then one UPDATE … FROM: every row changes once, even
                # where a new pseudonym happens to equal another old one
                mapping = sa.Table(f"_pseudonymise_rekey_{uuid.uuid4().hex[:12]}", sa.MetaData(),
                                   sa.Column("old", sa.Text, primary_key=True), sa.Column("new", sa.Text),
                                   prefixes=["TEMPORARY"])
                mapping.create(conn)
                for start in range(0, len(old), batch_size):
                    chunk = old[start:start + batch_size]
                    revealed = reader.reveal(chunk, domain)
                    if revealed.not_found:
                        raise EscrowError(
                            f"{len(revealed.not_found)} pseudonym(s) of column {column!r} have no escrow (purged "
                            "after retention, or not made by this project); they cannot be re-keyed. Nothing was changed"
                        )
                    batch = pz.pseudonymise_batch({column: [revealed.values[p] for p in chunk]})
                    if escrow is not None:
                        stats.escrow_rows += escrow.write(conn, batch.escrow)
                    conn.execute(mapping.insert(), [{"old": o, "new": n}
                                                    for o, n in zip(chunk, batch.columns[column], strict=True)])
                    stats.values_pseudonymised += len(chunk)
                conn.execute(sa.update(t).values({column: mapping.c.new}).where(col == mapping.c.old))
                mapping.drop(conn)
            counts = {**stats.as_dict(), "rows_in": stats.values_pseudonymised, "rows_out": stats.values_pseudonymised}
            reverse_use.succeed(conn, counts, details={"rekey_to_key_version": new_use.token.key_version})
            new_details: dict[str, Any] = {"key_version": new_use.token.key_version,
                                           "rekeyed_from_key_version": "escrow"}
            if escrow is not None and escrow.digests:
                new_details["escrow_batches"] = escrow.digests
            new_use.succeed(conn, counts, details=new_details)
        return _summary(new_use, list(columns), counts)
