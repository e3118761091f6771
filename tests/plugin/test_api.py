"""The HTTP API through Airflow's real API server app: every call an audited token use, behind Airflow auth."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import Request

from tests import reference
from tests.plugin.conftest import Api, AuditDb, TokenConnections, crashed_use, secrets_of, task_use

BASE = "/pseudonymise/api/v1"
POLICY = {"patient_id": {"action": "pseudonymise", "normalise": ["strip", "upper"]}, "name": "drop",
          "birth_year": "keep"}
RECORDS = [{"patient_id": "p-0001 ", "name": "Ada", "birth_year": 1960},
           {"patient_id": "P-0002", "name": "Grace", "birth_year": None},
           {"patient_id": None, "name": "Alan", "birth_year": 1954}]


def url(conns: TokenConnections, name: str, action: str = "pseudonymise") -> str:
    return f"{BASE}/connections/{conns[name]}/{action}"


def assert_no_secret(text: str, conns: TokenConnections) -> None:
    for token in conns.tokens.values():
        for secret in secrets_of(token):
            assert secret not in text


def expected_pseudonyms(conns: TokenConnections, values: list[str | None]) -> list[str | None]:
    """docs/design.md §4 written out again (:mod:`tests.reference`) on the values POLICY normalises (strip, upper)."""
    return reference.token_pseudonyms(conns.tokens["pseudonymise"],
                                      [None if v is None else v.strip().upper() for v in values])


# --- pseudonymise -------------------------------------------------------------------------------
def test_pseudonymise_json_records(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                               json={"policy": POLICY, "records": RECORDS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == ["patient_id", "birth_year"]  # name dropped
    assert [r["birth_year"] for r in body["records"]] == [1960, None, 1954]
    assert [r["patient_id"] for r in body["records"]] == expected_pseudonyms(
        token_connections, ["p-0001 ", "P-0002", None])
    assert body["records"][0]["patient_id"] != body["records"][1]["patient_id"]
    assert body["counts"] == {"rows_in": 3, "rows_out": 3, "nulls": 1, "values_pseudonymised": 2, "escrow_rows": 2}
    rows = audit_db.rows()
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "success")]
    finished = rows[1]
    assert finished["use_id"] == body["use_id"] and finished["triggered_by"] == "admin"
    assert finished["source"] == f"api:{token_connections['pseudonymise']}" and finished["target"] == "api:response"
    assert finished["token_jti"] == body["token_jti"] and finished["rows_in"] == 3
    assert finished["token_expires_at"] and finished["retention_until"]
    assert audit_db.store.audit.verify().ok
    assert_no_secret(response.text + json.dumps(rows, default=str), token_connections)
    with audit_db.store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_db.store.escrow.values)).scalar_one() == 2


def test_pseudonymise_csv_in_csv_out(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    body = "patient_id,name,birth_year\np-0001 ,Ada,1960\nP-0002,Grace,\n,Alan,1954\n"
    response = api.client.post(url(token_connections, "pseudonymise"), headers={
        **api.auth("op"), "Content-Type": "text/csv"}, params={"policy": json.dumps(POLICY)}, content=body.encode())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    out = list(csv.reader(io.StringIO(response.text)))
    assert out[0] == ["patient_id", "birth_year"]
    assert [r[0] for r in out[1:]] == [p or "" for p in expected_pseudonyms(token_connections, ["p-0001 ", "P-0002", None])]
    assert [r[1] for r in out[1:]] == ["1960", "", "1954"]
    use_id = response.headers["X-Pseudonymise-Use-Id"]
    assert [(r["use_id"], r["outcome"], r["triggered_by"]) for r in audit_db.rows()] == [
        (use_id, "started", "op"), (use_id, "success", "op")]


def test_integers_and_their_text_give_the_same_pseudonym(api: Api, audit_db: AuditDb,
                                                          token_connections: TokenConnections) -> None:
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"), json={
        "policy": {"id": "pseudonymise"}, "records": [{"id": 123}, {"id": "123"}]})
    assert response.status_code == 200, response.text
    first, second = (r["id"] for r in response.json()["records"])
    assert first == second


def test_secondary_pseudonymisation(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    first = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                            json={"policy": {"patient_id": "pseudonymise"}, "records": [{"patient_id": "P-1"}]})
    pseudonym = first.json()["records"][0]["patient_id"]
    response = api.client.post(url(token_connections, "secondary", "secondary"), headers=api.auth("admin"),
                               json={"policy": {"patient_id": "pseudonymise"}, "records": [{"patient_id": pseudonym}]})
    assert response.status_code == 200, response.text
    second = response.json()["records"][0]["patient_id"]
    assert second == reference.token_pseudonyms(token_connections.tokens["secondary"], [pseudonym])[0] != pseudonym
    assert [r["operation"] for r in audit_db.rows()] == ["pseudonymise"] * 2 + ["secondary"] * 2
    assert response.json()["project"] == "vendor-x"


# --- reverse ------------------------------------------------------------------------------------
def approved(api: Api, conns: TokenConnections, body: dict[str, Any], name: str = "reverse",
             requester: str = "op", approver: str = "op2") -> str:
    """Four eyes: ``requester`` asks for the reversal of ``body``'s pseudonyms, ``approver`` approves; the request id."""
    asked = api.client.post(url(conns, name, "reverse-requests"), headers=api.auth(requester),
                            json={**body, "reason": "a patient asked for their data"})
    assert asked.status_code == 201, asked.text
    request_id = asked.json()["request_id"]
    decided = api.client.post(f"{url(conns, name, 'reverse-requests')}/{request_id}/approve",
                              headers=api.auth(approver), json={"comment": "checked"})
    assert decided.status_code == 200 and decided.json()["status"] == "approved", decided.text
    return request_id


def test_reversal_is_refused_unless_enabled(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    body = {"columns": ["patient_id"], "records": [{"patient_id": "x" * 26}]}
    for action, extra in (("reverse", {"request_id": "0" * 36}), ("reverse-requests", {"reason": "why not"})):
        response = api.client.post(url(token_connections, "reverse", action), headers=api.auth("admin"),
                                   json={**body, **extra})
        assert response.status_code == 403
        assert "api_allow_reversal" in response.json()["detail"]
    assert audit_db.rows() == []


def test_reversal_without_an_approved_request_is_refused(api: Api, audit_db: AuditDb,
                                                         token_connections: TokenConnections,
                                                         allow_reversal: None) -> None:
    response = api.client.post(url(token_connections, "reverse", "reverse"), headers=api.auth("admin"),
                               json={"columns": ["patient_id"], "records": [{"patient_id": "x" * 26}]})
    assert response.status_code == 403 and "second person's approval" in response.json()["detail"]
    assert "reverse-requests" in response.json()["detail"]
    assert audit_db.rows() == []  # refused before the token was read


def test_approved_reversal_reveals_and_audits_requester_and_approver(api: Api, audit_db: AuditDb,
                                                                    token_connections: TokenConnections,
                                                                    allow_reversal: None) -> None:
    made = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                           json={"policy": POLICY, "records": RECORDS}).json()
    records = [{"patient_id": r["patient_id"], "visit": i} for i, r in enumerate(made["records"])]
    records.append({"patient_id": "unknownpseudonym0000000000", "visit": 9})
    body = {"columns": ["patient_id"], "records": records}
    request_id = approved(api, token_connections, body)
    response = api.client.post(url(token_connections, "reverse", "reverse"), headers=api.auth("op"),
                               json={**body, "request_id": request_id})
    assert response.status_code == 200, response.text
    out = response.json()
    # Canonical originals: the normalised text (strip, upper) the pseudonyms were made of.
    assert [r["patient_id"] for r in out["records"]] == ["P-0001", "P-0002", None, None]
    assert [r["visit"] for r in out["records"]] == [0, 1, 2, 9]
    assert out["counts"]["not_found"] == 1 and out["counts"]["values_pseudonymised"] == 2
    rows = [r for r in audit_db.rows() if r["operation"].startswith("reverse")]
    assert [(r["operation"], r["outcome"], r["triggered_by"]) for r in rows] == [
        ("reverse_request", "started", "op"), ("reverse_request", "success", "op"),
        ("reverse_approve", "started", "op2"), ("reverse_approve", "success", "op2"),
        ("reverse", "started", "op"), ("reverse", "success", "op")]
    four_eyes = json.loads(rows[-1]["details"])["four_eyes"]
    assert four_eyes == {"requester": "op", "approver": "op2", "reason": "a patient asked for their data",
                         "approved_at": four_eyes["approved_at"], "via": "api-request", "reference": request_id}
    assert json.loads(rows[1]["details"])["pseudonyms"] == 3  # counts only: no pseudonym in the audit
    assert not any(r["patient_id"] in json.dumps(rows, default=str) for r in records if r["patient_id"])
    listed = api.client.get(f"{BASE}/reverse-requests", headers=api.auth("viewer")).json()
    assert [(r["request_id"], r["state"], r["use_id"]) for r in listed] == [(request_id, "executed", out["use_id"])]
    assert audit_db.store.audit.verify().ok

    again = api.client.post(url(token_connections, "reverse", "reverse"), headers=api.auth("op"),
                            json={**body, "request_id": request_id})
    assert again.status_code == 403 and "executed already" in again.json()["detail"]
    assert audit_db.rows()[-1]["outcome"] == "denied" and audit_db.rows()[-1]["token_jti"] is None


def test_a_failed_reversal_keeps_its_approval(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                              allow_reversal: None) -> None:
    body = {"columns": ["patient_id"], "records": [{"patient_id": "unknownpseudonym0000000000"}]}
    request_id = approved(api, token_connections, body)
    strict = api.client.post(url(token_connections, "reverse", "reverse"), headers=api.auth("op"),
                             json={**body, "request_id": request_id, "require_all": True})
    assert strict.status_code == 422 and "no escrow" in strict.json()["detail"]
    assert audit_db.rows()[-1]["outcome"] == "failed"
    state = api.client.get(f"{BASE}/reverse-requests", headers=api.auth("viewer")).json()[0]["state"]
    assert state == "approved"  # nothing was revealed, so the approval still stands
    lenient = api.client.post(url(token_connections, "reverse", "reverse"), headers=api.auth("op"),
                              json={**body, "request_id": request_id})
    assert lenient.status_code == 200 and lenient.json()["counts"]["not_found"] == 1


def test_reversal_of_csv(api: Api, audit_db: AuditDb, token_connections: TokenConnections, allow_reversal: None) -> None:
    made = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                           json={"policy": {"id": "pseudonymise"}, "records": [{"id": 42}]}).json()
    pseudonym = made["records"][0]["id"]
    csv_body = f"id,note\n{pseudonym},x\n".encode()
    headers = {**api.auth("op"), "Content-Type": "text/csv"}
    asked = api.client.post(url(token_connections, "reverse", "reverse-requests"), headers=headers, content=csv_body,
                            params={"columns": "id", "reason": "complaint 17"})
    assert asked.status_code == 201, asked.text
    request_id = asked.json()["request_id"]
    assert api.client.post(f"{url(token_connections, 'reverse', 'reverse-requests')}/{request_id}/approve",
                           headers=api.auth("admin")).status_code == 200
    response = api.client.post(url(token_connections, "reverse", "reverse"), headers=headers, content=csv_body,
                               params={"columns": "id", "request_id": request_id})
    assert response.status_code == 200, response.text
    assert response.text.splitlines() == ["id,note", "42,x"]


def test_reversal_with_a_pseudonymisation_token_is_denied(api: Api, audit_db: AuditDb,
                                                          token_connections: TokenConnections,
                                                          allow_reversal: None) -> None:
    body = {"columns": ["id"], "records": [{"id": "abc"}]}
    request_id = approved(api, token_connections, body, name="pseudonymise")
    response = api.client.post(url(token_connections, "pseudonymise", "reverse"), headers=api.auth("op"),
                               json={**body, "request_id": request_id})
    assert response.status_code == 422 and "'reverse' token" in response.json()["detail"]
    assert audit_db.outcomes()[-2:] == [("started", None), ("denied", "TokenKindError")]


def test_a_single_use_reverse_token_reveals_once(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                                 allow_reversal: None) -> None:
    """max_uses (v1.1) through the HTTP API: the second reversal with a single-use token is refused (422, the
    reason named), audited 'denied', and reveals nothing, although its request was approved too."""
    made = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                           json={"policy": {"id": "pseudonymise"}, "records": [{"id": 42}]}).json()
    pseudonym = made["records"][0]["id"]
    body = {"columns": ["id"], "records": [{"id": pseudonym}]}
    first_id, second_id = (approved(api, token_connections, body, name="reverse_once") for _ in range(2))
    first = api.client.post(url(token_connections, "reverse_once", "reverse"), headers=api.auth("op"),
                            json={**body, "request_id": first_id})
    assert first.status_code == 200 and first.json()["records"] == [{"id": 42}]
    second = api.client.post(url(token_connections, "reverse_once", "reverse"), headers=api.auth("op"),
                             json={**body, "request_id": second_id})
    assert second.status_code == 422 and "allows 1 use (max_uses)" in second.json()["detail"]
    # the original 42 is not revealed (the token id in the message, a random UUID, may hold the digits "42")
    assert "records" not in second.json() and "42" not in re.sub(r"[0-9a-f-]{36}", "", second.text)
    assert audit_db.outcomes()[-4:] == [("started", None), ("success", None), ("started", None),
                                        ("denied", "TokenUsedUpError")]
    assert_no_secret(second.text + json.dumps(audit_db.rows(), default=str), token_connections)


# --- auth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["pseudonymise", "secondary", "reverse"])
def test_using_a_token_needs_read_access_to_its_connection(api: Api, audit_db: AuditDb,
                                                           token_connections: TokenConnections,
                                                           allow_reversal: None, action: str) -> None:
    path = url(token_connections, "pseudonymise", action)
    body = {"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}
    assert api.client.post(path, json=body).status_code == 401
    assert api.client.post(path, json=body, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403
    viewer = api.client.post(path, json=body, headers=api.auth("viewer"))
    assert viewer.status_code == 403 and viewer.json() == {"detail": "Forbidden"}
    assert audit_db.rows() == []  # refused before any token was touched


@pytest.mark.parametrize("action", ["pseudonymise", "secondary", "reverse"])
@pytest.mark.parametrize("authorization", [None, "Basic b3A6b3A=", "Bearer ", "bearer"])
def test_the_ui_cookie_alone_never_uses_a_token(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                               allow_reversal: None, action: str, authorization: str | None) -> None:
    """A browser adds the cookie to requests other pages make; only an Authorization header it cannot add
    authorises a token use. With the cookie of a user who may use the token, and a valid JSON body."""
    headers = {"Cookie": f"_token={api.tokens['op']}"}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = ({"columns": ["id"], "records": [{"id": "x" * 26}]} if action == "reverse"
            else {"policy": {"id": "pseudonymise"}, "records": [{"id": "P-1"}]})
    response = api.client.post(url(token_connections, "pseudonymise" if action != "reverse" else "reverse", action),
                               json=body, headers=headers)
    assert response.status_code == 403, response.text
    detail = response.json()["detail"]
    assert "'Authorization: Bearer <jwt>'" in detail and "POST /auth/token" in detail and "cookie" in detail
    assert api.tokens["op"] not in response.text
    assert audit_db.rows() == []
    with_bearer = api.client.post(url(token_connections, "pseudonymise" if action != "reverse" else "reverse",
                                      action), json=body, headers={**headers, **api.auth("op")})
    if action == "reverse":  # past the Bearer check, on to four eyes: no approved request
        assert with_bearer.status_code == 403 and "approval" in with_bearer.json()["detail"], with_bearer.text
        return
    assert with_bearer.status_code in (200, 422), with_bearer.text  # the use runs
    assert audit_db.rows()[-1]["triggered_by"] == "op"


def test_every_post_route_needs_the_bearer_header(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                                  allow_reversal: None) -> None:
    """Every state-changing route the plugin serves, including any added later."""
    doc = api.client.get("/pseudonymise/openapi.json", headers=api.auth("viewer")).json()
    routes = [(method, path) for path, ops in doc["paths"].items() for method in ops if method != "get"]
    assert len(routes) >= 3
    for method, path in routes:
        target = "/pseudonymise" + path.replace("{connection_id}", token_connections["pseudonymise"])
        response = api.client.request(method.upper(), target, headers={"Cookie": f"_token={api.tokens['admin']}",
                                                                       "Content-Type": "application/json"},
                                      content=b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}')
        assert response.status_code == 403 and "Authorization: Bearer" in response.json()["detail"], (method, path)
    assert audit_db.rows() == []


def test_the_bearer_must_be_the_credential_that_authenticated_the_user(
        api: Api, audit_db: AuditDb, token_connections: TokenConnections, monkeypatch: pytest.MonkeyPatch) -> None:
    """If Airflow ever preferred the session cookie over the header, the connection permission would be checked
    for the cookie's user: the use is then refused rather than run for one user as another."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import get_user, resolve_user_from_token
    from pseudonymise.plugin.app import app

    async def cookie_first(request: Request) -> Any:  # the annotation is read from this module's globals
        return await resolve_user_from_token(request.cookies.get(COOKIE_NAME_JWT_TOKEN))

    monkeypatch.setitem(app.dependency_overrides, get_user, cookie_first)
    body = {"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}
    mixed = api.client.post(url(token_connections, "pseudonymise"), json=body,
                            headers={**api.auth("op"), "Cookie": f"_token={api.tokens['admin']}"})
    assert mixed.status_code == 403, mixed.text
    assert "other than its 'Authorization: Bearer' JWT" in mixed.json()["detail"]
    assert audit_db.rows() == []
    same = api.client.post(url(token_connections, "pseudonymise"), json=body,
                           headers={**api.auth("op"), "Cookie": f"_token={api.tokens['op']}"})
    assert same.status_code == 200, same.text


def test_reading_the_audit_needs_an_airflow_user(api: Api, audit_db: AuditDb) -> None:
    for path in ("/audit", "/audit/verify", "/tokens"):
        assert api.client.get(BASE + path).status_code == 401
        assert api.client.get(BASE + path, headers={"Authorization": "Bearer x.y.z"}).status_code == 403
        assert api.client.get(BASE + path, headers=api.auth("viewer")).status_code == 200


# --- bad input ----------------------------------------------------------------------------------
def test_unknown_connection_is_404_and_a_denied_use(api: Api, audit_db: AuditDb) -> None:
    response = api.client.post(f"{BASE}/connections/no_such_conn/pseudonymise", headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]})
    assert response.status_code == 404
    assert "no_such_conn" in response.json()["detail"] and "type 'pseudonymise'" in response.json()["detail"]
    assert audit_db.outcomes() == [("started", None), ("denied", "TokenUnavailableError")]
    assert audit_db.rows()[1]["triggered_by"] == "admin"


def test_expired_token_is_refused_clearly_and_audited_denied(api: Api, audit_db: AuditDb,
                                                              token_connections: TokenConnections) -> None:
    response = api.client.post(url(token_connections, "expired"), headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": [{"id": "P-1"}]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "expired at" in detail and "ask the issuer for a new token" in detail
    assert "records" not in response.json()
    assert audit_db.outcomes() == [("started", None), ("denied", "TokenExpiredError")]
    denied = audit_db.rows()[1]
    # what the unverified token claims is kept apart, never in the columns of verified facts
    assert denied["token_jti"] is None and denied["token_expires_at"] is None
    assert json.loads(denied["claimed"])["jti"] and json.loads(denied["claimed"])["kind"] == "pseudonymisation"
    assert_no_secret(response.text + json.dumps(audit_db.rows(), default=str), token_connections)


@pytest.mark.parametrize(("name", "error"), [("untrusted", "UnknownIssuerKeyError"), ("reverse", "TokenKindError"),
                                             ("secondary", "TokenKindError")])
def test_unusable_tokens_are_denied(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                    name: str, error: str) -> None:
    response = api.client.post(url(token_connections, name), headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": [{"id": "P-1"}]})
    assert response.status_code == 422, response.text
    assert audit_db.outcomes() == [("started", None), ("denied", error)]
    assert_no_secret(response.text, token_connections)


def test_a_connection_of_another_type_is_never_read_as_a_token(api: Api, audit_db: AuditDb,
                                                               token_connections: TokenConnections) -> None:
    response = api.client.post(url(token_connections, "database"), headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": [{"id": "P-1"}]})
    assert response.status_code == 422
    assert "of type 'postgres'" in response.json()["detail"]
    rows = audit_db.rows()
    assert [r["outcome"] for r in rows] == ["started", "denied"]
    assert all(r["token_fingerprint"] is None for r in rows)
    assert "db-password-123" not in response.text + json.dumps(rows, default=str)


def test_a_connection_without_a_token(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    response = api.client.post(url(token_connections, "empty"), headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": [{"id": "P-1"}]})
    assert response.status_code == 422 and "holds no token" in response.json()["detail"]
    assert audit_db.outcomes() == [("started", None), ("denied", "TokenUnavailableError")]


def test_too_many_rows(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__API_MAX_ROWS", "3")
    records = [{"id": i} for i in range(4)]
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": records})
    assert response.status_code == 413
    assert "4 records" in response.json()["detail"] and "api_max_rows" in response.json()["detail"]
    csv_body = "id\n" + "".join(f"{i}\n" for i in range(4))
    response = api.client.post(url(token_connections, "pseudonymise"), params={"policy": '{"id": "pseudonymise"}'},
                               headers={**api.auth("admin"), "Content-Type": "text/csv"}, content=csv_body.encode())
    assert response.status_code == 413
    huge = json.dumps({"policy": {"id": "pseudonymise"}, "records": [{"id": "x" * 300_000}]})
    response = api.client.post(url(token_connections, "pseudonymise"), headers={
        **api.auth("admin"), "Content-Type": "application/json"}, content=huge.encode())
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    assert audit_db.rows() == []
    ok = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                         json={"policy": {"id": "pseudonymise"}, "records": records[:3]})
    assert ok.status_code == 200


@pytest.mark.parametrize(("content_type", "body", "status", "message"), [
    ("application/json", b'{"policy": {"id": "pseudonymise"}, "records": [', 400, "not valid JSON"),
    ("application/json", b"[1, 2]", 422, 'exactly "policy" and "records"'),
    ("application/json", b'{"policy": {"id": "pseudonymise"}, "records": [1]}', 422, "record 1 is not a JSON object"),
    ("application/json", b'{"policy": {"id": "pseudonymise"}, "records": []}', 422, "non-empty list"),
    ("application/json", b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}, {"ID": 2}]}', 422,
     "record 2 has other fields than record 1"),
    ("application/json", b'{"policy": "id", "records": [{"id": 1}]}', 422, '"policy" must be a JSON object'),
    ("application/json", b'{"policy": {"id": "scramble"}, "records": [{"id": 1}]}', 422, "scramble"),
    ("text/csv", b'id,name\n1,"unterminated\n', 400, "malformed CSV"),
    ("text/csv", b"id,name\n1,a,b\n", 400, "line 2: 3 fields where the header has 2"),
    ("text/csv", b"id,id\n1,2\n", 400, "duplicate column names"),
    ("text/csv", b"", 400, "empty"),
    ("text/csv", b"id\n\xff\xfe\n", 400, "not valid UTF-8"),
    # Read only as declared: a JSON body under any other type (or none) is not parsed.
    ("text/plain", b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}', 415, "'application/json'"),
    ("", b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}', 415, "Content-Type is not declared"),
    ("application/x-www-form-urlencoded", b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}', 415,
     "declared as 'application/x-www-form-urlencoded'"),
    ("multipart/form-data; boundary=b", b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}', 415,
     "'text/csv' (CSV with a header row)"),
    ("application/json; charset=latin-1", b'{"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]}', 415,
     "must be UTF-8"),
])
def test_malformed_input_is_refused_before_the_token_is_used(api: Api, audit_db: AuditDb,
                                                             token_connections: TokenConnections,
                                                             content_type: str, body: bytes, status: int,
                                                             message: str) -> None:
    response = api.client.post(url(token_connections, "pseudonymise"), params={"policy": '{"id": "pseudonymise"}'},
                               headers={**api.auth("admin"), "Content-Type": content_type}, content=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    if status == 415:
        assert response.headers["accept-post"] == "application/json, text/csv"
    assert audit_db.rows() == []


def test_csv_needs_a_policy(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    response = api.client.post(url(token_connections, "pseudonymise"), content=b"id\n1\n",
                               headers={**api.auth("admin"), "Content-Type": "text/csv"})
    assert response.status_code == 422 and '"policy" query parameter' in response.json()["detail"]


@pytest.mark.parametrize(("records", "policy", "message", "error"), [
    ([{"id": 1.5}], {"id": "pseudonymise"}, "float", "UnsupportedTypeError"),
    ([{"id": 1, "extra": 2}], {"id": "pseudonymise"}, "'extra'", "PolicyError"),
    ([{"id": 1}], {"other": "pseudonymise"}, "'other'", "PolicyError"),
])
def test_data_that_does_not_fit_the_policy_fails_the_use(api: Api, audit_db: AuditDb,
                                                         token_connections: TokenConnections,
                                                         records: list[dict[str, Any]], policy: dict[str, Any],
                                                         message: str, error: str) -> None:
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                               json={"policy": policy, "records": records})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert "1.5" not in response.json()["detail"]  # messages name columns, never values
    assert audit_db.outcomes() == [("started", None), ("failed", error)]


def test_no_audit_database_configured(api: Api, token_connections: TokenConnections,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID", raising=False)
    response = api.client.get(f"{BASE}/audit", headers=api.auth("admin"))
    assert response.status_code == 503
    assert "AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID" in response.json()["detail"]
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                               json={"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]})
    assert response.status_code == 503


@pytest.mark.parametrize(("name", "value"), [("API_MAX_ROWS", "0"), ("EXPIRY_WARNING_DAYS", "soon"),
                                             ("API_ALLOW_REVERSAL", "maybe")])
def test_invalid_configuration_is_named(api: Api, audit_db: AuditDb, monkeypatch: pytest.MonkeyPatch,
                                        name: str, value: str) -> None:
    monkeypatch.setenv(f"AIRFLOW__PSEUDONYMISE__{name}", value)
    response = api.client.get(f"{BASE}/tokens", headers=api.auth("admin"))
    assert response.status_code == 503
    assert name.lower() in response.json()["detail"]


# --- reading the audit --------------------------------------------------------------------------
def _fill(audit_db: AuditDb, conns: TokenConnections) -> dict[str, str]:
    token = conns.tokens["pseudonymise"]
    return {
        "a1": task_use(audit_db.store, token, conns.issuer, dag_id="dag_a", task_id="t1", run_id="r1"),
        "a2": task_use(audit_db.store, token, conns.issuer, dag_id="dag_a", task_id="t2", run_id="r1", map_index=3),
        "b1": task_use(audit_db.store, token, conns.issuer, dag_id="dag_b", task_id="t1", run_id="r2"),
        "crash": crashed_use(audit_db.store, dag_id="dag_b", task_id="t9", run_id="r2"),
    }


def test_audit_rows_newest_first_with_filters(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    uses = _fill(audit_db, token_connections)

    def get(**params: Any) -> list[dict[str, Any]]:
        response = api.client.get(f"{BASE}/audit", params=params, headers=api.auth("viewer"))
        assert response.status_code == 200, response.text
        return response.json()["rows"]

    everything = get()
    assert [r["seq"] for r in everything] == [7, 6, 5, 4, 3, 2, 1]
    # columns and details are the JSON they hold, not JSON strings inside JSON (issue 16)
    stored = {r["seq"]: r for r in audit_db.store.audit.iter_rows()}
    for row in everything:
        assert row["columns"] is None or row["columns"] == json.loads(stored[row["seq"]]["columns"])
        assert row["details"] is None or row["details"] == json.loads(stored[row["seq"]]["details"])
    finished = [r for r in everything if r["outcome"] == "success"]
    assert finished and all(isinstance(r["columns"], list) and isinstance(r["details"], dict) for r in finished)
    assert all(isinstance(v, str) for r in finished for v in r["columns"])
    assert {r["use_id"] for r in get(dag_id="dag_a")} == {uses["a1"], uses["a2"]}
    assert {r["use_id"] for r in get(dag_id="dag_a", task_id="t2", run_id="r1", map_index="3")} == {uses["a2"]}
    assert get(dag_id="dag_a", map_index="4") == []
    assert [r["event"] for r in get(outcome="success")] == ["finished"] * 3
    assert [r["use_id"] for r in get(outcome="incomplete")] == [uses["crash"]]
    assert len(get(outcome="started")) == 4
    assert len(get(limit=2)) == 2 and get(limit=2, offset=6)[0]["seq"] == 1
    assert len(get(project="research-a", operation="pseudonymise")) == 7 and get(project="other") == []
    assert len(get(token_jti=everything[-1]["token_jti"])) == 6
    assert get(since="2999-01-01") == [] and len(get(until="2999-01-01")) == 7
    today = everything[0]["recorded_at"][:10]
    assert len(get(since=today, until=today)) == 7  # a bare "until" date includes that day
    bad = api.client.get(f"{BASE}/audit", params={"since": "yesterday"}, headers=api.auth("viewer"))
    assert bad.status_code == 422 and "since must be a date" in bad.json()["detail"]
    bad = api.client.get(f"{BASE}/audit", params={"outcome": "ok"}, headers=api.auth("viewer"))
    assert bad.status_code == 422 and "outcome must be one of" in bad.json()["detail"]


def test_audit_rows_are_capped_at_api_max_rows(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(audit_db, token_connections)
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__API_MAX_ROWS", "5")
    body = api.client.get(f"{BASE}/audit", params={"limit": 100}, headers=api.auth("viewer")).json()
    assert len(body["rows"]) == 5 and body["limit"] == 5


def test_verify_names_the_first_broken_row(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    _fill(audit_db, token_connections)
    t = audit_db.store.audit.table
    with audit_db.store.engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.seq == 4).values(rows_out=999))
    body = api.client.get(f"{BASE}/audit/verify", headers=api.auth("viewer")).json()
    assert body["ok"] is False and body["broken_at"] == 4 and body["last_seq"] == 3
    assert "edited" in body["reason"]


def test_tokens_with_expiry_and_expired_uses(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    for name in ("pseudonymise", "expiring", "expired"):
        api.client.post(url(token_connections, name), headers=api.auth("admin"),
                        json={"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]})
    tokens = {t["project"] + ":" + t["state"]: t for t in api.client.get(
        f"{BASE}/tokens", headers=api.auth("viewer")).json()}
    assert set(tokens) == {"research-a:valid", "research-a:expiring", "research-a:unknown"}
    assert tokens["research-a:unknown"]["expired_uses"] == 1
    assert tokens["research-a:unknown"]["outcomes"] == {"success": 0, "failed": 0, "denied": 1}
    assert tokens["research-a:expiring"]["expires_at"] is not None
    assert tokens["research-a:valid"]["uses"] == 1 and tokens["research-a:valid"]["outcomes"]["success"] == 1


def test_one_audit_schema_makes_the_table_the_records_and_the_api_model() -> None:
    """The audit's columns are listed once (core/audit.py SCHEMA): the table, a use's record and the API's
    row model all follow it, so a new column cannot be forgotten in one of them."""
    import sqlalchemy as sa
    from pseudonymise.core.audit import FIELDS, SCHEMA, AuditUse, define_audit_tables
    from pseudonymise.plugin.api import AuditRow

    audit, _head = define_audit_tables(sa.MetaData())
    assert [c.name for c in audit.columns] == [*FIELDS, "prev_hash", "row_hash"]
    assert set(AuditUse(operation="pseudonymise").record()) <= set(FIELDS)
    assert list(AuditRow.model_fields) == [*FIELDS, "prev_hash", "row_hash"]
    for column in SCHEMA:
        assert AuditRow.model_fields[column.name].description == column.description


def test_de_identifying_actions_over_json_records(api: Api, audit_db: AuditDb,
                                                  token_connections: TokenConnections) -> None:
    """JSON has no dates: ISO 8601 text is shifted as text; the audit names each action, never a value."""
    policy = {"patient_id": "pseudonymise", "visit_date": {"action": "date_shift", "subject": "patient_id",
                                                           "max_days": 30},
              "birth_year": {"action": "generalise", "width": 5}, "postcode": {"action": "generalise", "prefix": 3},
              "phone": {"action": "mask", "keep_last": 2}, "name": "suppress"}
    records = [{"patient_id": "P1", "visit_date": "2024-02-29", "birth_year": 1942, "postcode": "1011AB",
                "phone": "0612345678", "name": "Ada"},
               {"patient_id": None, "visit_date": "2024-03-01", "birth_year": None, "postcode": None,
                "phone": None, "name": "Grace"}]
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"),
                               json={"policy": policy, "records": records})
    assert response.status_code == 200, response.text
    raw = token_connections.tokens["pseudonymise"]
    days = reference.date_shift_offset(reference.b64url_decode(reference.claims(raw)["key"]), "P1", 30)
    assert response.json()["records"] == [
        {"patient_id": reference.token_pseudonyms(raw, ["P1"])[0], "visit_date": reference.shift("2024-02-29", days),
         "birth_year": "1940-1944", "postcode": "101", "phone": "********78", "name": None},
        {"patient_id": None, "visit_date": None, "birth_year": None, "postcode": None, "phone": None, "name": None}]
    finished = audit_db.rows()[-1]
    assert json.loads(finished["columns"]) == ["patient_id", "visit_date:date_shift", "birth_year:generalise",
                                               "postcode:generalise", "phone:mask", "name:suppress"]


def test_an_unparsable_date_fails_the_use_naming_column_and_row(api: Api, audit_db: AuditDb,
                                                               token_connections: TokenConnections) -> None:
    policy = {"id": "keep", "day": {"action": "date_shift", "subject": "id", "max_days": 3}}
    response = api.client.post(url(token_connections, "pseudonymise"), headers=api.auth("admin"), json={
        "policy": policy, "records": [{"id": 1, "day": "2024-01-01"}, {"id": 2, "day": "next tuesday"}]})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "column 'day', row 2" in detail and "tuesday" not in detail
    assert audit_db.outcomes() == [("started", None), ("failed", "DeidentifyError")]
