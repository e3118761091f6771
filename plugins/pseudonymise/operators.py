"""Airflow operators: pseudonymise, secondary-pseudonymise, reverse, re-key and purge, each one audited use.

Every data task follows the same flow: read the token (masked at once), commit the audit
``started`` row, verify the token, stream the source in batches through the pseudonymiser, write
the target and escrow, and commit the audit ``finished`` row in the same transaction as the data
when the audit lives in the target's database (the default). The operators name the pieces (the
token connection, the source, the target, the audit store) and the core runs the flow
(:mod:`pseudonymise.core.pipeline`). The XCom result is a summary of counts and ids, never a value
or a secret.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any, ClassVar
from urllib.parse import urlencode

from airflow.sdk import Asset, AssetAlias, BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from pseudonymise.core.approval import SET_DIGEST_LABEL, Approval
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.errors import (
    ApprovalError,
    ErasureError,
    PolicyError,
    PseudonymiseError,
    RetireRefusedError,
    ServiceUnavailableError,
    TokenError,
)
from pseudonymise.core.files import open_source
from pseudonymise.core.heap import freeze_startup_heap
from pseudonymise.core.locks import ensure_lock_table
from pseudonymise.core.pipeline import (
    DRY_RUN_SAMPLE,
    Store,
    pseudonym_set_of,
    record_refusal,
    run_dry_run,
    run_pseudonymisation,
    run_purge,
    run_rekey,
    run_reversal,
    run_risk_report,
)
from pseudonymise.core.plan import (
    Destination,
    FileDestination,
    QuerySource,
    SeparateTransaction,
    SharedTransaction,
    Source,
    TableDestination,
    Transfer,
    plan_transfer,
)
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Stats
from pseudonymise.core.risk import MAX_REPORT_QIS, MEMORY_GROUPS, RiskReport, RiskSpec, describe_batches, describe_table
from pseudonymise.core.sql import TableTarget, table_query
from pseudonymise.core.use import RunContext
from pseudonymise.hooks import (
    AirflowApprovalHook,
    ObjectStorageHook,
    PseudonymisationTokenHook,
    SqlDataHook,
    is_object_storage,
)
from pseudonymise.lineage import (
    LineageDataset,
    operator_lineage,
    path_dataset,
    query_origins,
    query_tables,
    table_dataset,
)

AUDIT_PAGE = "/pseudonymise/audit"
#: the asset aliases of target tables: ``pseudonymise/<target_conn_id>/<schema or default>/<table>``
ALIAS_PREFIX = "pseudonymise/"


def target_alias(target_conn_id: str, target_table: str, target_schema: str | None = None) -> AssetAlias:
    """The asset alias a :class:`PseudonymiseOperator` writing ``target_table`` declares; schedule a DAG on it to run
    after each load. Each load attaches the table's asset (``postgres://host:port/database/schema/table``)."""
    return AssetAlias(name=f"{ALIAS_PREFIX}{target_conn_id}/{target_schema or 'default'}/{target_table}")


class AuditTrailLink(BaseOperatorLink):
    """From a task instance to its rows on the plugin's audit page."""

    name = "Pseudonymisation audit"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        query = {"dag_id": ti_key.dag_id, "task_id": ti_key.task_id, "run_id": ti_key.run_id}
        if getattr(ti_key, "map_index", -1) >= 0:
            query["map_index"] = ti_key.map_index
        return f"{AUDIT_PAGE}?{urlencode(query)}"


def run_context(context: Mapping[str, Any], on_finished: Callable[[AuditLog], None] | None = None) -> RunContext:
    """Who, where and when, for the audit: DAG, task, run, try, dates, the user who triggered the run, and
    the host the task instance records (``[core] hostname_callable``; on Celery, the worker's), so the
    audit names the worker that used the token as Airflow does."""
    ti, dag_run = context.get("ti"), context.get("dag_run")
    return RunContext(
        dag_id=getattr(ti, "dag_id", None),
        task_id=getattr(ti, "task_id", None),
        run_id=getattr(ti, "run_id", None),
        map_index=getattr(ti, "map_index", None),
        try_number=getattr(ti, "try_number", None),
        logical_date=context.get("logical_date"),
        data_interval_start=context.get("data_interval_start"),
        data_interval_end=context.get("data_interval_end"),
        triggered_by=getattr(dag_run, "triggering_user_name", None),
        host=getattr(ti, "hostname", None) or None,
        on_finished=on_finished,
    )


def _task_failure(exc: Exception) -> Exception:
    """How a token or policy error fails the task: at once (``AirflowFailException``: retrying cannot help,
    fix the token or the policy), unless a service could not be reached (Vault, Transit): then a plain
    ``AirflowException``, so the task's ``retries`` apply."""
    if isinstance(exc, ServiceUnavailableError):
        return AirflowException(f"{exc} (retryable)")
    return AirflowFailException(str(exc))


@contextmanager
def _failing_the_task() -> Iterator[None]:
    """Token and policy errors fail the task as :func:`_task_failure` says; other errors (a database
    that cannot be reached, a full disk) propagate as they are, so the task's ``retries`` apply."""
    try:
        yield
    except (TokenError, PolicyError, ApprovalError) as exc:
        raise _task_failure(exc) from exc


def _checkpoint_after_use(conn_id: str | None, log: Any) -> Callable[[AuditLog], None] | None:
    """The use's ``on_finished`` for an audit signing connection: a signed checkpoint once the use's
    ``finished`` row is committed; a failure is a warning in the task log, never a failed use."""
    if not conn_id:
        return None
    from pseudonymise.core.checkpoint import checkpoint_after_use
    from pseudonymise.hooks import AuditSigningHook

    return checkpoint_after_use(lambda audit: AuditSigningHook(conn_id).checkpointer(audit), log)


class _ProgressLog:
    def __init__(self, log: Any, every: float = 10.0) -> None:
        self.log, self.every, self.start, self.last = log, every, time.monotonic(), time.monotonic()

    def __call__(self, stats: Stats) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("progress: %d rows (%.0f rows/s)", stats.rows_in, stats.rows_in / (now - self.start))


class BaseDataOperator(BaseOperator):
    """The parameters every data-moving operator shares: the token, the source, the target and the audit.

    :param pseudonymise_conn_id: the ``pseudonymise`` connection holding the token (see
        :class:`~pseudonymise.hooks.PseudonymisationTokenHook`; default ``pseudonymise_default``).
    :param source_conn_id: the SQL connection of the source, read with ``sql`` or ``source_table``.
    :param sql: the source query (templated; a ``.sql`` file works too), with ``:name`` bind ``parameters``.
    :param parameters: values of the query's ``:name`` bind parameters (templated).
    :param source_table: the source table, when there is no ``sql`` (templated); ``source_schema`` its schema. A
        SQLite table into a SQLite ``target_table`` in the audit's database is pseudonymised by SQLite itself (one
        ``INSERT … SELECT`` calling the C engine per value; ``path: "sqlite"`` in the returned summary) when the
        run is irreversible, first-level, with its key at hand, no de-identifying action and no risk gate; the
        rows are the same either way (docs/performance.md).
    :param source_schema: the schema of ``source_table`` (default: the connection's).
    :param source_path: a CSV or Parquet file to read instead of a database (templated); a URI such as
        ``s3://…`` goes through ``storage_conn_id``.
    :param source_format: ``csv`` or ``parquet`` (default: from the extension of ``source_path``).
    :param target_conn_id: the SQL connection of the target table.
    :param target_table: the target table (templated), created when missing (``create_table``).
    :param target_schema: the schema of ``target_table`` (default: the connection's).
    :param target_path: a CSV or Parquet file to write instead of a table (templated), written atomically;
        a URI goes through ``storage_conn_id``.
    :param target_format: ``csv`` or ``parquet`` (default: from the extension of ``target_path``).
    :param write_mode: ``append``; ``replace_partition`` (delete ``partition_column`` in
        ``[partition_start, partition_end)``, then insert); ``upsert`` on ``upsert_key``; ``replace`` (the
        whole table). Always one transaction.
    :param partition_column: the column whose values ``replace_partition`` replaces.
    :param partition_start: the first value of the replaced partition (templated; default the run's data
        interval start date).
    :param partition_end: the end (excluded) of the replaced partition (templated; default the run's data
        interval end date; ``None``: open-ended).
    :param upsert_key: the columns of a unique key of the target, for ``upsert``.
    :param create_table: create the target table when it does not exist (default ``True``).
    :param batch_size: rows per batch; memory is proportional to it, not to the table.
    :param audit_conn_id: the database of the audit and escrow tables; default the target's, so the
        audit's ``finished`` row commits with the data (file-to-file runs need one).
    :param audit_table: the audit table (default ``pseudonymise_audit``); ``audit_schema`` its schema.
    :param audit_schema: the schema of the audit and escrow tables (default: the connection's).
    :param storage_conn_id: the connection for ``source_path``/``target_path`` URIs on object storage
        (``s3://``, ``gs://``, ``file://`` …, through Airflow's ObjectStoragePath).
    :param audit_signing_conn_id: an audit signing connection (see :class:`AuditCheckpointOperator`): a signed
        checkpoint of the audit is written after the use; if it fails, the use stands and a warning says why.
    """

    template_fields: Sequence[str] = ("sql", "parameters", "source_table", "source_path", "target_table",
                                      "target_path", "partition_start", "partition_end")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, pseudonymise_conn_id: str = PseudonymisationTokenHook.default_conn_name,
                 source_conn_id: str | None = None, sql: str | None = None, parameters: Mapping[str, Any] | None = None,
                 source_table: str | None = None, source_schema: str | None = None,
                 source_path: str | None = None, source_format: str | None = None,
                 target_conn_id: str | None = None, target_table: str | None = None, target_schema: str | None = None,
                 target_path: str | None = None, target_format: str | None = None,
                 write_mode: str = "append", partition_column: str | None = None,
                 partition_start: Any = "{{ data_interval_start | ds if data_interval_start is defined and data_interval_start else '' }}",
                 partition_end: Any = "{{ data_interval_end | ds if data_interval_end is defined and data_interval_end else '' }}",
                 upsert_key: Sequence[str] | None = None, create_table: bool = True, batch_size: int = 50_000,
                 audit_conn_id: str | None = None, audit_table: str = "pseudonymise_audit",
                 audit_schema: str | None = None, storage_conn_id: str | None = None,
                 audit_signing_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pseudonymise_conn_id = pseudonymise_conn_id
        self.source_conn_id, self.sql, self.parameters = source_conn_id, sql, parameters
        self.source_table, self.source_schema = source_table, source_schema
        self.source_path, self.source_format = source_path, source_format
        self.target_conn_id, self.target_table, self.target_schema = target_conn_id, target_table, target_schema
        self.target_path, self.target_format = target_path, target_format
        self.write_mode, self.partition_column = write_mode, partition_column
        self.partition_start, self.partition_end = partition_start, partition_end
        self.upsert_key, self.create_table, self.batch_size = upsert_key, create_table, batch_size
        self.audit_conn_id, self.audit_table, self.audit_schema = audit_conn_id, audit_table, audit_schema
        self.storage_conn_id, self.audit_signing_conn_id = storage_conn_id, audit_signing_conn_id

    # --- hooks, resolved once ---------------------------------------------------------------------
    @cached_property
    def token_hook(self) -> PseudonymisationTokenHook:
        """Where the token comes from."""
        return PseudonymisationTokenHook(self.pseudonymise_conn_id)

    @cached_property
    def _db_hooks(self) -> dict[str, SqlDataHook]:
        return {}

    def get_db_hook(self, conn_id: str) -> SqlDataHook:
        """The SQL hook of ``conn_id``, one per connection for the whole task (one engine, one pool)."""
        if conn_id not in self._db_hooks:
            self._db_hooks[conn_id] = SqlDataHook(conn_id)
        return self._db_hooks[conn_id]

    @property
    def _audit_conn_id(self) -> str | None:
        return self.audit_conn_id or self.target_conn_id or self.source_conn_id

    @cached_property
    def store(self) -> Store:
        """The audit and escrow tables: in ``audit_conn_id``'s database, by default the target's."""
        conn_id = self._audit_conn_id
        if not conn_id:
            raise PolicyError("no database for the audit table: set audit_conn_id (file-to-file runs need one)")
        return Store(self.get_db_hook(conn_id).get_engine(), self.audit_table, self.audit_schema)

    # --- lineage: OpenLineage facets and asset events ---------------------------------------------
    #: set by ``execute``: ``columns`` ((source column, action) per column) and ``run`` (the use's summary)
    _lineage: dict[str, Any] | None = None

    def source_datasets(self) -> tuple[list[LineageDataset], dict[str, tuple[LineageDataset, str]]]:
        """The datasets the task reads and, for a query, where each of its columns comes from (the OpenLineage
        SQL parser's answer; a query it cannot read gives no input rather than a wrong one)."""
        if self.source_path:
            return [path_dataset(str(self.source_path))], {}
        if not self.source_conn_id:
            return [], {}
        engine = self.get_db_hook(self.source_conn_id).get_engine()
        if self.source_table:
            return [table_dataset(engine, str(self.source_table), self.source_schema)], {}
        try:
            return query_tables(str(self.sql), engine), query_origins(str(self.sql), engine)
        except Exception as exc:  # the parser's own errors; lineage never fails a task
            self.log.warning("lineage: the source query could not be parsed (%s); no input dataset reported",
                             exc.__class__.__name__)
            return [], {}

    def target_datasets(self) -> list[LineageDataset]:
        """The dataset the task writes."""
        if self.target_path:
            return [path_dataset(str(self.target_path))]
        if self.target_conn_id and self.target_table:
            engine = self.get_db_hook(self.target_conn_id).get_engine()
            return [table_dataset(engine, str(self.target_table), self.target_schema)]
        return []

    def get_openlineage_facets_on_start(self) -> Any:
        """OpenLineage, as the task starts: the datasets it reads and writes."""
        inputs, _ = self.source_datasets()
        return operator_lineage(inputs, self.target_datasets())

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage, once the task ended: the datasets, each output column's origin and action (column
        lineage) and the use's counts and audit id (the ``pseudonymise`` run facet); no value, no token."""
        inputs, origins = self.source_datasets()
        lineage = self._lineage or {}
        return operator_lineage(inputs, self.target_datasets(), lineage.get("columns"), origins, lineage.get("run"))

    def _emit_target_asset(self, context: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """Attach the target's asset (its OpenLineage-style URI, known only now that the connection is read)
        to the task's asset alias, so DAGs scheduled on the alias run after this one."""
        aliases = [o for o in self.outlets if isinstance(o, AssetAlias) and o.name.startswith(ALIAS_PREFIX)]
        targets = self.target_datasets()
        if not aliases or not targets or "outlet_events" not in context:
            return
        extra = {"audit_use_id": summary.get("use_id"), "rows_out": summary.get("rows_out")}
        for alias in aliases:
            context["outlet_events"][alias].add(Asset(uri=targets[0].uri), extra=extra)

    # --- the pieces of a run ----------------------------------------------------------------------
    def run_context(self, context: Mapping[str, Any]) -> RunContext:
        """Who and when, for the audit; a signed checkpoint after the use with ``audit_signing_conn_id``."""
        return run_context(context, _checkpoint_after_use(self.audit_signing_conn_id, self.log))

    def plan(self, policy: ColumnPolicy | None, *, use_copy: bool | None = None) -> Transfer:
        """The source opened and the path to the target decided, before the token is read."""
        source_label = f"file:{self.source_path}" if self.source_path else (
            f"{self.source_conn_id}:{self.source_table}" if self.source_table else f"{self.source_conn_id}:query")
        target_label = f"file:{self.target_path}" if self.target_path else f"{self.target_conn_id}:{self.target_table}"
        return plan_transfer(self._source(), self._destination(), policy, use_copy=use_copy,
                             source_label=source_label, target_label=target_label)

    def _source(self) -> QuerySource | Source:
        if self.source_path:
            path = str(self.source_path)
            if is_object_storage(path):
                self._scratch = tempfile.TemporaryDirectory(prefix="pseudonymise-")
                path = ObjectStorageHook(self.storage_conn_id).download(path, self._scratch.name)
            return open_source(path, self.source_format, self.batch_size)
        if not self.source_conn_id or not (self.sql or self.source_table):
            raise PolicyError("give a source: source_conn_id with sql or source_table, or source_path")
        engine = self.get_db_hook(self.source_conn_id).get_engine()
        query = self.sql or table_query(self.source_table, self.source_schema, engine.dialect)  # type: ignore[arg-type]
        label = f"table:{self.source_table}" if self.source_table else "query"
        return QuerySource(engine, query, self.parameters, self.batch_size, label,
                           table=None if self.sql else self.source_table, schema=None if self.sql else self.source_schema)

    def _destination(self) -> Destination | TableDestination:
        if self.target_path:
            path = str(self.target_path)
            if is_object_storage(path):
                return ObjectStorageHook(self.storage_conn_id).destination(path, self.target_format)
            return FileDestination(path, self.target_format)
        if not (self.target_table and self.target_conn_id):
            raise PolicyError("give a target: target_conn_id with target_table, or target_path")
        target = self._table_target()
        # the audit in the target's database (the default): the rows commit with the audit's finished row
        if self._audit_conn_id == self.target_conn_id:
            return TableDestination(target, SharedTransaction(self.store.engine))
        return TableDestination(target, SeparateTransaction(self.get_db_hook(self.target_conn_id).get_engine()))

    def _table_target(self) -> TableTarget:
        # a run without a data interval (triggered with no logical date) renders the defaults empty
        return TableTarget(self.target_table, self.target_schema, self.write_mode, self.partition_column,  # type: ignore[arg-type]
                           self.partition_start if self.partition_start != "" else None,
                           self.partition_end if self.partition_end != "" else None, self.upsert_key,
                           self.create_table)


class PseudonymiseOperator(BaseDataOperator):
    """Pseudonymise chosen columns of a table, query or file into a target table or file.

    :param columns: the column policy: ``{"patient_id": {"action": "pseudonymise", "normalise": ["strip"],
        "domain": ""}, "name": "drop", "birth_year": "keep"}``, or a list of columns to pseudonymise (templated).
        The de-identifying actions ``date_shift`` (``{"action": "date_shift", "subject": "patient_id",
        "max_days": 30}``), ``generalise``, ``mask`` and ``suppress`` work here too (docs/deidentification.md).
    :param unlisted_columns: what happens to source columns the policy does not name: ``error``
        (default, so a new column never leaves unnoticed), ``keep`` or ``drop``.
    :param use_copy: PostgreSQL COPY both ways when source and target are PostgreSQL (default: when
        possible); ``False`` reads with a cursor and writes with ``INSERT``.
    :param risk: a re-identification risk gate over this run's output rows (templated):
        ``{"quasi_identifiers": ["birth_year", "postcode3"], "k": 5, "l": {"column": "diagnosis", "min": 2}}``.
        Computed before the commit; when it falls short the task fails and nothing is committed (see docs/risk.md).
    :param risk_memory_groups: classes the gate counts in memory before spilling to disk (files, SQLite, other
        databases; a PostgreSQL target is grouped in the database).
    :param dry_run: check the token, policy, column types, collisions and risk gate on the first ``sample``
        rows and write nothing but the audited ``dry_run`` use; the XCom result says what a real run would do.
    :param sample: rows a dry run reads (default 1000).

    The token, source, target, write mode and audit parameters are those of :class:`BaseDataOperator`.
    A target table is an outlet through its asset alias (:func:`target_alias`), to which each run attaches the
    table's asset, named as OpenLineage names it (``postgres://host:port/database/schema/table``); a target file
    is an outlet asset of its URI (``file:///path``, ``s3://bucket/key``). OpenLineage events carry the column
    lineage: each output column's source column and the policy's action on it.
    """

    template_fields: Sequence[str] = (*BaseDataOperator.template_fields, "columns", "risk")
    template_fields_renderers: ClassVar[dict[str, str]] = {**BaseDataOperator.template_fields_renderers,
                                                           "columns": "json", "risk": "json"}
    ui_color = "#d8f3dc"
    secondary = False
    token_kind = "pseudonymisation"

    def __init__(self, *, columns: Mapping[str, Any] | Sequence[str], unlisted_columns: str = "error",
                 use_copy: bool | None = None, risk: Mapping[str, Any] | str | None = None,
                 risk_memory_groups: int = MEMORY_GROUPS, dry_run: bool = False, sample: int = DRY_RUN_SAMPLE,
                 **kwargs: Any) -> None:
        if isinstance(risk, Mapping) and "{{" not in str(risk):
            RiskSpec.parse(risk)  # a DAG with bad risk settings fails to load, naming the problem
        target_conn_id, target_table = kwargs.get("target_conn_id"), kwargs.get("target_table")
        target_path = kwargs.get("target_path")
        if "outlets" not in kwargs:
            if target_table and target_conn_id and "{{" not in target_table:
                kwargs["outlets"] = [target_alias(target_conn_id, target_table, kwargs.get("target_schema"))]
            elif target_path and "{{" not in str(target_path):
                kwargs["outlets"] = [Asset(uri=path_dataset(str(target_path)).uri)]
        super().__init__(**kwargs)
        self.columns, self.unlisted_columns, self.use_copy = columns, unlisted_columns, use_copy
        self.risk, self.risk_memory_groups, self.dry_run, self.sample = risk, risk_memory_groups, dry_run, sample

    def policy(self) -> ColumnPolicy:
        if isinstance(self.columns, Mapping):
            data = dict(self.columns) if "columns" in self.columns else {"columns": self.columns}
            data.setdefault("default", self.unlisted_columns)
            return ColumnPolicy.from_mapping(data)
        return ColumnPolicy.from_mapping({"columns": list(self.columns), "default": self.unlisted_columns})

    def column_action(self, action: str) -> str:
        """The action's name in lineage: the policy's own (``pseudonymise``, ``keep`` …)."""
        return action

    def _column_actions(self, policy: ColumnPolicy, columns: Sequence[str]) -> list[tuple[str, str]] | None:
        """(source column, action) for lineage; ``None`` when the policy refuses the columns (the run then
        fails, audited, with the policy's own error)."""
        try:
            return [(rule.column, self.column_action(rule.action)) for rule in policy.plan(columns)]
        except PolicyError:
            return None

    def execute(self, context: Any) -> dict[str, Any]:
        freeze_startup_heap()  # the imported modules out of the cycle collector's scans (core/heap.py)
        policy = self.policy()
        with _failing_the_task():
            risk = RiskSpec.parse(self.risk)
            if self.dry_run:  # read no more than the sample
                self.batch_size = max(1, min(self.batch_size, self.sample))
            transfer = self.plan(policy, use_copy=self.use_copy)
            if self.dry_run:
                return self._dry_run(context, policy, transfer, risk)
            self._lineage = {"columns": self._column_actions(policy, transfer.columns)}
            # read the token, open the audited use, stream the batches through the pseudonymiser into the
            # target, close the use (its finished row in the target's transaction)
            summary = run_pseudonymisation(self.store, self.token_hook, policy, transfer, self.run_context(context),
                                           secondary=self.secondary, progress=_ProgressLog(self.log), risk=risk,
                                           risk_memory_groups=self.risk_memory_groups)
        self._lineage["run"] = summary.as_dict()
        self._emit_target_asset(context, summary.as_dict())
        if summary.risk is not None:
            self.log.info("risk gate passed: %d classes, smallest %s, k=%d", summary.risk["classes"],
                          summary.risk["smallest_class"], summary.risk["k"])
        self.log.info(
            "%s: %d rows in, %d out, %d values pseudonymised, %d NULL, %d escrow rows; audit use %s",
            summary.operation, summary.counts["rows_in"], summary.counts["rows_out"],
            summary.counts["values_pseudonymised"], summary.counts["nulls"], summary.counts["escrow_rows"],
            summary.use_id,
        )
        return summary.as_dict()

    def _dry_run(self, context: Any, policy: ColumnPolicy, transfer: Transfer, risk: RiskSpec | None) -> dict[str, Any]:
        summary = run_dry_run(self.store, self.token_hook, policy, transfer, self.run_context(context),
                              secondary=self.secondary, sample=self.sample, risk=risk,
                              risk_memory_groups=self.risk_memory_groups)
        report = summary.dry_run or {}
        self.log.info("dry run, nothing written: %d rows sampled; target %s (%s); actions %s; audit use %s",
                      report.get("sample_rows", 0), report.get("target"), report.get("would"),
                      ", ".join(f"{c}={a}" for c, a in report.get("actions", {}).items()), summary.use_id)
        if summary.risk is not None and not summary.risk["passed"]:
            self.log.warning("the risk gate would fail on the sample: %d classes (%d rows) below k=%d; the real "
                             "run's gate decides over all its rows", summary.risk["classes_below_k"],
                             summary.risk["rows_below_k"], summary.risk["k"])
        return summary.as_dict()


class SecondaryPseudonymiseOperator(PseudonymiseOperator):
    """Re-pseudonymise a source project's pseudonyms with a ``secondary`` token, for a third party.

    Same parameters as :class:`PseudonymiseOperator`; the columns marked ``pseudonymise`` must hold
    first-level pseudonyms (normalisers and domains do not apply).
    """

    ui_color = "#b7e4c7"
    secondary = True
    token_kind = "secondary"

    def column_action(self, action: str) -> str:
        """``secondary`` for the columns re-pseudonymised; the others as the policy names them."""
        return "secondary" if action == "pseudonymise" else action


class CreateTargetTableOperator(PseudonymiseOperator):
    """Create the target table of mapped :class:`PseudonymiseOperator` tasks before they start, so they start together.

    A run that finds its target missing creates it inside its own transaction, which lasts the whole
    run: mapped tasks writing one new table would each wait for the first. Put this task upstream of
    them with the same source, ``columns`` and target parameters (the source query without its range
    condition): it creates the table with the schema their runs would give it (pseudonymised columns
    ``text``; the others the source's declared types from PostgreSQL to PostgreSQL, else those of the
    query's first rows) and, for the ``replace`` and ``replace_partition`` write modes, the write-range lock table,
    in transactions of their own, plus the audit and escrow tables. It uses no token, reads no row
    from PostgreSQL to PostgreSQL, writes no row and is not an audited use; a table that exists is left as it is (its
    columns are checked). Returns ``{"target": …, "created": bool, "columns": [...]}``. It updates
    no asset (the table is still empty).
    """

    # the partition to replace is each mapped task's own: nothing here renders or needs it
    template_fields: Sequence[str] = tuple(f for f in PseudonymiseOperator.template_fields
                                           if f not in ("partition_start", "partition_end"))
    ui_color = "#e9f5db"

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("create_table") is False:
            raise ValueError("CreateTargetTableOperator creates the target table: create_table=False contradicts it; "
                             "leave create_table out (or drop this task if the table must already exist)")
        kwargs.setdefault("outlets", [])
        kwargs.update(partition_start=None, partition_end=None)
        super().__init__(**kwargs)

    def _table_target(self) -> TableTarget:
        return TableTarget(self.target_table, self.target_schema, "upsert" if self.write_mode == "upsert" else "append",  # type: ignore[arg-type]
                           upsert_key=self.upsert_key, create=True)

    def execute(self, context: Any) -> dict[str, Any]:
        if not self.target_table:
            raise AirflowFailException("CreateTargetTableOperator needs a target table (target_conn_id and target_table)")
        policy = self.policy()
        with _failing_the_task():
            transfer = self.plan(policy, use_copy=self.use_copy)
            created = transfer.create_target(policy)
            self.store.create()
        engine = self.get_db_hook(self.target_conn_id).get_engine()  # type: ignore[arg-type]
        if self.write_mode in ("replace", "replace_partition") and engine.dialect.name == "postgresql":
            ensure_lock_table(engine, self.target_schema)
        columns = [rule.column for rule in policy.plan(transfer.columns) if rule.action != "drop"]
        label = f"{self.target_conn_id}:{self.target_table}"
        self.log.info("target %s %s with columns %s", label, "created" if created else "already exists",
                      ", ".join(columns))
        return {"target": label, "created": created, "columns": columns}


class RiskReportOperator(BaseDataOperator):
    """Describe the re-identification risk of an existing table, query or file: counts, never a value.

    The report (returned to XCom, logged as a table, and recorded in the audit's details as a ``risk_report``
    use, which the plugin's Risk page charts) holds the figures over all quasi-identifiers, the class-size
    distribution, and for every combination of the quasi-identifiers its classes and the rows in classes
    below ``k``. A table or query is grouped by its own database; a file's rows are counted in memory up to
    ``risk_memory_groups`` classes and spilled to disk beyond. No token is used.

    :param quasi_identifiers: the quasi-identifier columns (templated); or give ``risk`` whole.
    :param k: the smallest class size a DPO accepts (default 5).
    :param l: ``{"column": "diagnosis", "min": 2}``: distinct sensitive values each class must show.
    :param risk: the settings as one object, as :class:`PseudonymiseOperator` takes them (templated).
    :param fail_below_k: fail the task when any class is below ``k`` (or ``l``): a gate over a whole table that
        several runs appended to (a run's own gate covers that run's rows only).
    :param max_quasi_identifiers: refuse more quasi-identifiers than this (their combinations double with each).

    Source parameters are those of :class:`BaseDataOperator` (``source_conn_id`` with ``source_table`` or
    ``sql``, or ``source_path``); the audit goes to ``audit_conn_id``, by default the source's database.
    """

    template_fields: Sequence[str] = (*BaseDataOperator.template_fields, "quasi_identifiers", "risk")
    ui_color = "#ffe8cc"

    def __init__(self, *, quasi_identifiers: Sequence[str] | str | None = None, k: int = 5,
                 l: Mapping[str, Any] | None = None, risk: Mapping[str, Any] | None = None,  # noqa: E741
                 fail_below_k: bool = False, risk_memory_groups: int = MEMORY_GROUPS,
                 max_quasi_identifiers: int = MAX_REPORT_QIS, **kwargs: Any) -> None:
        if risk is not None and quasi_identifiers is not None:
            raise ValueError("give either risk or quasi_identifiers (with k and l), not both")
        super().__init__(**kwargs)
        self.quasi_identifiers, self.k, self.l, self.risk = quasi_identifiers, k, l, risk
        self.fail_below_k, self.risk_memory_groups = fail_below_k, risk_memory_groups
        self.max_quasi_identifiers = max_quasi_identifiers

    def spec(self) -> RiskSpec:
        data = self.risk if self.risk is not None else {
            "quasi_identifiers": self.quasi_identifiers, "k": self.k, **({"l": self.l} if self.l else {})}
        spec = RiskSpec.parse(data)
        if spec is None:
            raise PolicyError("RiskReportOperator needs quasi_identifiers (or risk)")
        return spec

    def execute(self, context: Any) -> dict[str, Any]:
        freeze_startup_heap()
        with _failing_the_task():
            spec = self.spec()
            describe, label = self._describer(spec)
            report = run_risk_report(self.store, describe, self.run_context(context), source=label,
                                     columns=spec.columns)
        self.log.info("risk report\n%s", report.text())
        if self.fail_below_k and not report.figures.passed:
            raise AirflowFailException(f"{label}: {report.figures.failure()}")
        return report.as_dict()

    def _describer(self, spec: RiskSpec) -> tuple[Callable[[], RiskReport], str]:
        limit = self.max_quasi_identifiers
        if self.source_path:
            label = f"file:{self.source_path}"
            source = self._source()
            assert not isinstance(source, QuerySource)
            batches = getattr(source, "record_batches", source.batches)
            return (lambda: describe_batches(batches(), source.columns, spec, label, max_quasi_identifiers=limit,
                                             memory_groups=self.risk_memory_groups)), label
        if not self.source_conn_id or not (self.sql or self.source_table):
            raise PolicyError("give a source: source_conn_id with sql or source_table, or source_path")
        label = f"{self.source_conn_id}:{self.source_table or 'query'}"
        engine = self.get_db_hook(self.source_conn_id).get_engine()

        def describe() -> RiskReport:
            with engine.connect() as conn:
                return describe_table(conn, None if self.sql else self.source_table, spec, schema=self.source_schema,
                                      query=self.sql, parameters=self.parameters, label=label,
                                      max_quasi_identifiers=limit)
        return describe, label


class ReversePseudonymsOperator(BaseDataOperator):
    """Reveal the originals of chosen pseudonyms with a ``reverse`` token, into a target the DAG names.

    Four eyes: by default the operator runs only when the run's ``approval_task_id`` (an
    ``ApprovalOperator`` upstream, Airflow's human-in-the-loop) was answered *Approve* by a user other
    than the one who triggered the run, as the Airflow API server recorded both (read with
    :class:`~pseudonymise.hooks.AirflowApprovalHook` through ``airflow_api_conn_id``). Otherwise it fails
    before the token is read, audited ``denied``. The requester, the approver and the reason are in the
    audit row of the reversal. The audit ``started`` row (with the user who triggered the run) commits
    before anything is revealed; originals go only to the target, never to XCom or the log. Reads with a
    cursor and writes with ``INSERT`` on PostgreSQL too.

    :param pseudonym_columns: the columns of the source that hold pseudonyms to reverse (templated).
    :param pseudonymise_conn_id: the ``pseudonymise`` connection holding the reverse token (required).
    :param reason: why the originals are needed, as the requester gave it (templated; required with four eyes).
    :param approval_task_id: the approval task of the same run (default ``approve_reversal``).
    :param airflow_api_conn_id: the Airflow REST API connection the approval is read through.
    :param require_approval: ``False`` waives four eyes for this task; the waiver is logged as a warning and
        recorded in the audit row (``four_eyes.via = "waived"``), for a DPO to see.
    :param require_all: fail, writing nothing, if a pseudonym has no escrow (unknown, or purged).
    :param write_mode: as :class:`BaseDataOperator`, but ``replace`` by default.
    :param batch_size: rows per batch (default 10,000).

    The other source, target and audit parameters are those of :class:`BaseDataOperator`.
    """

    template_fields: Sequence[str] = (*BaseDataOperator.template_fields, "pseudonym_columns", "reason")
    ui_color = "#ffd6a5"

    def __init__(self, *, pseudonym_columns: Sequence[str], pseudonymise_conn_id: str, require_all: bool = False,
                 reason: str | None = None, approval_task_id: str | None = "approve_reversal",
                 airflow_api_conn_id: str = "airflow_api", require_approval: bool = True,
                 write_mode: str = "replace", batch_size: int = 10_000, **kwargs: Any) -> None:
        super().__init__(pseudonymise_conn_id=pseudonymise_conn_id, write_mode=write_mode, batch_size=batch_size,
                         **kwargs)
        if require_approval and not approval_task_id:
            raise ValueError(f"{self.task_id}: four eyes needs approval_task_id (an ApprovalOperator of the same "
                             "DAG); or waive it with require_approval=False, which the audit records")
        self.pseudonym_columns, self.require_all, self.reason = pseudonym_columns, require_all, reason
        self.approval_task_id, self.airflow_api_conn_id = approval_task_id, airflow_api_conn_id
        self.require_approval = require_approval

    def _approval(self, context: Mapping[str, Any], run: RunContext) -> Approval:
        reason = (self.reason or "").strip() or None
        if not self.require_approval:
            self.log.warning("four eyes WAIVED for this reversal (require_approval=False); the audit records it")
            return Approval(requester=run.triggered_by or "", approver="", reason=reason, approved_at=None,
                            via="waived", reference=self.task_id)
        if reason is None:
            raise ApprovalError("a reversal needs a reason (the operator's reason, e.g. from the run's params); "
                                "the approver decides on it and the audit records it")
        assert self.approval_task_id is not None
        ti = context["ti"]
        approval = AirflowApprovalHook(self.airflow_api_conn_id).approval(
            ti.dag_id, ti.run_id, self.approval_task_id, reason=reason)
        # one approval reveals once: a cleared or re-run task instance must ask again, in a new run (an audit
        # that cannot be read fails the task here, as the reversal itself would)
        self.store.create()
        earlier = self.store.audit.succeeded("reverse", dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                                             map_index=ti.map_index if ti.map_index is not None else -1)
        if earlier is not None:
            raise ApprovalError(f"this run's approval was used already, by reversal use {earlier} of this task; one "
                                "approval reveals once: trigger a new run and ask for a new approval")
        # the set read now, before the token is read (a refusal then uses none of a single-use token's uses);
        # the reversal checks the set it reads again, before anything is written
        approval.require_set(pseudonym_set_of(self._source(), list(self.pseudonym_columns)))
        return approval

    def execute(self, context: Any) -> dict[str, Any]:
        freeze_startup_heap()
        with _failing_the_task():
            run = self.run_context(context)
            try:
                approval = self._approval(context, run)
            except ApprovalError as exc:
                use_id = record_refusal(self.store, "reverse", exc, run, columns=list(self.pseudonym_columns),
                                        details={"four_eyes": {"requester": run.triggered_by,
                                                               "reason": (self.reason or "").strip() or None,
                                                               "approval_task_id": self.approval_task_id}})
                self.log.error("reverse refused without four eyes; audit use %s", use_id)
                raise
            transfer = self.plan(None, use_copy=False)
            self._lineage = {"columns": [(c, "reverse" if c in self.pseudonym_columns else "keep")
                                         for c in transfer.columns]}
            summary = run_reversal(self.store, self.token_hook, list(self.pseudonym_columns), transfer, run,
                                   require_all=self.require_all, approval=approval)
        self._lineage["run"] = summary.as_dict()
        self.log.info("reverse: %d rows, %d pseudonyms revealed, %d without escrow; requested by %s, approved by "
                      "%s; audit use %s", summary.counts["rows_in"], summary.counts["values_pseudonymised"],
                      summary.counts["not_found"], approval.requester or "-", approval.approver or "(waived)",
                      summary.use_id)
        return summary.as_dict()


class PseudonymSetDigestOperator(BaseDataOperator):
    """The digest of the pseudonyms a reversal is asked for, to show in its approval (four eyes).

    Reads the source a :class:`ReversePseudonymsOperator` will read (same source parameters) and returns
    ``{"digest", "pseudonyms", "columns", "line"}``: the SHA-256 of the set of its ``(column, pseudonym)``
    pairs (order, repetitions and NULLs left aside), how many, and ``line``, the text an approval names a
    set with (``pseudonym set digest: <sha-256> (N pseudonyms in …)``). Put ``line`` in the
    ``ApprovalOperator``'s body: the reversal then reveals only if it reads that very set (a source changed
    after the approval is refused, nothing written). No token is read and nothing is written; the
    pseudonyms themselves never go to XCom or the log.

    :param pseudonym_columns: the columns that hold the pseudonyms to reverse (templated).

    The source parameters are those of :class:`BaseDataOperator`.
    """

    template_fields: Sequence[str] = (*BaseDataOperator.template_fields, "pseudonym_columns")
    ui_color = "#ffe8cc"
    operator_extra_links = ()

    def __init__(self, *, pseudonym_columns: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pseudonym_columns = pseudonym_columns

    def execute(self, context: Any) -> dict[str, Any]:
        columns = list(self.pseudonym_columns)
        with _failing_the_task():
            digest, count = pseudonym_set_of(self._source(), columns).digest()
        line = f"{SET_DIGEST_LABEL} {digest} ({count} pseudonym{'s' if count != 1 else ''} in {', '.join(columns)})"
        self.log.info("%s", line)
        return {"digest": digest, "pseudonyms": count, "columns": columns, "line": line}


def _escrow_dataset(audit_conn_id: str, schema: str | None) -> LineageDataset:
    """The escrow table (``pseudonymise_escrow``) of the audit database: what purges and erasures delete from."""
    return table_dataset(SqlDataHook(audit_conn_id).get_engine(), "pseudonymise_escrow", schema)


class _LineageFromArguments:
    """OpenLineage for the operators whose datasets follow from their arguments (:meth:`lineage_datasets`), with
    the use's summary as the ``pseudonymise`` run facet once they ran."""

    _lineage_run: dict[str, Any] | None = None

    def lineage_datasets(self) -> tuple[list[LineageDataset], list[LineageDataset], list[tuple[str, str]] | None]:
        """Inputs, outputs and (column, action) pairs, the columns keeping their names."""
        return [], [], None

    def get_openlineage_facets_on_start(self) -> Any:
        inputs, outputs, _ = self.lineage_datasets()
        return operator_lineage(inputs, outputs)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        inputs, outputs, columns = self.lineage_datasets()
        return operator_lineage(inputs, outputs, columns, None, self._lineage_run)


class EscrowPurgeOperator(_LineageFromArguments, BaseOperator):
    """Delete escrow rows past their project's retention end; the purge and its audit row commit together.

    :param audit_conn_id: the database holding the escrow and audit tables.
    :param project: only this project's escrow (default: every project; templated).
    :param audit_table: the audit table (default ``pseudonymise_audit``); ``audit_schema`` its schema.
    """

    template_fields: Sequence[str] = ("project",)
    ui_color = "#ffadad"
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, audit_conn_id: str, project: str | None = None, audit_table: str = "pseudonymise_audit",
                 audit_schema: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id, self.project = audit_conn_id, project
        self.audit_table, self.audit_schema = audit_table, audit_schema

    def lineage_datasets(self) -> tuple[list[LineageDataset], list[LineageDataset], list[tuple[str, str]] | None]:
        """It deletes from the escrow table."""
        return [], [_escrow_dataset(self.audit_conn_id, self.audit_schema)], None

    def execute(self, context: Any) -> dict[str, Any]:
        store = Store(SqlDataHook(self.audit_conn_id).get_engine(), self.audit_table, self.audit_schema)
        summary = run_purge(store, run_context(context), project=self.project)
        self._lineage_run = summary.as_dict()
        self.log.info("purge: %d escrow rows past retention deleted; audit use %s",
                      summary.counts["escrow_rows"], summary.use_id)
        return summary.as_dict()


class SourceRetireOperator(_LineageFromArguments, BaseOperator):
    """Delete the source rows of this run's data interval, or export them first, once the audit proves they
    were loaded: a ``success`` of ``load_task_id`` for the same DAG and data interval whose rows read equal
    the rows of the interval now (mapped load tasks are summed). Otherwise nothing is deleted and the task
    fails naming the reason. One transaction on the source; audited as operation ``retire``.

    :param source_conn_id: the source database (any SQLAlchemy database Airflow connects to).
    :param table: the source table; ``schema`` its schema.
    :param interval_column: the column that places a row in an interval (a date, timestamp or integer);
        the rows retired are those with ``interval_start <= column < interval_end``.
    :param interval_start: default: the run's ``data_interval_start`` (templated); ``interval_end`` likewise.
        They set the source rows retired (when the column's values are not the interval's own, e.g. a
        date column of a timestamp interval); the run still needs a data interval, which finds the load
        in the audit.
    :param load_task_id: the task that loaded the interval (a ``PseudonymiseOperator``; mapped or not).
    :param load_dag_id: its DAG (default: this task's DAG); ``load_operation`` what it did (default
        ``pseudonymise``).
    :param audit_conn_id: the database holding the audit of the load (and this retirement's audit).
    :param export_path: write the rows there before deleting them: a local path or an object storage URL
        (``s3://…``, ``file://…``; ``storage_conn_id`` its connection), ``.csv`` or ``.parquet`` (templated);
        if it cannot be written, nothing is deleted.
    """

    template_fields: Sequence[str] = ("table", "interval_start", "interval_end", "export_path")
    ui_color = "#ffd6a5"
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, source_conn_id: str, table: str, interval_column: str, load_task_id: str,
                 audit_conn_id: str, schema: str | None = None, interval_start: Any = None,
                 interval_end: Any = None, load_dag_id: str | None = None, load_operation: str = "pseudonymise",
                 export_path: str | None = None, export_format: str | None = None,
                 storage_conn_id: str | None = None, audit_table: str = "pseudonymise_audit",
                 audit_schema: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source_conn_id, self.table, self.schema, self.interval_column = source_conn_id, table, schema, interval_column
        self.interval_start, self.interval_end = interval_start, interval_end
        self.load_task_id, self.load_dag_id, self.load_operation = load_task_id, load_dag_id, load_operation
        self.audit_conn_id, self.audit_table, self.audit_schema = audit_conn_id, audit_table, audit_schema
        self.export_path, self.export_format, self.storage_conn_id = export_path, export_format, storage_conn_id

    def lineage_datasets(self) -> tuple[list[LineageDataset], list[LineageDataset], list[tuple[str, str]] | None]:
        """It reads the source table and deletes from it, after writing the export when there is one."""
        source = table_dataset(SqlDataHook(self.source_conn_id).get_engine(), str(self.table), self.schema)
        export = [path_dataset(str(self.export_path))] if self.export_path else []
        return [source], [*export, source], None

    def execute(self, context: Any) -> dict[str, Any]:
        from pseudonymise.core.retire import LoadSelector, SourceInterval, run_retire

        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            raise AirflowFailException("SourceRetireOperator needs a run with a data interval (a scheduled or "
                                       "backfilled run): the interval finds the load it checks in the audit; "
                                       "run it in the load DAG's schedule, or backfill that interval")
        interval = SourceInterval(self.table, self.interval_column,
                                  LoadSelector.instant(self.interval_start if self.interval_start is not None else start),
                                  LoadSelector.instant(self.interval_end if self.interval_end is not None else end),
                                  self.schema)
        load = LoadSelector(self.load_dag_id or context["ti"].dag_id, self.load_task_id,
                            LoadSelector.instant(start), LoadSelector.instant(end), self.load_operation)
        store = Store(SqlDataHook(self.audit_conn_id).get_engine(), self.audit_table, self.audit_schema)
        source = SqlDataHook(self.source_conn_id).get_engine()
        with tempfile.TemporaryDirectory(prefix="pseudonymise-retire-") as scratch:
            export, publish, label = self.export_path, None, None
            if export is not None and is_object_storage(export):
                hook = ObjectStorageHook(self.storage_conn_id)
                local = os.path.join(scratch, "export" + os.path.splitext(export)[1])
                export, label = local, f"file:{self.export_path}"
                publish = lambda path: hook.upload(path, self.export_path)  # noqa: E731
            try:
                summary = run_retire(store, source, interval, load, run_context(context), export_path=export,
                                     export_format=self.export_format, publish=publish, export_label=label,
                                     source_label=f"{self.source_conn_id}:{interval.label}")
            except RetireRefusedError as exc:
                raise AirflowFailException(str(exc)) from exc
        self._lineage_run = summary.as_dict()
        self.log.info("retired %d rows of %s (the load read %d; %d exported); audit use %s",
                      summary.counts["rows_deleted"], interval.label, summary.counts["rows_loaded"],
                      summary.counts["rows_exported"], summary.use_id)
        return summary.as_dict()


class SubjectErasureOperator(_LineageFromArguments, BaseOperator):
    """Erase subjects on request: delete their escrow rows (reversal severed for ever; the other subjects of
    the same escrow batches stay revealable) and, when ``targets`` are named, the rows of those tables that
    carry their pseudonyms, each target in one transaction with its own audited use (counts only).

    The subjects come from ``identifiers_sql`` (their original identifiers, first column; the pseudonyms
    are computed with the project's pseudonymisation token of ``pseudonymise_conn_id`` under the column
    rule the loads used: ``column``, ``normalise``, ``domains``) or from ``pseudonyms_sql`` (their
    pseudonyms in ``project``, no token needed: the only way for randomised projects). Neither the
    identifiers nor the pseudonyms reach a log, XCom or the audit.

    :param audit_conn_id: the database holding the escrow and the audit.
    :param source_conn_id: where the ``*_sql`` query runs.
    :param targets: ``[{"conn_id": ..., "table": ..., "column": ..., "schema": ...}]``.
    """

    template_fields: Sequence[str] = ("identifiers_sql", "pseudonyms_sql", "project")
    template_fields_renderers: ClassVar[dict[str, str]] = {"identifiers_sql": "sql", "pseudonyms_sql": "sql"}
    ui_color = "#ff9aa2"
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, audit_conn_id: str, source_conn_id: str, identifiers_sql: str | None = None,
                 pseudonyms_sql: str | None = None, pseudonymise_conn_id: str | None = None,
                 project: str | None = None, column: str = "id", normalise: Sequence[str] = (),
                 domains: Sequence[str] = ("",), targets: Sequence[Mapping[str, str]] = (),
                 audit_table: str = "pseudonymise_audit", audit_schema: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (identifiers_sql is None) == (pseudonyms_sql is None):
            raise ValueError("SubjectErasureOperator: give identifiers_sql (with pseudonymise_conn_id) or "
                             "pseudonyms_sql (with project), not both")
        if identifiers_sql is not None and not pseudonymise_conn_id:
            raise ValueError("SubjectErasureOperator: identifiers_sql needs pseudonymise_conn_id (the project's "
                             "pseudonymisation token computes the pseudonyms)")
        if pseudonyms_sql is not None and not project:
            raise ValueError("SubjectErasureOperator: pseudonyms_sql needs project")
        for target in targets:
            if not {"conn_id", "table", "column"} <= set(target):
                raise ValueError("SubjectErasureOperator: each target needs conn_id, table and column")
        self.audit_conn_id, self.source_conn_id = audit_conn_id, source_conn_id
        self.identifiers_sql, self.pseudonyms_sql = identifiers_sql, pseudonyms_sql
        self.pseudonymise_conn_id, self.project = pseudonymise_conn_id, project
        self.column, self.normalise, self.domains = column, tuple(normalise), tuple(domains) or ("",)
        self.targets = [dict(t) for t in targets]
        self.audit_table, self.audit_schema = audit_table, audit_schema

    def lineage_datasets(self) -> tuple[list[LineageDataset], list[LineageDataset], list[tuple[str, str]] | None]:
        """It deletes from the escrow table and from the named target tables."""
        targets = [table_dataset(SqlDataHook(t["conn_id"]).get_engine(), t["table"], t.get("schema"))
                   for t in self.targets]
        return [], [_escrow_dataset(self.audit_conn_id, self.audit_schema), *targets], None

    def _values(self, sql: str) -> list[Any]:
        import sqlalchemy as sa

        with SqlDataHook(self.source_conn_id).get_engine().connect() as conn:
            return [row[0] for row in conn.execute(sa.text(sql)) if row[0] is not None]

    def execute(self, context: Any) -> dict[str, Any]:
        from pseudonymise.core.erase import ErasureTarget, erase_by_identifiers, erase_by_pseudonyms
        from pseudonymise.core.policy import ColumnRule

        store = Store(SqlDataHook(self.audit_conn_id).get_engine(), self.audit_table, self.audit_schema)
        targets = [ErasureTarget(SqlDataHook(t["conn_id"]).get_engine(), t["table"], t["column"], t.get("schema"),
                                 label=f"{t['conn_id']}:{t['table']}") for t in self.targets]
        run = run_context(context)
        with _failing_the_task():
            try:
                if self.identifiers_sql is not None:
                    rules = [ColumnRule(self.column, normalise=self.normalise, domain=d) for d in self.domains]
                    summary = erase_by_identifiers(store, PseudonymisationTokenHook(self.pseudonymise_conn_id),
                                                   self._values(self.identifiers_sql), rules, targets, run)
                else:
                    summary = erase_by_pseudonyms(store, str(self.project), self._values(str(self.pseudonyms_sql)),
                                                  targets, run)
            except ErasureError as exc:
                raise AirflowFailException(str(exc)) from exc
        self._lineage_run = summary.as_dict()
        self.log.info("erased %d escrow rows of %d pseudonyms in project %s; audit use %s",
                      summary.counts["escrow_rows"], summary.counts["values_pseudonymised"], summary.project,
                      summary.use_id)
        return summary.as_dict()


class RekeyPseudonymsOperator(_LineageFromArguments, BaseOperator):
    """After a key rotation, re-key a reversible project's pseudonyms in a table, in place.

    Old pseudonyms are opened through escrow with the reverse token and pseudonymised again with
    the new (rotated) pseudonymisation token, in one transaction with the new escrow rows and both
    audited token uses; joins across re-keyed tables survive. Irreversible projects are re-keyed by
    re-running their DAG from the source with the new token (``airflow backfill create
    --reprocess-behavior completed``), secondary shares by re-running the secondary task.

    :param columns: the pseudonym columns to re-key, mapped to their domain (``""`` by default).
    :param reverse_conn_id: connection holding the project's reverse token.
    :param pseudonymise_conn_id: connection holding the new pseudonymisation token.
    :param target_conn_id: the database of the table; it must also hold the audit and escrow tables.
    :param target_table: the table to re-key (templated); ``target_schema`` its schema, and that of the audit.
    :param audit_table: the audit table (default ``pseudonymise_audit``).
    """

    template_fields: Sequence[str] = ("target_table",)
    ui_color = "#caf0f8"
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, columns: Mapping[str, str] | Sequence[str], reverse_conn_id: str, pseudonymise_conn_id: str,
                 target_conn_id: str, target_table: str, target_schema: str | None = None,
                 audit_table: str = "pseudonymise_audit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.columns = dict(columns) if isinstance(columns, Mapping) else {c: "" for c in columns}
        self.reverse_conn_id, self.pseudonymise_conn_id = reverse_conn_id, pseudonymise_conn_id
        self.target_conn_id, self.target_table, self.target_schema = target_conn_id, target_table, target_schema
        self.audit_table = audit_table

    def lineage_datasets(self) -> tuple[list[LineageDataset], list[LineageDataset], list[tuple[str, str]] | None]:
        """The table, re-keyed in place: each pseudonym column with the action ``rekey``."""
        table = table_dataset(SqlDataHook(self.target_conn_id).get_engine(), str(self.target_table), self.target_schema)
        return [table], [table], [(column, "rekey") for column in self.columns]

    def execute(self, context: Any) -> dict[str, Any]:
        store = Store(SqlDataHook(self.target_conn_id).get_engine(), self.audit_table, self.target_schema)
        with _failing_the_task():
            summary = run_rekey(store, PseudonymisationTokenHook(self.reverse_conn_id),
                                PseudonymisationTokenHook(self.pseudonymise_conn_id), self.target_table, self.columns,
                                run_context(context), schema=self.target_schema)
        self._lineage_run = summary.as_dict()
        self.log.info("rekey: %d pseudonyms re-keyed with the new token; audit use %s",
                      summary.counts["values_pseudonymised"], summary.use_id)
        return summary.as_dict()


class TokenExpiryCheckOperator(BaseOperator):
    """Check the tokens of ``pseudonymise`` connections: warn ``warn_days`` before expiry, fail at ``fail_days``.

    Each token is verified (signature, issuer, validity) without being used. The task fails, naming
    the connections to renew, if any token is invalid, expired or within ``fail_days`` of its
    expiry; it logs a warning for those within ``warn_days``. Returns one line per connection
    (id, token id, project, kind, expiry, days left, status): never the token.

    :param conn_ids: the ``pseudonymise`` connections to check.
    """

    template_fields: Sequence[str] = ("conn_ids",)
    ui_color = "#fde68a"

    def __init__(self, *, conn_ids: Sequence[str], warn_days: float = 14, fail_days: float = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_ids, self.warn_days, self.fail_days = conn_ids, warn_days, fail_days

    def execute(self, context: Any) -> list[dict[str, Any]]:
        from pseudonymise.core.tokens import verify_token

        report, failures = [], []
        for conn_id in self.conn_ids:
            hook = PseudonymisationTokenHook(conn_id)
            try:
                token = verify_token(hook.get_token(), hook.get_trusted_keys(), project=hook.project)
            except TokenError as exc:
                report.append({"conn_id": conn_id, "status": "invalid", "reason": type(exc).__name__})
                failures.append(f"{conn_id}: {exc}")
                continue
            days_left = (token.expires_at - time.time()) / 86400
            status = "fail" if days_left < self.fail_days else "warn" if days_left < self.warn_days else "ok"
            report.append({"conn_id": conn_id, "jti": token.jti, "project": token.project, "kind": token.kind,
                           "expires_at": token.expires.isoformat(), "days_left": round(days_left, 2), "status": status})
            if status == "fail":
                failures.append(f"{conn_id}: token {token.jti} of project {token.project!r} expires at "
                                f"{token.expires.isoformat()} ({days_left:.1f} days left)")
            elif status == "warn":
                self.log.warning("%s: token %s of project %r expires in %.1f days (%s); issue a new one",
                                 conn_id, token.jti, token.project, days_left, token.expires.isoformat())
            else:
                self.log.info("%s: token %s valid for %.1f more days", conn_id, token.jti, days_left)
        if failures:
            raise AirflowFailException("renew these tokens: " + "; ".join(failures))
        return report


def key_range_kwargs(sql_conn_id: str, table: str, key_column: str, parts: int,
                     schema: str | None = None) -> list[dict[str, Any]]:
    """Split a table into key ranges for ``PseudonymiseOperator.partial(...).expand_kwargs(...)``.

    Each dict binds ``:lo``/``:hi`` for a source query such as
    ``WHERE id >= :lo AND (:hi IS NULL OR id < :hi)`` and sets the same bounds as the replaced
    partition of the target (``partition_column`` = the key), so each mapped task owns its range
    and re-runs replace exactly it. Call it from a ``@task`` so the ranges follow the data.
    """
    ranges = SqlDataHook(sql_conn_id).key_ranges(table, key_column, parts, schema)
    return [{"parameters": {"lo": r["lo"], "hi": r["hi"]}, "partition_start": r["lo"], "partition_end": r["hi"]}
            for r in ranges]


class AuditCheckpointOperator(BaseOperator):
    """Sign a checkpoint of the audit chain's head and send it to the witnesses (docs/design.md §6.1); schedule it hourly.

    The signing key and the witnesses come from one connection (:class:`~pseudonymise.hooks.AuditSigningHook`):
    its password is the private JWK of ``pseudonymise audit keygen``, or its extras name an ``ed25519``
    Vault Transit key (``transit_key``, ``transit_vault_conn_id``); ``witness_path`` and
    ``witness_vault_path`` name the witnesses. The task fails without retry, naming the checkpoint, when
    the chain contradicts the latest witnessed one (rows cut off or rewritten); it is retried when Vault
    cannot be reached. Returns the checkpoint's audit id, row, row hash, time and key id.

    :param audit_conn_id: the database of the audit table.
    :param audit_signing_conn_id: the audit signing connection (default ``pseudonymise_audit_signing``).
    """

    ui_color = "#e9d8fd"

    def __init__(self, *, audit_conn_id: str, audit_signing_conn_id: str = "pseudonymise_audit_signing",
                 audit_table: str = "pseudonymise_audit", audit_schema: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id, self.audit_signing_conn_id = audit_conn_id, audit_signing_conn_id
        self.audit_table, self.audit_schema = audit_table, audit_schema

    def execute(self, context: Any) -> dict[str, Any] | None:
        from pseudonymise.core.audit import AuditLog
        from pseudonymise.hooks import AuditSigningHook

        audit = AuditLog(SqlDataHook(self.audit_conn_id).get_engine(), self.audit_table, self.audit_schema)
        try:
            checkpointer = AuditSigningHook(self.audit_signing_conn_id).checkpointer(audit)
            if not checkpointer.witnesses:
                self.log.warning("connection %r names no witness (witness_path, witness_vault_path): the checkpoint is "
                                 "kept only in the audit's own database", self.audit_signing_conn_id)
            result = checkpointer.checkpoint()
        except PseudonymiseError as exc:
            raise _task_failure(exc) from exc
        if result is None:
            self.log.info("the audit %s is empty: nothing to checkpoint yet", checkpointer.audit_id)
            return None
        self.log.info("audit checkpoint: %s", result)
        return result.as_dict()
