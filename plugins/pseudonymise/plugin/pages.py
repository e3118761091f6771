"""The UI pages: audit trail (also the task view), tokens and charts, rendered on the server.

Plain HTML from Jinja2 templates with inline CSS and SVG: no JavaScript, no external asset, so the
pages work inside the Airflow UI's frame and on machines without internet.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from pseudonymise import __version__
from pseudonymise.plugin import charts
from pseudonymise.plugin.access import DagScopeDep, ReadAudit
from pseudonymise.plugin.audit_store import ConfigDep, StoreDep, TrailFilterDep
from pseudonymise.plugin.trail import (
    OPERATIONS,
    USE_OUTCOMES,
    Trail,
    distinct_values,
    latest_checkpoints,
    risk_entries,
    window,
)

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
PAGE_SIZE = 50


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z" if value else ""


templates.env.filters["when"] = _when
templates.env.filters["q"] = lambda value: quote(str(value), safe="")
templates.env.globals["version"] = __version__


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    # Links into the Airflow UI keep the API server's own path prefix (this app is mounted one level below).
    airflow_base = str(request.scope.get("root_path", "")).rsplit("/", 1)[0]
    return templates.TemplateResponse(request, name, {"page": name.removesuffix(".html"), "status_code": status_code,
                                                      "airflow": airflow_base, **context}, status_code=status_code)


@router.get("/")
def index(request: Request) -> RedirectResponse:
    return RedirectResponse(request.url_for("audit_page"), status_code=307)


@router.get("/audit", name="audit_page", response_class=HTMLResponse, dependencies=[ReadAudit])
def audit_page(request: Request, flt: TrailFilterDep, store: StoreDep, scope: DagScopeDep,
               page: Annotated[int, Query(ge=1, le=10**9)] = 1) -> HTMLResponse:
    """Every token use, newest first; with dag_id, task_id and run_id it is a task instance's view."""
    trail = Trail(store, scope)
    total, uses = trail.uses(flt, (page - 1) * PAGE_SIZE, PAGE_SIZE)
    incomplete, _ = trail.uses(type(flt)(outcome="incomplete"), 0, 0)
    verified, checked_at = trail.verify()
    query = flt.query_items()
    task_view = flt.dag_id is not None and flt.task_id is not None and flt.run_id is not None
    return _page(
        request, "audit.html", filter=flt, uses=uses, total=total, incomplete=incomplete, verified=verified,
        checkpoint=latest_checkpoints(store),
        checked_at=datetime.fromtimestamp(checked_at, UTC), page_no=page, pages=max(1, -(-total // PAGE_SIZE)),
        page_link=lambda n: "audit?" + urlencode([*query, ("page", str(n))]), task_view=task_view,
        outcomes=USE_OUTCOMES, operations=OPERATIONS, projects=distinct_values(store, scope, "project"),
        dag_ids=distinct_values(store, scope, "dag_id"),
        since=flt.since.strftime("%Y-%m-%dT%H:%M") if flt.since else "",
        until=flt.until.strftime("%Y-%m-%dT%H:%M") if flt.until else "",
    )


@router.get("/tokens", name="tokens_page", response_class=HTMLResponse, dependencies=[ReadAudit])
def tokens_page(request: Request, store: StoreDep, scope: DagScopeDep, cfg: ConfigDep) -> HTMLResponse:
    """Each token seen, its expiry and retention end, uses and outcomes; expiring and expired highlighted."""
    now = datetime.now(UTC)
    trail = Trail(store, scope)
    tokens = trail.tokens(now, timedelta(days=cfg.expiry_warning_days))
    return _page(request, "tokens.html", tokens=tokens, now=now, warning_days=cfg.expiry_warning_days,
                 escrow=trail.escrow_by_project(),
                 expiring=sum(t.state == "expiring" for t in tokens),
                 expired_uses=sum(t.expired_uses for t in tokens))


@router.get("/charts", name="charts_page", response_class=HTMLResponse, dependencies=[ReadAudit])
def charts_page(request: Request, store: StoreDep, scope: DagScopeDep,
                days: Annotated[int, Query(ge=1, le=366)] = 30) -> HTMLResponse:
    """Uses per day by outcome, and rows pseudonymised per project, over the last ``days`` days."""
    since, until = window(days, datetime.now(UTC))
    trail = Trail(store, scope)
    daily = trail.daily_uses(since, until)
    projects = trail.rows_by_project(since, until)
    return _page(request, "charts.html", days=days, since=since, until=until,
                 daily_chart=charts.daily_outcomes(daily), project_chart=charts.project_rows(projects),
                 daily=daily, projects=projects, colours=charts.OUTCOME_COLOURS)


@router.get("/reverse-requests", name="requests_page", response_class=HTMLResponse, dependencies=[ReadAudit])
def requests_page(request: Request, store: StoreDep, cfg: ConfigDep,
                  state: Annotated[str | None, Query(max_length=16)] = None) -> HTMLResponse:
    """Reversal requests of the HTTP API (four eyes): pending first in the filter, who asked, why, and the decision."""
    from pseudonymise.plugin.api import reverse_requests

    requests = reverse_requests(store, cfg)
    requests.create()
    rows = requests.list(status=state or None)
    return _page(request, "reverse_requests.html", requests=rows, state=state or "", enabled=cfg.api_allow_reversal,
                 ttl=cfg.reverse_request_ttl_minutes, pending=sum(r["state"] == "pending" for r in rows))
@router.get("/risk", name="risk_page", response_class=HTMLResponse, dependencies=[ReadAudit])
def risk_page(request: Request, store: StoreDep, scope: DagScopeDep,
              use_id: Annotated[str | None, Query(max_length=36)] = None) -> HTMLResponse:
    """The latest risk reports (the chosen one, by default the newest, charted) and the latest risk gates."""
    reports, gates = risk_entries(store, scope)
    chosen = next((r for r in reports if r.use_id == use_id), reports[0] if reports else None)
    chart = charts.class_sizes(chosen.figures.get("distribution", []), int(chosen.figures.get("k", 5))) \
        if chosen else None
    return _page(request, "risk.html", reports=reports, gates=gates, chosen=chosen, chart=chart)


def error_page(request: Request, status_code: int, message: str, login_url: str | None) -> HTMLResponse:
    return _page(request, "error.html", status_code=status_code, message=message, login_url=login_url)
