"""Airflow operators: pseudonymise, secondary-pseudonymise, reverse and purge, each one audited use.

Every task follows the same flow: read the token (masked at once), commit the audit ``started``
row, verify the token, stream the source in batches through the pseudonymiser, write the
target and escrow, and commit the audit ``finished`` row in the same transaction as the data
when the audit lives in the target's database (the default). The XCom result is a summary of
counts and ids, never a value or a secret.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

from airflow.sdk import Asset, BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from pseudonymise.core.audit import AuditUse
from pseudonymise.core.errors import PolicyError, PseudonymiseError, ServiceUnavailableError, TokenError
from pseudonymise.core.files import open_sink, open_source
from pseudonymise.core.pipeline import Sink, Source, Store, run_pseudonymisation, run_purge, run_rekey, run_reversal
from pseudonymise.core.pseudonymiser import ColumnPolicy, Stats
from pseudonymise.core.sql import PostgresCopySource, SqlSource, TableTarget, table_query
from pseudonymise.hooks import ObjectStorageHook, PseudonymisationTokenHook, SqlDataHook, is_object_storage

AUDIT_PAGE = "/pseudonymise/audit"


class AuditTrailLink(BaseOperatorLink):
    """From a task instance to its rows on the plugin's audit page."""

    name = "Pseudonymisation audit"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        query = {"dag_id": ti_key.dag_id, "task_id": ti_key.task_id, "run_id": ti_key.run_id}
        if getattr(ti_key, "map_index", -1) >= 0:
            query["map_index"] = ti_key.map_index
        return f"{AUDIT_PAGE}?{urlencode(query)}"


def audit_context(context: Mapping[str, Any]) -> dict[str, Any]:
    """Who and when, for the audit: DAG, task, run, try, dates and the user who triggered the run."""
    ti, dag_run = context.get("ti"), context.get("dag_run")
    return {
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None),
        "map_index": getattr(ti, "map_index", None),
        "try_number": getattr(ti, "try_number", None),
        "logical_date": context.get("logical_date"),
        "data_interval_start": context.get("data_interval_start"),
        "data_interval_end": context.get("data_interval_end"),
        "triggered_by": getattr(dag_run, "triggering_user_name", None),
    }


def _task_failure(exc: Exception) -> Exception:
    """How a token or policy error fails the task: at once (``AirflowFailException``: retrying cannot help,
    fix the token or the policy), unless a service could not be reached (Vault, Transit): then a plain
    ``AirflowException``, so the task's ``retries`` apply."""
    if isinstance(exc, ServiceUnavailableError):
        return AirflowException(f"{exc} (retryable)")
    return AirflowFailException(str(exc))


class _OwnTransactionSink:
    """A table sink in a database other than the audit's: it commits its own transaction first, so a
    crash can leave data whose audit use shows ``started`` without ``finished``, never the reverse."""

    def __init__(self, target: TableTarget, hook: SqlDataHook, columns: list[str], **kwargs: Any) -> None:
        self._conn = hook.get_engine().connect()
        self._txn = self._conn.begin()
        self._sink = target.sink(self._conn, columns, **kwargs)

    @property
    def takes_copy_blocks(self) -> bool:
        return self._sink.takes_copy_blocks

    def write(self, batch: Any) -> None:
        self._sink.write(batch)

    def commit(self) -> None:
        self._sink.commit()
        self._txn.commit()
        self._conn.close()

    def abort(self) -> None:
        if self._txn.is_active:
            self._txn.rollback()
        self._conn.close()


class _ProgressLog:
    def __init__(self, log: Any, every: float = 10.0) -> None:
        self.log, self.every, self.start, self.last = log, every, time.monotonic(), time.monotonic()

    def __call__(self, stats: Stats) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("progress: %d rows (%.0f rows/s)", stats.rows_in, stats.rows_in / (now - self.start))


class _DataTaskMixin:
    """Source, target and audit plumbing shared by the data-moving operators."""

    log: Any
    storage_conn_id: str | None = None
    pseudonymise_conn_id: str

    def _begin(self, context: Any, operation: str) -> tuple[dict[str, Any], Store, PseudonymisationTokenHook, str, Any]:
        """Audit context, store, and the token (masked as it is read); a token that cannot be read is
        audited as a ``denied`` use and fails the task without retries."""
        ctx = audit_context(context)
        store = self._store()
        token_hook = PseudonymisationTokenHook(self.pseudonymise_conn_id)
        try:
            return ctx, store, token_hook, token_hook.get_token(), token_hook.get_trusted_keys()
        except TokenError as exc:
            _audit_unreadable_token(store, operation, token_hook, ctx, exc)
            raise _task_failure(exc) from exc

    def _store(self) -> Store:
        conn_id = self.audit_conn_id or self.target_conn_id or self.source_conn_id
        if not conn_id:
            raise PolicyError("no database for the audit table: set audit_conn_id (file-to-file runs need one)")
        return Store(SqlDataHook(conn_id).get_engine(), self.audit_table, self.audit_schema)

    def _targets_postgres(self) -> bool:
        return bool(self.target_table and self.target_conn_id
                    and SqlDataHook(self.target_conn_id).get_engine().dialect.name == "postgresql")

    def _open_source(self, pseudonymised: Sequence[str]) -> Source:
        if self.source_path:
            path = str(self.source_path)
            if is_object_storage(path):
                self._scratch = tempfile.TemporaryDirectory(prefix="pseudonymise-")
                path = ObjectStorageHook(self.storage_conn_id).download(path, self._scratch.name)
            return open_source(path, self.source_format, self.batch_size)
        if not self.source_conn_id or not (self.sql or self.source_table):
            raise PolicyError("give a source: source_conn_id with sql or source_table, or source_path")
        engine = SqlDataHook(self.source_conn_id).get_engine()
        query = self.sql or table_query(self.source_table, self.source_schema, engine.dialect)
        label = f"table:{self.source_table}" if self.source_table else "query"
        if engine.dialect.name == "postgresql" and self._targets_postgres() and self.use_copy is not False:
            copy_source = PostgresCopySource(engine, query, self.parameters, self.batch_size, label)
            copy_source.check_types(pseudonymised)
            if copy_source.usable(pseudonymised):
                # the target is written with COPY too: what is not pseudonymised stays COPY text
                copy_source.carry_as_text([c for c in copy_source.columns if c not in pseudonymised])
                return copy_source
            self.log.info("pseudonymised columns have types COPY text cannot carry canonically; using the cursor path")
        source = SqlSource(engine, query, self.parameters, self.batch_size, label)
        source.check_types(pseudonymised)
        return source

    def _sink_factory(self, store: Store, source: Source, pseudonymised: Sequence[str]) -> Any:
        def factory(columns: list[str], conn: Any) -> Sink:
            if self.target_path:
                path = str(self.target_path)
                if is_object_storage(path):
                    self._scratch_out = tempfile.TemporaryDirectory(prefix="pseudonymise-")
                    local = os.path.join(self._scratch_out.name, "target" + os.path.splitext(path)[1])
                    hook = ObjectStorageHook(self.storage_conn_id)
                    return hook.uploading_sink(open_sink(local, columns, self.target_format), local, path)
                return open_sink(path, columns, self.target_format)
            if not (self.target_table and self.target_conn_id):
                raise PolicyError("give a target: target_conn_id with target_table, or target_path")
            target = TableTarget(self.target_table, self.target_schema, self.write_mode, self.partition_column,
                                 self.partition_start, self.partition_end, self.upsert_key, self.create_table)
            options = {"use_copy": isinstance(source, PostgresCopySource) or (False if self.use_copy is False else None),
                       "pseudonymised": pseudonymised, "type_names": getattr(source, "type_names", None)}
            hook = SqlDataHook(self.target_conn_id)
            if hook.get_engine() is store.engine:
                return target.sink(conn, columns, **options)
            return _OwnTransactionSink(target, hook, columns, **options)
        return factory

    def _labels(self) -> tuple[str, str]:
        source = f"file:{self.source_path}" if self.source_path else (
            f"{self.source_conn_id}:{self.source_table}" if self.source_table else f"{self.source_conn_id}:query")
        target = f"file:{self.target_path}" if self.target_path else f"{self.target_conn_id}:{self.target_table}"
        return source, target


_DATA_TEMPLATE_FIELDS = ("sql", "parameters", "source_table", "source_path", "target_table", "target_path",
                         "partition_start", "partition_end")


class PseudonymiseOperator(_DataTaskMixin, BaseOperator):
    """Pseudonymise chosen columns of a table, query or file into a target table or file.

    :param columns: the column policy: ``{"patient_id": {"action": "pseudonymise", "normalise": ["strip"],
        "domain": ""}, "name": "drop", "birth_year": "keep"}``, or a list of columns to pseudonymise.
    :param unlisted_columns: what happens to source columns the policy does not name: ``error``
        (default, so a new column never leaves unnoticed), ``keep`` or ``drop``.
    :param pseudonymise_conn_id: ``pseudonymise`` connection holding the token (default ``pseudonymise_default``).
    :param source_conn_id: SQL connection of the source; with ``sql`` (templated, ``.sql`` files, ``:name``
        bind ``parameters``) or ``source_table``/``source_schema``. Or ``source_path``: a CSV/Parquet file.
    :param target_conn_id: SQL connection of the target table ``target_table``/``target_schema``; or
        ``target_path``: a CSV/Parquet file, written atomically.
    :param write_mode: ``append``; ``replace_partition`` (delete ``partition_column`` in
        ``[partition_start, partition_end)`` then insert; by default the run's data interval dates);
        ``upsert`` on ``upsert_key``; ``replace`` (the whole table). Always one transaction.
    :param batch_size: rows per batch (memory is proportional to it, not to the table).
    :param audit_conn_id: database of the audit and escrow tables; default the target's, so the audit row
        commits with the data.
    :param use_copy: PostgreSQL COPY both ways when source and target are PostgreSQL (default: when possible).
    :param storage_conn_id: connection for ``source_path``/``target_path`` URIs on object storage
        (``s3://``, ``gs://``, ``file://`` …, through Airflow's ObjectStoragePath).
    :param audit_signing_conn_id: an audit signing connection (see :class:`AuditCheckpointOperator`): a signed
        checkpoint of the audit is written after the use; if it fails, the use stands and a warning says why.
    """

    template_fields: Sequence[str] = (*_DATA_TEMPLATE_FIELDS, "columns")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json", "columns": "json"}
    ui_color = "#d8f3dc"
    operator_extra_links = (AuditTrailLink(),)
    secondary = False
    token_kind = "pseudonymisation"

    def __init__(self, *, columns: Mapping[str, Any] | Sequence[str], unlisted_columns: str = "error",
                 pseudonymise_conn_id: str = PseudonymisationTokenHook.default_conn_name,
                 source_conn_id: str | None = None, sql: str | None = None, parameters: Mapping[str, Any] | None = None,
                 source_table: str | None = None, source_schema: str | None = None,
                 source_path: str | None = None, source_format: str | None = None,
                 target_conn_id: str | None = None, target_table: str | None = None, target_schema: str | None = None,
                 target_path: str | None = None, target_format: str | None = None,
                 write_mode: str = "append", partition_column: str | None = None,
                 partition_start: Any = "{{ data_interval_start | ds }}",
                 partition_end: Any = "{{ data_interval_end | ds }}",
                 upsert_key: Sequence[str] | None = None, create_table: bool = True, batch_size: int = 50_000,
                 audit_conn_id: str | None = None, audit_table: str = "pseudonymise_audit",
                 audit_schema: str | None = None, use_copy: bool | None = None,
                 storage_conn_id: str | None = None, audit_signing_conn_id: str | None = None,
                 **kwargs: Any) -> None:
        if target_table and target_conn_id and "outlets" not in kwargs and "{{" not in target_table:
            kwargs["outlets"] = [Asset(name=f"pseudonymise/{target_conn_id}/{target_schema or 'default'}/{target_table}")]
        super().__init__(**kwargs)
        self.columns, self.unlisted_columns = columns, unlisted_columns
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
        self.use_copy, self.storage_conn_id = use_copy, storage_conn_id
        self.audit_signing_conn_id = audit_signing_conn_id

    def policy(self) -> ColumnPolicy:
        if isinstance(self.columns, Mapping):
            data = dict(self.columns) if "columns" in self.columns else {"columns": self.columns}
            data.setdefault("default", self.unlisted_columns)
            return ColumnPolicy.from_mapping(data)
        return ColumnPolicy.from_mapping({"columns": list(self.columns), "default": self.unlisted_columns})

    def execute(self, context: Any) -> dict[str, Any]:
        operation = "secondary" if self.secondary else "pseudonymise"
        ctx, store, token_hook, raw, keys = self._begin(context, operation)
        policy = self.policy()
        source_label, target_label = self._labels()
        try:
            source = self._open_source(policy.pseudonymised_columns)
            summary = run_pseudonymisation(
                store, raw, keys, policy, source, self._sink_factory(store, source, policy.pseudonymised_columns),
                secondary=self.secondary, project=token_hook.project, source_label=source_label,
                target_label=target_label, context=ctx, progress=_ProgressLog(self.log),
                transit=token_hook.get_transit, on_finished=_checkpoint_after_use(self),
            )
        except (TokenError, PolicyError) as exc:
            raise _task_failure(exc) from exc
        self.log.info(
            "%s: %d rows in, %d out, %d values pseudonymised, %d NULL, %d escrow rows; audit use %s",
            summary.operation, summary.counts["rows_in"], summary.counts["rows_out"],
            summary.counts["values_pseudonymised"], summary.counts["nulls"], summary.counts["escrow_rows"],
            summary.use_id,
        )
        return summary.as_dict()


class SecondaryPseudonymiseOperator(PseudonymiseOperator):
    """Re-pseudonymise a source project's pseudonyms with a ``secondary`` token, for a third party.

    Same parameters as :class:`PseudonymiseOperator`; the columns marked ``pseudonymise`` must hold
    first-level pseudonyms (normalisers and domains do not apply).
    """

    ui_color = "#b7e4c7"
    secondary = True
    token_kind = "secondary"


class ReversePseudonymsOperator(_DataTaskMixin, BaseOperator):
    """Reveal the originals of chosen pseudonyms with a ``reverse`` token, into a target the DAG names.

    The audit ``started`` row (with the user who triggered the run) commits before anything is
    revealed; originals go only to the target, never to XCom or the log.

    :param pseudonym_columns: the columns of the source that hold pseudonyms to reverse.
    :param require_all: fail, writing nothing, if a pseudonym has no escrow (unknown, or purged).
    Other parameters as :class:`PseudonymiseOperator` (source, target, write mode, audit, audit signing).
    """

    template_fields: Sequence[str] = (*_DATA_TEMPLATE_FIELDS, "pseudonym_columns")
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"sql": "sql", "parameters": "json"}
    ui_color = "#ffd6a5"
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, pseudonym_columns: Sequence[str], pseudonymise_conn_id: str,
                 source_conn_id: str | None = None, sql: str | None = None, parameters: Mapping[str, Any] | None = None,
                 source_table: str | None = None, source_schema: str | None = None,
                 source_path: str | None = None, source_format: str | None = None,
                 target_conn_id: str | None = None, target_table: str | None = None, target_schema: str | None = None,
                 target_path: str | None = None, target_format: str | None = None, write_mode: str = "replace",
                 require_all: bool = False, batch_size: int = 10_000, audit_conn_id: str | None = None,
                 audit_table: str = "pseudonymise_audit", audit_schema: str | None = None,
                 storage_conn_id: str | None = None, audit_signing_conn_id: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pseudonym_columns, self.pseudonymise_conn_id = pseudonym_columns, pseudonymise_conn_id
        self.audit_signing_conn_id = audit_signing_conn_id
        self.source_conn_id, self.sql, self.parameters = source_conn_id, sql, parameters
        self.source_table, self.source_schema = source_table, source_schema
        self.source_path, self.source_format = source_path, source_format
        self.target_conn_id, self.target_table, self.target_schema = target_conn_id, target_table, target_schema
        self.target_path, self.target_format = target_path, target_format
        self.write_mode, self.require_all, self.batch_size = write_mode, require_all, batch_size
        self.partition_column = self.partition_start = self.partition_end = self.upsert_key = None
        self.create_table, self.use_copy, self.storage_conn_id = True, False, storage_conn_id
        self.audit_conn_id, self.audit_table, self.audit_schema = audit_conn_id, audit_table, audit_schema

    def execute(self, context: Any) -> dict[str, Any]:
        ctx, store, token_hook, raw, keys = self._begin(context, "reverse")
        source_label, target_label = self._labels()
        try:
            source = self._open_source([])
            summary = run_reversal(
                store, raw, keys, list(self.pseudonym_columns), source, self._sink_factory(store, source, []),
                project=token_hook.project, triggered_by=ctx.get("triggered_by"), source_label=source_label,
                target_label=target_label, context=ctx, require_all=self.require_all,
                on_finished=_checkpoint_after_use(self),
            )
        except (TokenError, PolicyError) as exc:
            raise _task_failure(exc) from exc
        self.log.info("reverse: %d rows, %d pseudonyms revealed, %d without escrow; audit use %s",
                      summary.counts["rows_in"], summary.counts["values_pseudonymised"],
                      summary.counts["not_found"], summary.use_id)
        return summary.as_dict()


class EscrowPurgeOperator(BaseOperator):
    """Delete escrow rows past their project's retention end; the purge and its audit row commit together.

    :param audit_conn_id: the database holding the escrow and audit tables.
    :param project: only this project's escrow (default: every project).
    """

    template_fields: Sequence[str] = ("project",)
    ui_color = "#ffadad"
    operator_extra_links = (AuditTrailLink(),)

    def __init__(self, *, audit_conn_id: str, project: str | None = None, audit_table: str = "pseudonymise_audit",
                 audit_schema: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id, self.project = audit_conn_id, project
        self.audit_table, self.audit_schema = audit_table, audit_schema

    def execute(self, context: Any) -> dict[str, Any]:
        store = Store(SqlDataHook(self.audit_conn_id).get_engine(), self.audit_table, self.audit_schema)
        summary = run_purge(store, project=self.project, context=audit_context(context))
        self.log.info("purge: %d escrow rows past retention deleted; audit use %s",
                      summary.counts["escrow_rows"], summary.use_id)
        return summary.as_dict()


class RekeyPseudonymsOperator(BaseOperator):
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

    def execute(self, context: Any) -> dict[str, Any]:
        store = Store(SqlDataHook(self.target_conn_id).get_engine(), self.audit_table, self.target_schema)
        reverse_hook = PseudonymisationTokenHook(self.reverse_conn_id)
        new_hook = PseudonymisationTokenHook(self.pseudonymise_conn_id)
        ctx = audit_context(context)
        try:
            reverse_raw, new_raw = reverse_hook.get_token(), new_hook.get_token()
            summary = run_rekey(store, reverse_raw, new_raw, new_hook.get_trusted_keys(), self.target_table,
                                self.columns, schema=self.target_schema, project=new_hook.project, context=ctx)
        except (TokenError, PolicyError) as exc:
            raise _task_failure(exc) from exc
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


def _audit_unreadable_token(store: Store, operation: str, hook: PseudonymisationTokenHook,
                            ctx: Mapping[str, Any], exc: PseudonymiseError) -> None:
    """A token that cannot even be read is still an attempted use: audit it as ``denied``."""
    use = AuditUse(operation=operation, project=hook.project if _safe(hook) else None, context=dict(ctx))
    store.audit.start(use)
    store.audit.finish(use, "denied", error=exc)


def _safe(hook: PseudonymisationTokenHook) -> bool:
    try:
        return hook.project is not None
    except PseudonymiseError:
        return False


# --- signed audit checkpoints (DESIGN §6.1) ------------------------------------------------------
def _checkpoint_after_use(operator: Any) -> Any:
    """The ``TokenUse`` callback of a data operator with an ``audit_signing_conn_id``: a signed checkpoint
    once the use's ``finished`` row is committed; a failure is a warning in the task log, never a failed use."""
    conn_id = getattr(operator, "audit_signing_conn_id", None)
    if not conn_id:
        return None
    from pseudonymise.core.checkpoint import checkpoint_after_use
    from pseudonymise.hooks import AuditSigningHook

    return checkpoint_after_use(lambda audit: AuditSigningHook(conn_id).checkpointer(audit), operator.log)


class AuditCheckpointOperator(BaseOperator):
    """Sign a checkpoint of the audit chain's head and send it to the witnesses (DESIGN §6.1); schedule it hourly.

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
