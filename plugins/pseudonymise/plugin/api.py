"""The HTTP API: pseudonymise, re-pseudonymise or reverse a small batch, and read the audit.

Each ``POST`` is one audited token use, run by the same flows as the operators and the CLI
(:func:`run_pseudonymisation`, :func:`run_reversal`) on an in-memory batch, with the store on the
audit connection and the token read by :class:`~pseudonymise.hooks.PseudonymisationTokenHook` from a
connection of type ``pseudonymise`` only. A ``POST`` is accepted only with ``Authorization: Bearer`` (never the UI cookie
alone, see :func:`~pseudonymise.plugin.access.token_user`) and a body declared ``application/json``
or ``text/csv`` (415 otherwise); CSV answers have formula cells neutralised. The token never leaves
the connection that holds it: no response, error or log carries a token or a key, and originals
appear only in the answer to an enabled, authorised reversal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, create_model

from pseudonymise.core.approval import ReverseRequests
from pseudonymise.core.audit import SCHEMA
from pseudonymise.core.errors import ApprovalError, AuditError, PseudonymiseError, RequestError, TokenError
from pseudonymise.core.pipeline import RunSummary, Store, run_pseudonymisation, run_reversal
from pseudonymise.core.plan import plan_transfer
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.use import RunContext
from pseudonymise.hooks import PseudonymisationTokenHook
from pseudonymise.plugin.access import DagScopeDep, ReadAudit, TokenUserDep, UseConnection, UseToken, user_name
from pseudonymise.plugin.audit_store import ConfigDep, StoreDep, TrailFilterDep
from pseudonymise.plugin.batch import (
    BODY_FORMATS,
    MemorySink,
    body_format,
    from_csv,
    from_records,
    parse_json,
    policy_from_query,
    to_csv,
    to_records,
)
from pseudonymise.plugin.config import PluginConfig
from pseudonymise.plugin.trail import Trail


def reverse_requests(store: Store, cfg: PluginConfig) -> ReverseRequests:
    """The reversal requests beside the audit of ``store``, expiring after ``reverse_request_ttl_minutes``."""
    return ReverseRequests(store.audit, timedelta(minutes=cfg.reverse_request_ttl_minutes))

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1")
#: Request bodies are read up to this many bytes per allowed record (plus a margin), then refused.
BYTES_PER_RECORD = 16 * 1024


# --- models -------------------------------------------------------------------------------------
class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong and what to do; never a token, key or data value.")


class PseudonymiseRequest(BaseModel):
    """JSON body of a (secondary) pseudonymisation."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "policy": {"patient_id": {"action": "pseudonymise", "normalise": ["strip", "upper"]}, "name": "drop",
                   "birth_year": "keep"},
        "records": [{"patient_id": "P-0001", "name": "Ada", "birth_year": 1960}]}})

    policy: dict[str, Any] = Field(description='Column policy, as in a DAG: {"column": "pseudonymise" | "keep" | '
                                               '"drop" | "suppress" | {"action": ..., "normalise": [...], "domain": ...}'
                                               ' | {"action": "date_shift", "subject": ..., "max_days": N} | '
                                               '{"action": "generalise", "to" | "width" | "prefix": ...} | '
                                               '{"action": "mask", "keep_last" | "keep_first": N, "char": "*"}}, or '
                                               '{"columns": {...}, "default": "error" | "keep" | "drop"}. Dates in '
                                               'JSON records are ISO 8601 text.')
    records: list[dict[str, Any]] = Field(description="The records, each with the same fields; at most "
                                                      "[pseudonymise] api_max_rows of them.")


class ReverseRequest(BaseModel):
    """JSON body of a reversal."""

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(description="The fields that hold pseudonyms to reveal.")
    records: list[dict[str, Any]] = Field(description="The records, each with the same fields.")
    require_all: bool = Field(False, description="Fail, revealing nothing, if a pseudonym has no escrow.")


class BatchResponse(BaseModel):
    """The output records and what the use did; the audit holds the same counts under ``use_id``."""

    use_id: str
    operation: str
    project: str | None
    token_jti: str | None
    token_fingerprint: str | None
    columns: list[str]
    counts: dict[str, int]
    records: list[dict[str, Any]]


#: The audit columns stored as JSON text, given by the API as the JSON they hold (a list, an object).
JSON_COLUMNS: dict[str, Any] = {"columns": list[str], "details": dict[str, Any]}


def _audit_row_model() -> type[BaseModel]:
    """The API's audit row, derived from the audit's one schema (:data:`pseudonymise.core.audit.SCHEMA`)."""
    required = {"seq", "use_id", "event", "recorded_at"}
    types: dict[str, Any] = {"id": int, "instant": datetime, "int": int, "text": str, "long_text": str}
    fields: dict[str, Any] = {}
    for column in SCHEMA:
        kind = JSON_COLUMNS.get(column.name, types[column.kind])
        fields[column.name] = ((kind, Field(description=column.description)) if column.name in required
                               else (kind | None, Field(None, description=column.description)))
    fields["prev_hash"] = (str, Field(description="row_hash of the previous row (64 zeros for the first)."))
    fields["row_hash"] = (str, Field(description="SHA-256 of prev_hash and the row's canonical JSON."))
    return create_model("AuditRow", **fields)


AuditRow = _audit_row_model()


def api_row(row: dict[str, Any]) -> Any:
    """An audit row as the API gives it: ``columns`` and ``details`` as the JSON they hold. ``row_hash``
    covers the stored text, which is ``json.dumps`` of ``columns`` and ``json.dumps(details, sort_keys=True)``."""
    return AuditRow.model_validate({**row, **{name: json.loads(row[name]) for name in JSON_COLUMNS if row.get(name)}})


class AuditRowsResponse(BaseModel):
    rows: list[AuditRow]
    offset: int
    limit: int


class VerifyResponse(BaseModel):
    ok: bool
    rows_checked: int
    last_seq: int = Field(description="The last row of the verified chain.")
    broken_at: int | None = Field(None, description="The first row where the chain breaks.")
    reason: str | None = None
    checked_at: datetime


class TokenResponse(BaseModel):
    jti: str
    project: str | None
    kind: str | None
    issuer: str | None
    expires_at: datetime | None
    retention_until: datetime | None
    state: str = Field(description="valid, expiring (within [pseudonymise] expiry_warning_days), expired or unknown.")
    first_use: datetime
    last_use: datetime
    uses: int
    outcomes: dict[str, int]
    expired_uses: int = Field(description="Uses refused because the token had expired.")
    claimed: bool = Field(False, description="Known only from refused uses: jti, project, kind and issuer are what "
                                             "a token that failed verification claimed, unverified.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "Malformed JSON or CSV."),
        (401, "Not authenticated: send an Airflow JWT (Authorization: Bearer, from POST /auth/token)."),
        (403, "Authenticated, but not allowed; a POST without 'Authorization: Bearer' (the UI cookie alone)."),
        (422, "Invalid request, policy or token (expired, wrong kind or project); token uses are audited."),
        (503, "The plugin's audit database is not configured or not reachable."),
    )
}
_BATCH_ERRORS = {**_ERRORS, **{code: {"model": ErrorResponse, "description": text} for code, text in (
    (404, "No such connection."),
    (413, "More records than [pseudonymise] api_max_rows, or a body too large."),
    (415, "A body not declared as application/json or text/csv (Content-Type), or not UTF-8."),
)}}


def _batch_openapi(json_model: type[BaseModel], csv_help: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema()},
        "text/csv": {"schema": {"type": "string", "description": csv_help}},
    }}}


_BATCH_200: dict[int | str, dict[str, Any]] = {200: {
    "description": "JSON in, JSON out; CSV in, CSV out (the use id in the X-Pseudonymise-Use-Id header).",
    "content": {"text/csv": {"schema": {"type": "string"}}}}}


# --- running a batch ----------------------------------------------------------------------------
async def _read_body(request: Request, cfg: PluginConfig) -> bytes:
    limit = cfg.api_max_rows * BYTES_PER_RECORD + 64 * 1024
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                                f"the request body is larger than {limit} bytes; send at most "
                                f"{cfg.api_max_rows} records ([pseudonymise] api_max_rows)")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_csv(request: Request) -> bool:
    """Whether the body is CSV (else JSON), as its Content-Type declares; 415 for any other type."""
    try:
        return body_format(request.headers.get("content-type")) == "csv"
    except RequestError as exc:
        raise HTTPException(exc.status, str(exc), headers={"Accept-Post": ", ".join(BODY_FORMATS)}) from exc


def _checkpoint_after_use(cfg: PluginConfig) -> Callable[[Any], None] | None:
    """A signed checkpoint after each API token use, when ``[pseudonymise] audit_signing_conn_id`` is set; a
    failure is a warning in the API server's log, never a failed use (the scheduled checkpoint catches up)."""
    if not cfg.audit_signing_conn_id:
        return None
    from pseudonymise.core.checkpoint import checkpoint_after_use
    from pseudonymise.hooks import AuditSigningHook

    conn_id = cfg.audit_signing_conn_id
    return checkpoint_after_use(lambda audit: AuditSigningHook(conn_id).checkpointer(audit), log)


def _tokens(connection_id: str) -> PseudonymisationTokenHook:
    """The token source of a call: the connection it names, read only when of type ``pseudonymise``."""
    return PseudonymisationTokenHook(connection_id, require_conn_type=True)


def _run(tokens: PseudonymisationTokenHook, run: Callable[[], RunSummary]) -> RunSummary:
    try:
        return run()
    except AuditError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    except TokenError as exc:  # audited by the flow as denied
        code = status.HTTP_404_NOT_FOUND if tokens.connection_unreadable else status.HTTP_422_UNPROCESSABLE_CONTENT
        raise HTTPException(code, str(exc)) from exc
    except PseudonymiseError as exc:  # policy, data, escrow: audited by the flow as failed
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc


def _respond(summary: RunSummary, sink: MemorySink, as_csv: bool) -> Any:
    if as_csv:
        return Response(to_csv(sink.columns, sink.rows), media_type="text/csv",
                        headers={"X-Pseudonymise-Use-Id": summary.use_id})
    return BatchResponse(use_id=summary.use_id, operation=summary.operation, project=summary.project,
                         token_jti=summary.token_jti, token_fingerprint=summary.token_fingerprint,
                         columns=sink.columns, counts=summary.counts, records=to_records(sink.columns, sink.rows))


class _Answer:
    """Where a call's output goes: the records of its answer, in memory."""

    def __init__(self) -> None:
        self.sink = MemorySink([])

    def open(self, columns: list[str], conn: Any) -> MemorySink:
        self.sink = MemorySink(columns)
        return self.sink


async def _pseudonymise(request: Request, connection_id: str, user: Any, cfg: PluginConfig, store: Store,
                        policy_text: str | None, secondary: bool) -> Any:
    as_csv = _is_csv(request)
    body = await _read_body(request, cfg)
    try:
        if as_csv:
            policy_data, batch = policy_from_query(policy_text), from_csv(body, cfg.api_max_rows)
        else:
            document = parse_json(body)
            if not isinstance(document, dict) or set(document) != {"policy", "records"}:
                raise RequestError('the JSON body must be an object with exactly "policy" and "records"', 422)
            if not isinstance(document["policy"], dict):
                raise RequestError('"policy" must be a JSON object', 422)
            policy_data, batch = document["policy"], from_records(document["records"], cfg.api_max_rows)
        policy = ColumnPolicy.from_mapping(policy_data)
    except RequestError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    except PseudonymiseError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    operation = "secondary" if secondary else "pseudonymise"
    who = user_name(user)

    def run() -> Any:
        tokens, answer = _tokens(connection_id), _Answer()
        transfer = plan_transfer(batch, answer, policy, source_label=f"api:{connection_id}", target_label="api:response")
        summary = _run(tokens, lambda: run_pseudonymisation(
            store, tokens, policy, transfer, RunContext(triggered_by=who, on_finished=_checkpoint_after_use(cfg)),
            secondary=secondary))
        log.info("%s through the API by %s: %d records; audit use %s", operation, who, len(batch), summary.use_id)
        return _respond(summary, answer.sink, as_csv)

    return await run_in_threadpool(run)


_CSV_POLICY = ('Column policy as JSON, for a text/csv body (a JSON body carries it in "policy"), '
               'e.g. {"patient_id": "pseudonymise", "name": "drop", "birth_year": "keep"}.')


@router.post("/connections/{connection_id}/pseudonymise", response_model=BatchResponse, tags=["Pseudonymise"],
             summary="Pseudonymise a small batch", dependencies=[UseToken, UseConnection],
             responses={**_BATCH_ERRORS, **_BATCH_200},
             openapi_extra=_batch_openapi(PseudonymiseRequest, "CSV with a header row; an empty field is NULL."))
async def pseudonymise(request: Request, connection_id: str, user: TokenUserDep, cfg: ConfigDep, store: StoreDep,
                       policy: Annotated[str | None, Query(description=_CSV_POLICY)] = None) -> Any:
    """Pseudonymise records with the **pseudonymisation** token held in the Airflow connection
    ``connection_id`` (type ``pseudonymise``; you need read access to it). The use is audited with
    your user name as ``triggered_by``; escrow (for reversible projects) goes to the audit database.
    """
    return await _pseudonymise(request, connection_id, user, cfg, store, policy, secondary=False)


@router.post("/connections/{connection_id}/secondary", response_model=BatchResponse, tags=["Pseudonymise"],
             summary="Re-pseudonymise a small batch with a secondary token", dependencies=[UseToken, UseConnection],
             responses={**_BATCH_ERRORS, **_BATCH_200},
             openapi_extra=_batch_openapi(PseudonymiseRequest, "CSV with a header row; an empty field is NULL."))
async def secondary(request: Request, connection_id: str, user: TokenUserDep, cfg: ConfigDep, store: StoreDep,
                    policy: Annotated[str | None, Query(description=_CSV_POLICY)] = None) -> Any:
    """Turn first-level pseudonyms into second-level ones with the **secondary** token held in the
    connection ``connection_id``, for a third party. Audited like any token use."""
    return await _pseudonymise(request, connection_id, user, cfg, store, policy, secondary=True)


class ReverseExecuteRequest(ReverseRequest):
    """JSON body of the execution of an approved reversal request."""

    request_id: str = Field(description="The approved request (POST …/reverse-requests) these pseudonyms were "
                                        "approved in; it executes once, by its requester, with exactly them.")


REVERSAL_OFF = ("reversal through the HTTP API is disabled; an administrator can enable it with [pseudonymise] "
                "api_allow_reversal = True")


async def reverse_body(request: Request, cfg: PluginConfig, columns: str | None, require_all: bool,
                       extra: dict[str, str | None]) -> tuple[list[str], Any, bool, dict[str, Any]]:
    """The columns, records, ``require_all`` and the ``extra`` fields (JSON members, or for a CSV body the
    query values given in ``extra``) of a reversal or reversal request; 4xx for a body that cannot be read."""
    as_csv = _is_csv(request)
    body = await _read_body(request, cfg)
    try:
        if as_csv:
            wanted = [c.strip() for c in (columns or "").split(",") if c.strip()]
            batch, require, extras = from_csv(body, cfg.api_max_rows), require_all, dict(extra)
        else:
            document = parse_json(body)
            allowed = {"columns", "records", "require_all", *extra}
            if not isinstance(document, dict) or not {"columns", "records"} <= set(document) <= allowed:
                raise RequestError('the JSON body must be an object with "columns", "records" and optionally '
                                   + ", ".join(f'"{k}"' for k in sorted(allowed - {"columns", "records"})), 422)
            wanted, require = document["columns"], document.get("require_all", False)
            if not isinstance(wanted, list) or not all(isinstance(c, str) for c in wanted) or not isinstance(require, bool):
                raise RequestError('"columns" must be a list of field names and "require_all" true or false', 422)
            extras = {k: document.get(k) for k in extra}
            if not all(v is None or isinstance(v, str) for v in extras.values()):
                raise RequestError(", ".join(f'"{k}"' for k in extra) + " must be text", 422)
            batch = from_records(document["records"], cfg.api_max_rows)
        if not wanted:
            raise RequestError("name the columns that hold pseudonyms", 422)
    except RequestError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    return wanted, batch, require, extras


def pseudonyms_by_column(columns: list[str], batch: Any) -> dict[str, list[Any]]:
    """The values of ``columns`` in an API batch; 422 naming a column the records do not have."""
    missing = [c for c in columns if c not in batch.columns]
    if missing:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"column(s) {', '.join(map(repr, missing))} are not in the records (they have "
                            f"{', '.join(map(repr, batch.columns))})")
    values: dict[str, list[Any]] = {c: [] for c in columns}
    for part in batch.batches():
        for c in columns:
            values[c].extend(part[c])
    return values


@router.post("/connections/{connection_id}/reverse", response_model=BatchResponse, tags=["Reverse"],
             summary="Execute an approved reversal request (only if enabled)", dependencies=[UseToken, UseConnection],
             responses={**_BATCH_ERRORS, **_BATCH_200},
             openapi_extra=_batch_openapi(ReverseExecuteRequest, "CSV with a header row; name the columns in "
                                                                 "?columns= and the request in ?request_id=."))
async def reverse(request: Request, connection_id: str, user: TokenUserDep, cfg: ConfigDep, store: StoreDep,
                  columns: Annotated[str | None, Query(description="For a text/csv body: the comma-separated "
                                                                   "columns that hold pseudonyms.")] = None,
                  require_all: Annotated[bool, Query(description="For a text/csv body: fail if a pseudonym "
                                                                 "has no escrow.")] = False,
                  request_id: Annotated[str | None, Query(description="For a text/csv body: the approved "
                                                                      "request.")] = None) -> Any:
    """Replace pseudonyms by their originals with the **reverse** token held in the connection
    ``connection_id``, as approved in a reversal request: only its requester, once, with exactly the
    pseudonyms approved, before it expires (four eyes: ``POST …/reverse-requests``, then a second user's
    ``…/approve``). Refused unless ``[pseudonymise] api_allow_reversal`` is true. The audit ``started``
    row, with your user name as ``triggered_by`` and the approval in the ``finished`` row, commits before
    anything is revealed.
    """
    if not cfg.api_allow_reversal:
        raise HTTPException(status.HTTP_403_FORBIDDEN, REVERSAL_OFF)
    wanted, batch, require, extras = await reverse_body(request, cfg, columns, require_all,
                                                        {"request_id": request_id})
    if not extras["request_id"]:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a reversal through the HTTP API needs a second person's "
                            "approval: POST these pseudonyms with a reason to /pseudonymise/api/v1/connections/"
                            f"{connection_id}/reverse-requests, have another user approve it, then send them "
                            'here again with "request_id"')
    who = user_name(user)
    requests = reverse_requests(store, cfg)

    def run() -> Any:
        try:
            requests.create()
            approval = requests.claim(extras["request_id"], connection_id=connection_id, user=who, columns=wanted,
                                      batch=pseudonyms_by_column(wanted, batch))
        except ApprovalError as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc
        except AuditError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
        tokens, answer = _tokens(connection_id), _Answer()
        transfer = plan_transfer(batch, answer, None, source_label=f"api:{connection_id}", target_label="api:response")
        try:
            summary = _run(tokens, lambda: run_reversal(
                store, tokens, wanted, transfer, RunContext(triggered_by=who, on_finished=_checkpoint_after_use(cfg)),
                require_all=require, approval=approval))
        except BaseException:
            requests.release(approval.reference)
            raise
        requests.executed(approval.reference, summary.use_id)
        log.info("reverse through the API by %s, approved by %s: %d records; audit use %s", who, approval.approver,
                 len(batch), summary.use_id)
        return _respond(summary, answer.sink, _is_csv(request))

    return await run_in_threadpool(run)


# --- reading the audit --------------------------------------------------------------------------
@router.get("/audit", response_model=AuditRowsResponse, tags=["Audit"], summary="Audit rows, newest first",
            dependencies=[ReadAudit], responses=_ERRORS)
def audit_rows(flt: TrailFilterDep, store: StoreDep, scope: DagScopeDep, cfg: ConfigDep,
               offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
               limit: Annotated[int, Query(ge=1, description="At most [pseudonymise] api_max_rows.")] = 100) -> Any:
    """The audit rows (``started`` and ``finished``) matching the filters, of the DAGs you may read
    and of uses outside any DAG; the same filters as the audit page. ``columns`` is a JSON list and
    ``details`` a JSON object (``row_hash`` covers them as stored: ``json.dumps(columns)`` and
    ``json.dumps(details, sort_keys=True)``)."""
    rows = Trail(store, scope).rows(flt, offset, min(limit, cfg.api_max_rows))
    return AuditRowsResponse(rows=[api_row(r) for r in rows], offset=offset,
                             limit=min(limit, cfg.api_max_rows))


@router.get("/audit/verify", response_model=VerifyResponse, tags=["Audit"], dependencies=[ReadAudit],
            summary="Verify the audit hash chain", responses=_ERRORS)
def audit_verify(store: StoreDep, scope: DagScopeDep) -> Any:
    """Walk the whole chain and name the first row where it breaks (re-checked at most once a minute)."""
    result, checked = Trail(store, scope).verify()
    return VerifyResponse(ok=result.ok, rows_checked=result.rows_checked, last_seq=result.last_seq,
                          broken_at=result.broken_at, reason=result.reason,
                          checked_at=datetime.fromtimestamp(checked, UTC))


@router.get("/tokens", response_model=list[TokenResponse], tags=["Audit"], dependencies=[ReadAudit],
            summary="Tokens seen in the audit", responses=_ERRORS)
def tokens(store: StoreDep, scope: DagScopeDep, cfg: ConfigDep) -> Any:
    """Every token the audit has seen (by id, never the token), with its expiry and uses."""
    now = datetime.now(UTC)
    return [TokenResponse(jti=t.jti, project=t.project, kind=t.kind, issuer=t.issuer, expires_at=t.expires_at,
                          retention_until=t.retention_until, state=t.state, first_use=t.first_use,
                          last_use=t.last_use, uses=t.uses, outcomes=t.outcomes, expired_uses=t.expired_uses,
                          claimed=t.claimed)
            for t in Trail(store, scope).tokens(now, timedelta(days=cfg.expiry_warning_days))]
