"""Retiring source data after a verified load: delete (or export, then delete) the source rows of an
interval only when the audit proves they were loaded.

The portal's guide asks that original data be archived or deleted once the pseudonymised load is done.
:func:`run_retire` looks in the audit for the ``success`` of the load of the same interval (the same
DAG's task, data interval and operation; mapped tasks summed, the latest success of each map index),
then, in one transaction on the source, optionally writes the interval's rows to a file (atomically)
and deletes them. The number of rows deleted must equal the rows the load read; otherwise nothing is
deleted (the source changed since the load, or the load read another set of rows) and the run fails
with the reason. Every retirement is audited (operation ``retire``): counts, the load's use ids and the
interval, never a value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from pseudonymise.core.audit import AuditLog, AuditUse
from pseudonymise.core.errors import RetireRefusedError, database_error, raise_alone
from pseudonymise.core.files import open_sink
from pseudonymise.core.pipeline import RunSummary, Store
from pseudonymise.core.sql import coerce_bound
from pseudonymise.core.use import RunContext


@dataclass(frozen=True)
class LoadSelector:
    """Which audited use is the load of the interval: the ``task_id`` of ``dag_id`` whose run had this data
    interval (ISO 8601, as the audit records it), of ``operation``."""

    dag_id: str
    task_id: str
    data_interval_start: str
    data_interval_end: str
    operation: str = "pseudonymise"

    @staticmethod
    def instant(value: datetime | str) -> str:
        return value.isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True)
class VerifiedLoad:
    rows_in: int
    use_ids: list[str]


def verified_load(audit: AuditLog, load: LoadSelector) -> VerifiedLoad:
    """The rows the load of the interval read: the latest ``success`` of each map index of the load task.

    :raises RetireRefusedError: the audit holds no successful load of the interval.
    """
    t = audit.table
    query = (sa.select(t.c.seq, t.c.use_id, t.c.map_index, t.c.rows_in)
             .where(t.c.event == "finished", t.c.outcome == "success", t.c.operation == load.operation,
                    t.c.dag_id == load.dag_id, t.c.task_id == load.task_id,
                    t.c.data_interval_start == load.data_interval_start,
                    t.c.data_interval_end == load.data_interval_end)
             .order_by(t.c.seq))
    latest: dict[int | None, tuple[str, int]] = {}
    with audit.engine.connect() as conn:
        for row in conn.execute(query):
            latest[row.map_index] = (row.use_id, int(row.rows_in or 0))
    if not latest:
        raise RetireRefusedError(
            f"no successful {load.operation!r} load by task {load.dag_id}.{load.task_id} of the interval "
            f"[{load.data_interval_start}, {load.data_interval_end}) in the audit; nothing deleted. Run the load "
            "first, or name the task that loads this interval (load_task_id)")
    return VerifiedLoad(sum(n for _, n in latest.values()), [use for use, _ in latest.values()])


@dataclass(frozen=True)
class SourceInterval:
    """The rows of ``table`` whose ``column`` lies in ``[start, end)``."""

    table: str
    column: str
    start: Any
    end: Any
    schema: str | None = None

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table


def run_retire(store: Store, source: Engine, interval: SourceInterval, load: LoadSelector,
               run: RunContext | None = None, *, export_path: str | os.PathLike[str] | None = None,
               export_format: str | None = None, source_label: str | None = None,
               publish: Callable[[str], None] | None = None, export_label: str | None = None,
               batch_size: int = 50_000) -> RunSummary:
    """Retire the source rows of ``interval`` once the audit of ``store`` proves ``load`` read them all.

    In one transaction on ``source``: the interval's rows are read (locked on PostgreSQL) and written to
    ``export_path`` when given, then deleted; if the rows deleted differ from the load's ``rows_in`` (or
    from the rows exported), the transaction rolls back and the export is removed. ``publish``, when
    given, is called with the finished export's path before the source commits (to copy it to object
    storage): if it fails, nothing is deleted. The use is audited in ``store`` as operation ``retire``.
    """
    store.create()
    label = source_label or interval.label
    use = AuditUse(operation="retire", source=f"{label}[{interval.column}]",
                   target=export_label or (None if export_path is None else f"file:{os.fspath(export_path)}"),
                   context=(run or RunContext()).audit_fields())
    store.audit.start(use)
    counts: dict[str, int] = {}
    try:
        loaded = verified_load(store.audit, load)
        counts["rows_in"] = loaded.rows_in
        deleted, exported = _retire(source, interval, loaded, export_path, export_format, publish, batch_size)
        counts.update(rows_out=deleted)
        store.audit.finish(use, "success", counts={"rows_in": loaded.rows_in, "rows_out": deleted},
                           details={"load_uses": loaded.use_ids, "exported_rows": exported,
                                    "interval": [str(interval.start), str(interval.end)]})
    except BaseException as exc:
        store.audit.finish(use, "failed", counts=counts, error=exc)
        raise
    return RunSummary("retire", use.use_id, None, None, None, [interval.column],
                      {"rows_loaded": loaded.rows_in, "rows_deleted": deleted, "rows_exported": exported})


def _retire(source: Engine, interval: SourceInterval, loaded: VerifiedLoad, export_path: Any,
            export_format: str | None, publish: Callable[[str], None] | None, batch_size: int) -> tuple[int, int]:
    try:
        table = sa.Table(interval.table, sa.MetaData(), schema=interval.schema, autoload_with=source)
    except NoSuchTableError:
        raise_alone(RetireRefusedError(f"the source table {interval.label!r} does not exist; check table and schema"))
    if interval.column not in table.c:
        raise_alone(RetireRefusedError(f"the source table {interval.label!r} has no column {interval.column!r}"))
    col = table.c[interval.column]
    cond = sa.and_(col >= coerce_bound(interval.start, col.type, col.name),
                   col < coerce_bound(interval.end, col.type, col.name))
    sink = None
    exported = 0
    try:
        with source.begin() as conn:
            if conn.dialect.name == "postgresql":
                # writers of the table wait until this commits: what is exported is what is deleted
                conn.execute(sa.text(f"LOCK TABLE {conn.dialect.identifier_preparer.format_table(table)} "
                                     "IN SHARE ROW EXCLUSIVE MODE"))
            if export_path is not None:
                columns: Sequence[str] = [c.name for c in table.c]
                sink = open_sink(export_path, columns, export_format)
                query = sa.select(table).where(cond).order_by(col)
                result = conn.execute(query.execution_options(stream_results=True))  # this statement only
                while rows := result.fetchmany(batch_size):
                    sink.write({name: [r[i] for r in rows] for i, name in enumerate(columns)})
                    exported += len(rows)
            deleted = conn.execute(sa.delete(table).where(cond)).rowcount
            if deleted != loaded.rows_in:
                raise_alone(RetireRefusedError(
                    f"{interval.label} holds {deleted} rows of [{interval.start}, {interval.end}) now but the load "
                    f"read {loaded.rows_in}; nothing deleted. The source changed since the load (or the load read "
                    "other rows): run the load again for this interval, then retire"))
            if sink is not None:
                if exported != deleted:
                    raise_alone(RetireRefusedError(
                        f"{exported} rows exported but {deleted} deleted from {interval.label}; nothing deleted"))
                sink.commit()
                sink = None
                if publish is not None:
                    publish(os.fspath(export_path))
    except SQLAlchemyError as exc:
        raise_alone(database_error(exc, f"retiring the rows of {interval.label} failed",
                                   columns=[c.name for c in table.c]))
    finally:
        if sink is not None:
            sink.abort()
    return deleted, exported
