"""Four eyes in the HTTP API: reversal requests, their approval by a second user, and the page that lists them.

* ``POST /connections/{connection_id}/reverse-requests`` — the requester (who may use the reverse token's
  connection) sends the pseudonyms and a reason; only a SHA-256 of the pseudonym set is stored;
* ``POST /connections/{connection_id}/reverse-requests/{request_id}/approve`` (or ``/reject``) — another
  user who may *edit* that connection (``PUT``: the token's custodians) decides; the requester cannot;
* ``POST /connections/{connection_id}/reverse`` with ``request_id`` — the requester executes it once
  (:func:`pseudonymise.plugin.api.reverse`);
* ``GET /reverse-requests`` and the "Reversal requests" page — who asked what, why, and where it stands.

Every step is a ``POST`` with ``Authorization: Bearer`` only (never the UI cookie, which another page of
the same site could make the browser send), and is audited in the same transaction as its change.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from airflow.api_fastapi.core_api.security import requires_access_connection
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from pseudonymise.core.errors import ApprovalError, AuditError
from pseudonymise.plugin.access import ReadAudit, TokenUserDep, UseConnection, UseToken, user_name
from pseudonymise.plugin.api import (
    _BATCH_ERRORS,
    _ERRORS,
    REVERSAL_OFF,
    ErrorResponse,
    ReverseRequest,
    _batch_openapi,
    pseudonyms_by_column,
    reverse_body,
    reverse_requests,
)
from pseudonymise.plugin.audit_store import ConfigDep, StoreDep

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1")
#: Deciding on a request needs edit access to the connection holding the reverse token.
EditConnection = Depends(requires_access_connection("PUT"))


class ReverseRequestBody(ReverseRequest):
    """JSON body of a reversal request."""

    reason: str = Field(description="Why the originals are needed; the approver decides on it and the audit "
                                    "records it (no personal data, please).")


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str | None = Field(None, description="A note for the audit trail.")


class ReverseRequestResponse(BaseModel):
    """A reversal request: counts and a digest of the pseudonyms, never the pseudonyms themselves."""

    request_id: str
    connection_id: str
    columns: list[str]
    pseudonyms: int = Field(description="How many distinct (column, pseudonym) pairs were asked for.")
    pseudonym_digest: str = Field(description="SHA-256 of the set of (column, pseudonym) pairs.")
    require_all: bool
    requester: str
    reason: str
    status: str = Field(description="pending, approved, rejected, executing or executed.")
    state: str = Field(description="The status, or 'expired' for a pending or approved request past expires_at.")
    created_at: str
    expires_at: str = Field(description="Pending: approve before this; approved: execute before this.")
    decided_by: str | None
    decided_at: str | None
    comment: str | None
    executed_at: str | None
    use_id: str | None = Field(description="The audit use of the executed reversal.")


def _answer(call: Any) -> Any:
    try:
        return call()
    except ApprovalError as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc
    except AuditError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc


@router.post("/connections/{connection_id}/reverse-requests", status_code=status.HTTP_201_CREATED,
             response_model=ReverseRequestResponse, tags=["Reverse"], summary="Ask for a reversal (four eyes)",
             dependencies=[UseToken, UseConnection], responses=_BATCH_ERRORS,
             openapi_extra=_batch_openapi(ReverseRequestBody, "CSV with a header row; name the columns in ?columns= "
                                                              "and give the reason in ?reason=."))
async def submit(request: Request, connection_id: str, user: TokenUserDep, cfg: ConfigDep, store: StoreDep,
                 columns: Annotated[str | None, Query(description="For a text/csv body: the comma-separated "
                                                                  "columns that hold pseudonyms.")] = None,
                 require_all: Annotated[bool, Query(description="For a text/csv body.")] = False,
                 reason: Annotated[str | None, Query(description="For a text/csv body: why.")] = None) -> Any:
    """Ask to reveal the originals of the pseudonyms in ``columns`` with the reverse token of
    ``connection_id``. Nothing is revealed yet and the token is not used: a second user approves, then you
    execute the request once with the same pseudonyms (``POST …/reverse`` with ``request_id``)."""
    if not cfg.api_allow_reversal:
        raise HTTPException(status.HTTP_403_FORBIDDEN, REVERSAL_OFF)
    wanted, batch, require, extras = await reverse_body(request, cfg, columns, require_all, {"reason": reason})
    if not (extras["reason"] or "").strip():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, 'a reversal request needs a "reason" (for a '
                            "text/csv body: ?reason=); the approver decides on it and the audit records it")
    values = pseudonyms_by_column(wanted, batch)
    who = user_name(user)
    requests = reverse_requests(store, cfg)

    def run() -> Any:
        requests.create()
        made = requests.submit(connection_id=connection_id, columns=wanted, batch=values, requester=who,
                               reason=extras["reason"] or "", require_all=require)
        log.info("reversal request %s by %s: %d pseudonyms", made["request_id"], who, made["pseudonyms"])
        return made

    return await run_in_threadpool(_answer, run)


async def _decide(connection_id: str, request_id: str, user: Any, cfg: Any, store: Any, decision: Decision | None,
                  approve: bool) -> Any:
    if not cfg.api_allow_reversal:
        raise HTTPException(status.HTTP_403_FORBIDDEN, REVERSAL_OFF)
    who = user_name(user)
    requests = reverse_requests(store, cfg)

    def run() -> Any:
        requests.create()
        if requests.get(request_id)["connection_id"] != connection_id:
            raise ApprovalError(f"reversal request {request_id} is not for connection {connection_id!r}")
        decided = requests.decide(request_id, user=who, approve=approve, comment=decision.comment if decision else None)
        log.info("reversal request %s %s by %s", request_id, decided["status"], who)
        return decided

    return await run_in_threadpool(_answer, run)


_DECIDE = {"response_model": ReverseRequestResponse, "tags": ["Reverse"],
           "responses": {**_ERRORS, 404: {"model": ErrorResponse, "description": "No such route (a malformed id)."}},
           "dependencies": [UseToken, EditConnection]}


@router.post("/connections/{connection_id}/reverse-requests/{request_id}/approve",
             summary="Approve another user's reversal request", **_DECIDE)
async def approve(connection_id: str, request_id: str, user: TokenUserDep, cfg: ConfigDep, store: StoreDep,
                  decision: Decision | None = None) -> Any:
    """Approve a pending request as a second person: you need edit (``PUT``) access to the connection that
    holds the reverse token, and you may not be its requester. The requester then has
    ``[pseudonymise] reverse_request_ttl_minutes`` to execute it, once."""
    return await _decide(connection_id, request_id, user, cfg, store, decision, approve=True)


@router.post("/connections/{connection_id}/reverse-requests/{request_id}/reject",
             summary="Reject another user's reversal request", **_DECIDE)
async def reject(connection_id: str, request_id: str, user: TokenUserDep, cfg: ConfigDep, store: StoreDep,
                 decision: Decision | None = None) -> Any:
    """Reject a pending request; it can never be executed."""
    return await _decide(connection_id, request_id, user, cfg, store, decision, approve=False)


@router.get("/reverse-requests", response_model=list[ReverseRequestResponse], tags=["Reverse"],
            dependencies=[ReadAudit], responses=_ERRORS, summary="Reversal requests, newest first")
def list_requests(store: StoreDep, cfg: ConfigDep,
                  state: Annotated[str | None, Query(description="pending, approved, rejected, executing, executed "
                                                                 "or expired.")] = None) -> Any:
    """Every reversal request (who, why, how many pseudonyms, where it stands); never a pseudonym."""
    requests = reverse_requests(store, cfg)
    return _answer(lambda: (requests.create(), requests.list(status=state))[1])
