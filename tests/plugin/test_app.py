"""The app as a whole: its OpenAPI document, and schemathesis generating requests from it."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.plugin.conftest import Api, AuditDb, TokenConnections, secrets_of

EXAMPLES_PER_OPERATION = 25


def test_openapi_document_needs_a_user_and_describes_every_route(api: Api, audit_db: AuditDb) -> None:
    assert api.client.get("/pseudonymise/openapi.json").status_code == 401
    response = api.client.get("/pseudonymise/openapi.json", headers=api.auth("viewer"))
    assert response.status_code == 200
    doc = response.json()
    assert doc["servers"] == [{"url": "/pseudonymise"}]
    assert set(doc["paths"]) == {
        "/api/v1/connections/{connection_id}/pseudonymise", "/api/v1/connections/{connection_id}/secondary",
        "/api/v1/connections/{connection_id}/reverse", "/api/v1/audit", "/api/v1/audit/verify", "/api/v1/tokens",
        "/api/v1/connections/{connection_id}/reverse-requests", "/api/v1/reverse-requests",
        "/api/v1/connections/{connection_id}/reverse-requests/{request_id}/approve",
        "/api/v1/connections/{connection_id}/reverse-requests/{request_id}/reject"}
    post = doc["paths"]["/api/v1/connections/{connection_id}/pseudonymise"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "text/csv"}
    assert {"200", "401", "403", "404", "413", "422"} <= set(post["responses"])
    schemes = doc["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"oauth2", "http"}
    assert all(op.get("security") for path in doc["paths"].values() for op in path.values())
    # FastAPI's Swagger page loads its assets from a CDN; the plugin does not serve it.
    assert api.client.get("/pseudonymise/docs", headers=api.auth("viewer")).status_code == 404


@schemathesis.serializer("text/csv")
def _csv_body(_ctx: Any, value: Any) -> bytes:
    """Generated ``text/csv`` bodies are strings: send them as they are."""
    return str(value).encode("utf-8", "surrogatepass")


OPERATIONS = [("POST", "/api/v1/connections/{connection_id}/pseudonymise"),
              ("POST", "/api/v1/connections/{connection_id}/secondary"),
              ("POST", "/api/v1/connections/{connection_id}/reverse"),
              ("POST", "/api/v1/connections/{connection_id}/reverse-requests"),
              ("POST", "/api/v1/connections/{connection_id}/reverse-requests/{request_id}/approve"),
              ("GET", "/api/v1/reverse-requests"),
              ("GET", "/api/v1/audit"), ("GET", "/api/v1/audit/verify"), ("GET", "/api/v1/tokens")]


# Invalid requests only where there is an input to get wrong (the JWT is fixed in every case).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS
    if p not in ("/api/v1/audit/verify", "/api/v1/tokens", "/api/v1/reverse-requests")]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES,
                         ids=[f"{m} {p} {'valid' if g == GenerationMode.POSITIVE else 'invalid'}" for m, p, g in CASES])
def test_generated_requests(api: Api, audit_db: AuditDb, token_connections: TokenConnections, allow_reversal: None,
                            method: str, path: str, mode: GenerationMode) -> None:
    """Requests generated from the served schema (valid and invalid ones), as an admin who may use every
    token: never a server error, always a documented status, content type and body, invalid input
    refused, no token or key in any answer. Not checked: that schema-valid bodies are accepted, because
    the schema cannot say that a policy must name the records' fields, so many are rightly refused (422).
    Half the generated connection ids are replaced by a real token connection, so uses really run."""
    schema = schemathesis.openapi.from_asgi("/pseudonymise/openapi.json", api.client.app, headers=api.auth("admin"))
    operation = schema[path][method]
    secrets = [s for token in token_connections.tokens.values() for s in secrets_of(token)]

    # The JWT is fixed, so an invalid case is invalid in what the API itself reads, not in its login.
    @given(case=operation.as_strategy(generation_mode=mode, headers=api.auth("admin")))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case: Case) -> None:
        if case.path_parameters and hash(repr(case.body)) % 2 == 0:
            case.path_parameters["connection_id"] = token_connections["pseudonymise"]
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code < 500
        assert not any(secret in response.text for secret in secrets)

    check()
