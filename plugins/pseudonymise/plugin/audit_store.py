"""The audit store behind the pages and the API, and the audit filters requests carry.

The store is the database of ``[pseudonymise] audit_conn_id`` (through :class:`SqlDataHook`, so any
SQL connection works), with its audit and escrow tables; one :class:`Store` per setting, created
on first use.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, time, timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Query, status

from pseudonymise.core.errors import ConfigurationError, PseudonymiseError
from pseudonymise.core.pipeline import Store
from pseudonymise.hooks import SqlDataHook
from pseudonymise.plugin.config import PluginConfig
from pseudonymise.plugin.trail import USE_OUTCOMES, TrailFilter

_stores: dict[tuple[str, str, str | None], Store] = {}
_lock = threading.Lock()


def plugin_config() -> PluginConfig:
    try:
        return PluginConfig.load()
    except ConfigurationError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc


ConfigDep = Annotated[PluginConfig, Depends(plugin_config)]


def audit_store(cfg: ConfigDep) -> Store:
    """The configured store, its tables created if absent; 503 with the fix when it is not configured."""
    if not cfg.audit_conn_id:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "no audit database is configured: set [pseudonymise] audit_conn_id "
                            "(AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID) to the connection of the audit table")
    key = (cfg.audit_conn_id, cfg.audit_table, cfg.audit_schema)
    with _lock:
        store = _stores.get(key)
    if store is None:
        try:
            store = Store(SqlDataHook(cfg.audit_conn_id).get_engine(), cfg.audit_table, cfg.audit_schema)
            store.create()
        except PseudonymiseError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"the audit database is not available: {exc}") from exc
        with _lock:
            store = _stores.setdefault(key, store)
    return store


StoreDep = Annotated[Store, Depends(audit_store)]


def _instant(name: str, text: str | None, end_of_day: bool = False) -> datetime | None:
    """``YYYY-MM-DD`` or an ISO 8601 date-time (UTC unless it says otherwise); a bare ``until`` date
    includes that whole day."""
    if not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").date()
            value = datetime.combine(day, time.min, UTC)
            return value + timedelta(days=1) if end_of_day else value
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 date-time") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def trail_filter(
    project: Annotated[str | None, Query(description="Project id.")] = None,
    dag_id: Annotated[str | None, Query(description="DAG id.")] = None,
    task_id: Annotated[str | None, Query(description="Task id.")] = None,
    run_id: Annotated[str | None, Query(description="DAG run id.")] = None,
    map_index: Annotated[str | None, Query(description="Map index of a mapped task instance (-1: not mapped).")] = None,
    operation: Annotated[str | None, Query(description="The audited operation: pseudonymise, secondary, reverse, purge, rekey, "
                                                        "erase, retire, revoke, verify, dry_run, risk_report, reverse_request, "
                                                        "reverse_approve or reverse_reject.")] = None,
    outcome: Annotated[str | None, Query(description="success, failed, denied or incomplete (started, never "
                                                     "finished); for rows also started.")] = None,
    since: Annotated[str | None, Query(description="From this instant (UTC unless an offset is given) or date.")] = None,
    until: Annotated[str | None, Query(description="Before this instant, or up to and including this date.")] = None,
    use_id: Annotated[str | None, Query(description="One token use.")] = None,
    token_jti: Annotated[str | None, Query(description="One token (its id).")] = None,
) -> TrailFilter:
    # The Airflow UI leaves the {MAP_INDEX} of the task-instance tab in place for unmapped tasks.
    if map_index == "{MAP_INDEX}":
        map_index = None
    if map_index and not re.fullmatch(r"-?[0-9]{1,9}", map_index):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "map_index must be an integer")
    if outcome and outcome not in (*USE_OUTCOMES, "started"):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"outcome must be one of {', '.join(USE_OUTCOMES)} (or started, for rows)")
    return TrailFilter(
        project=project or None, dag_id=dag_id or None, task_id=task_id or None, run_id=run_id or None,
        map_index=int(map_index) if map_index else None, operation=operation or None, outcome=outcome or None,
        since=_instant("since", since), until=_instant("until", until, end_of_day=True), use_id=use_id or None,
        token_jti=token_jti or None,
    )


TrailFilterDep = Annotated[TrailFilter, Depends(trail_filter)]
