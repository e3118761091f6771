"""Four eyes in the HTTP API, attacked through Airflow's real API server app and its real auth: a requester
cannot approve their own request, a user who may not edit the token's connection cannot approve, nobody but
the requester can execute, only the approved pseudonyms, once, before expiry; a cookie never decides."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from tests.plugin.conftest import Api, AuditDb, TokenConnections, page
from tests.plugin.test_api import BASE, url

pytestmark = pytest.mark.usefixtures("allow_reversal")
BODY = {"columns": ["id"], "records": [{"id": "a" * 26}, {"id": "b" * 26}, {"id": None}]}


def ask(api: Api, conns: TokenConnections, user: str = "op", body: dict[str, Any] = BODY) -> str:
    response = api.client.post(url(conns, "reverse", "reverse-requests"), headers=api.auth(user),
                               json={**body, "reason": "subject access request 2026-118"})
    assert response.status_code == 201, response.text
    made = response.json()
    assert made["status"] == made["state"] == "pending" and made["pseudonyms"] == 2 and made["requester"] == user
    assert "a" * 26 not in response.text  # only a digest and counts
    return str(made["request_id"])


def decide(api: Api, conns: TokenConnections, request_id: str, user: str, verb: str = "approve",
           headers: dict[str, str] | None = None) -> Any:
    return api.client.post(f"{url(conns, 'reverse', 'reverse-requests')}/{request_id}/{verb}",
                           headers=api.auth(user) if headers is None else headers)


def execute(api: Api, conns: TokenConnections, request_id: str, user: str = "op", body: dict[str, Any] = BODY) -> Any:
    return api.client.post(url(conns, "reverse", "reverse"), headers=api.auth(user),
                           json={**body, "request_id": request_id})


def state(api: Api, request_id: str) -> str:
    listed = api.client.get(f"{BASE}/reverse-requests", headers=api.auth("viewer")).json()
    return next(r["state"] for r in listed if r["request_id"] == request_id)


def test_the_requester_cannot_approve_their_own_request(api: Api, audit_db: AuditDb,
                                                        token_connections: TokenConnections) -> None:
    request_id = ask(api, token_connections)
    own = decide(api, token_connections, request_id, "op")
    assert own.status_code == 403 and "approved by its own requester" in own.json()["detail"]
    assert state(api, request_id) == "pending"
    refused = audit_db.rows()[-1]
    assert (refused["operation"], refused["outcome"], refused["triggered_by"]) == ("reverse_approve", "denied", "op")
    assert refused["error_class"] == "ApprovalError"
    assert execute(api, token_connections, request_id).status_code == 403  # still pending
    assert audit_db.store.audit.verify().ok


@pytest.mark.parametrize("user", ["viewer", "user"])
def test_approving_needs_edit_access_to_the_token_connection(api: Api, audit_db: AuditDb,
                                                             token_connections: TokenConnections, user: str) -> None:
    request_id = ask(api, token_connections)
    response = decide(api, token_connections, request_id, user)
    assert response.status_code == 403 and response.json() == {"detail": "Forbidden"}
    assert state(api, request_id) == "pending"
    assert "reverse_approve" not in {r["operation"] for r in audit_db.rows()}


def test_the_ui_cookie_alone_never_approves(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    """Another page of the same site can make the browser send the cookie of an approver; it decides nothing."""
    request_id = ask(api, token_connections)
    response = decide(api, token_connections, request_id, "op2", headers={"Cookie": f"_token={api.tokens['op2']}"})
    assert response.status_code == 403 and "Authorization: Bearer" in response.json()["detail"]
    assert state(api, request_id) == "pending"


def test_only_the_requester_executes_only_the_approved_pseudonyms(api: Api, audit_db: AuditDb,
                                                                  token_connections: TokenConnections) -> None:
    request_id = ask(api, token_connections)
    assert decide(api, token_connections, request_id, "admin").status_code == 200
    other = execute(api, token_connections, request_id, user="op2")
    assert other.status_code == 403 and "only its requester" in other.json()["detail"]
    more = {"columns": ["id"], "records": [*BODY["records"], {"id": "c" * 26}]}
    widened = execute(api, token_connections, request_id, body=more)
    assert widened.status_code == 403 and "not those approved" in widened.json()["detail"]
    other_column = {"columns": ["note"], "records": [{"id": "a" * 26, "note": "a" * 26}]}
    assert execute(api, token_connections, request_id, body=other_column).status_code == 403
    denied = [r for r in audit_db.rows() if r["operation"] == "reverse" and r["event"] == "finished"]
    assert [(r["outcome"], r["triggered_by"], r["token_jti"]) for r in denied] == [
        ("denied", "op2", None), ("denied", "op", None), ("denied", "op", None)]
    # the same pseudonyms in another order (and repeated) are the approved set
    shuffled = {"columns": ["id"], "records": [{"id": "b" * 26}, {"id": "a" * 26}, {"id": "a" * 26}]}
    done = execute(api, token_connections, request_id, body=shuffled)
    assert done.status_code == 200, done.text
    assert state(api, request_id) == "executed"


def test_a_rejected_or_expired_request_never_executes(api: Api, audit_db: AuditDb,
                                                      token_connections: TokenConnections) -> None:
    rejected = ask(api, token_connections)
    assert decide(api, token_connections, rejected, "op2", "reject").json()["status"] == "rejected"
    response = execute(api, token_connections, rejected)
    assert response.status_code == 403 and "rejected by op2" in response.json()["detail"]
    assert decide(api, token_connections, rejected, "admin").status_code == 403  # decided once

    late = ask(api, token_connections)
    assert decide(api, token_connections, late, "op2").status_code == 200
    # Time passes: the approval's deadline (ttl after approval, on the database's clock) is moved into the past.
    table = sa.table("pseudonymise_reverse_request", sa.column("request_id"), sa.column("expires_at"))
    with audit_db.store.engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.request_id == late).values(
            expires_at=sa.text("'2026-01-01 00:00:00.000000'")))
    assert state(api, late) == "expired"
    response = execute(api, token_connections, late)
    assert response.status_code == 403 and "expired" in response.json()["detail"]
    assert audit_db.store.audit.verify().ok


def test_a_request_is_decided_under_its_own_connection(api: Api, audit_db: AuditDb,
                                                       token_connections: TokenConnections) -> None:
    request_id = ask(api, token_connections)
    path = f"{url(token_connections, 'reverse_once', 'reverse-requests')}/{request_id}/approve"
    response = api.client.post(path, headers=api.auth("op2"))
    assert response.status_code == 403 and "not for connection" in response.json()["detail"]
    bogus = decide(api, token_connections, "not-a-uuid", "op2")
    assert bogus.status_code == 403 and "is not a reversal request id" in bogus.json()["detail"]


def test_bad_requests_are_refused_with_the_reason(api: Api, audit_db: AuditDb,
                                                  token_connections: TokenConnections) -> None:
    path = url(token_connections, "reverse", "reverse-requests")
    no_reason = api.client.post(path, headers=api.auth("op"), json=BODY)
    assert no_reason.status_code == 422 and '"reason"' in no_reason.json()["detail"]
    missing = api.client.post(path, headers=api.auth("op"), json={**BODY, "columns": ["nope"], "reason": "x"})
    assert missing.status_code == 422 and "'nope'" in missing.json()["detail"]
    empty = api.client.post(path, headers=api.auth("op"),
                            json={"columns": ["id"], "records": [{"id": None}], "reason": "why"})
    assert empty.status_code == 403 and "names no pseudonyms" in empty.json()["detail"]
    assert audit_db.rows() == []


def test_the_requests_page_lists_who_asked_why_and_the_decision(api: Api, audit_db: AuditDb,
                                                                token_connections: TokenConnections) -> None:
    pending, approved = ask(api, token_connections), ask(api, token_connections)
    decide(api, token_connections, approved, "op2")
    html = page(api, "reverse-requests")
    assert f'data-request-id="{pending}" data-state="pending"' in html
    assert f'data-request-id="{approved}" data-state="approved"' in html
    assert "subject access request 2026-118" in html and "1 request waits" in html
    assert "a" * 26 not in html
    only = page(api, "reverse-requests", state="approved")
    assert approved in only and pending not in only
    rows = [r for r in audit_db.rows() if r["operation"] == "reverse_request" and r["event"] == "finished"]
    assert {json.loads(r["details"])["request_id"] for r in rows} == {pending, approved}
