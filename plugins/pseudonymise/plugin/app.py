"""The FastAPI app the plugin mounts in the Airflow API server at ``/pseudonymise``.

Pages at ``/pseudonymise/{audit,tokens,charts}``, the JSON API under ``/pseudonymise/api/v1`` and
its OpenAPI document at ``/pseudonymise/openapi.json``; every route needs an authenticated
Airflow user (see :mod:`pseudonymise.plugin.access`). Errors are JSON for the API and an HTML
page for the pages, with the same status.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.core_api.security import requires_authenticated
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from pseudonymise import __version__
from pseudonymise.plugin import api, pages, reverse_requests

PREFIX = "/pseudonymise"
_SECURITY_HEADERS = {
    # Framed by the Airflow UI (same origin) and by nothing else; no script, no external resource.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'self'",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

DESCRIPTION = """Pseudonymise small batches on request and read the pseudonymisation audit, inside the
Airflow API server.

**Authentication**: an Airflow JWT, `Authorization: Bearer <jwt>` (get one from `POST /auth/token`).
Every `POST` (each uses a token) needs that header: the Airflow UI's session cookie alone is refused
(403), so that no other web page open in your browser can use a token; the cookie is enough for the
`GET` routes. **Bodies**: `Content-Type: application/json` or `text/csv` (UTF-8), anything else is
refused (415). **Authorisation**: using a token needs read access to the Airflow connection that
holds it; reading the audit needs read access to DAG audit logs (rows are limited to the DAGs you may
read). Every call that uses a token is audited with your user name. **CSV answers**: a cell that a
spreadsheet would run as a formula (first character `=`, `+`, `-`, `@`, tab or carriage return; not a
negative number) gets a leading `'`, as does a cell that already starts with `'`; JSON answers are
never altered.
"""


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def _is_api(request: Request) -> bool:
    return request.scope.get("path", "").removeprefix(request.scope.get("root_path", "")).startswith("/api/")


def _login_url(request: Request) -> str | None:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=str(request.url))
    except Exception:
        return None


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if _is_api(request):
        return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=exc.headers)
    login = _login_url(request) if exc.status_code == 401 else None
    response = pages.error_page(request, exc.status_code, str(exc.detail), login)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    message = f"invalid request: {problems}"
    if _is_api(request):
        return JSONResponse({"detail": message}, 422)
    return pages.error_page(request, 422, message, None)


def create_app() -> FastAPI:
    app = FastAPI(title="Pseudonymisation", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(api.router)
    app.include_router(reverse_requests.router)
    app.include_router(pages.router)
    app.add_middleware(_SecurityHeaders)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(requires_authenticated())])
    def openapi(request: Request) -> dict[str, Any]:
        """The OpenAPI document (FastAPI's), for authenticated users; served here because FastAPI's
        Swagger page loads its assets from a CDN."""
        return {**app.openapi(), "servers": [{"url": request.scope.get("root_path") or PREFIX}]}

    return app


app = create_app()
