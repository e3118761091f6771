"""The UI pages through Airflow's real API server app: audit trail, task view, tokens, charts."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from airflow.models.taskinstancekey import TaskInstanceKey
from pseudonymise.core.audit import AuditUse
from pseudonymise.core.errors import TokenRevokedError
from pseudonymise.operators import AuditTrailLink

from tests import reference
from tests.plugin.conftest import Api, AuditDb, TokenConnections, page, secrets_of, task_use


class _Rows(HTMLParser):
    """The ``data-*`` attributes of the rows of one table, and the ids present on the page."""

    def __init__(self, row_class: str) -> None:
        super().__init__()
        self.row_class, self.rows, self.ids = row_class, [], set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "tr" and self.row_class in (a.get("class") or "").split():
            self.rows.append({k.removeprefix("data-"): v for k, v in a.items() if k.startswith("data-")})


def parse(html: str, row_class: str = "use") -> _Rows:
    parser = _Rows(row_class)
    parser.feed(html)
    return parser


def test_audit_trail_newest_first_incomplete_and_verified(api: Api, audit_db: AuditDb, uses: dict[str, str],
                                                          token_connections: TokenConnections) -> None:
    html = page(api, "audit")
    found = parse(html)
    assert [r["use-id"] for r in found.rows] == [uses[k] for k in ("crash", "b1", "a_map1", "a_map0", "a1")]
    assert [r["outcome"] for r in found.rows] == ["incomplete", "success", "success", "success", "success"]
    assert 'data-ok="true" data-last-seq="9"' in html and "verified</strong> up to row 9" in html
    assert "1 use started and never finished" in html
    for secret in secrets_of(token_connections.tokens["pseudonymise"]):
        assert secret not in html
    assert "P-1" not in html  # originals never shown


def test_broken_chain_is_shown_with_the_row_and_reason(api: Api, audit_db: AuditDb, uses: dict[str, str]) -> None:
    t = audit_db.store.audit.table
    with audit_db.store.engine.begin() as conn:
        conn.execute(sa.delete(t).where(t.c.seq == 3))
    html = page(api, "audit")
    assert 'data-ok="false" data-broken-at="4"' in html
    assert "BROKEN at row 4" in html and "deleted" in html


@pytest.mark.parametrize(("params", "expected"), [
    ({"dag_id": "dag_a"}, ["a_map1", "a_map0", "a1"]),
    ({"dag_id": "dag_a", "task_id": "ranges"}, ["a_map1", "a_map0"]),
    ({"run_id": "manual__2"}, ["crash", "b1"]),
    ({"dag_id": "dag_a", "task_id": "ranges", "map_index": "1"}, ["a_map1"]),
    ({"outcome": "incomplete"}, ["crash"]),
    ({"outcome": "success", "dag_id": "dag_b"}, ["b1"]),
    ({"outcome": "denied"}, []),
    ({"operation": "pseudonymise", "project": "research-a"}, ["crash", "b1", "a_map1", "a_map0", "a1"]),
    ({"operation": "reverse"}, []),
    ({"project": "research-b"}, []),
    ({"since": "2999-01-01T00:00"}, []),
    ({"until": "2000-01-01T00:00"}, []),
    ({"dag_id": "", "task_id": "", "map_index": "", "since": "", "until": ""}, ["crash", "b1", "a_map1", "a_map0", "a1"]),
])
def test_audit_filters(api: Api, audit_db: AuditDb, uses: dict[str, str], params: dict[str, str],
                       expected: list[str]) -> None:
    found = parse(page(api, "audit", **params))
    assert [r["use-id"] for r in found.rows] == [uses[k] for k in expected]
    if not expected:
        assert "no-uses" in found.ids


def test_time_range_filter_on_real_times(api: Api, audit_db: AuditDb, uses: dict[str, str]) -> None:
    rows = {r["use_id"]: r for r in audit_db.rows() if r["event"] == "started"}
    since = rows[uses["a_map1"]]["recorded_at"].strftime("%Y-%m-%dT%H:%M:%S.%f")
    until = rows[uses["crash"]]["recorded_at"].strftime("%Y-%m-%dT%H:%M:%S.%f")
    found = parse(page(api, "audit", since=since, until=until))
    assert [r["use-id"] for r in found.rows] == [uses["b1"], uses["a_map1"]]


def test_pagination(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    token, issuer = token_connections.tokens["pseudonymise"], token_connections.issuer
    ids = [task_use(audit_db.store, token, issuer, dag_id="big", task_id="t", run_id=f"r{i}", patients=("P",))
           for i in range(57)]
    first = page(api, "audit", dag_id="big")
    assert [r["use-id"] for r in parse(first).rows] == ids[::-1][:50]
    assert "page 1 of 2" in first and 'rel="next"' in first and 'rel="prev"' not in first
    link = re.search(r'href="(audit\?[^"]+)" rel="next"', first)
    assert link is not None and "dag_id=big" in link.group(1) and "page=2" in link.group(1)
    second = page(api, "audit", dag_id="big", page="2")
    assert [r["use-id"] for r in parse(second).rows] == ids[::-1][50:]
    assert "page 2 of 2" in second and 'rel="prev"' in second


def test_task_view_is_where_the_extra_link_lands(api: Api, audit_db: AuditDb, uses: dict[str, str]) -> None:
    """The operators' extra link, as Airflow asks it for a task instance, opens that instance's uses."""
    link = AuditTrailLink()
    mapped = link.get_link(None, ti_key=TaskInstanceKey("dag_a", "ranges", "scheduled__1", 1, 1))  # type: ignore[arg-type]
    assert mapped.startswith("/pseudonymise/audit?")
    response = api.client.get(mapped, headers=api.auth("viewer"))
    assert response.status_code == 200
    found = parse(response.text)
    assert [r["use-id"] for r in found.rows] == [uses["a_map1"]]
    assert "task-view" in found.ids and "map index 1" in response.text
    assert 'href="/dags/dag_a/runs/scheduled__1/tasks/ranges/mapped/1"' in response.text

    unmapped = link.get_link(None, ti_key=TaskInstanceKey("dag_b", "load", "manual__2", 1, -1))  # type: ignore[arg-type]
    found = parse(api.client.get(unmapped, headers=api.auth("viewer")).text)
    assert [(r["use-id"], r["outcome"]) for r in found.rows] == [(uses["crash"], "incomplete")]


def test_task_instance_tab_of_the_airflow_ui(api: Api, audit_db: AuditDb, uses: dict[str, str]) -> None:
    """The tab the plugin adds to task instances: Airflow fills in the ids and, for an unmapped task,
    leaves ``{MAP_INDEX}`` as it is."""
    from pseudonymise.plugin import PseudonymisePlugin

    href = next(v["href"] for v in PseudonymisePlugin.external_views if v.get("destination") == "task_instance")
    for name, value in (("DAG_ID", "dag_b"), ("TASK_ID", "load"), ("RUN_ID", "manual__2")):
        href = href.replace("{" + name + "}", quote(value, safe=""))
    response = api.client.get(href, headers=api.auth("viewer"))
    assert response.status_code == 200, response.text
    assert [r["use-id"] for r in parse(response.text).rows] == [uses["crash"]]
    mapped = href.replace("dag_b", "dag_a").replace("load", "ranges").replace("manual__2", "scheduled__1")
    response = api.client.get(mapped.replace("{MAP_INDEX}", "0"), headers=api.auth("viewer"))
    assert [r["use-id"] for r in parse(response.text).rows] == [uses["a_map0"]]


def test_task_view_escapes_what_it_shows(api: Api, audit_db: AuditDb, token_connections: TokenConnections) -> None:
    hostile = '<script>alert("x")</script>'
    task_use(audit_db.store, token_connections.tokens["pseudonymise"], token_connections.issuer,
             dag_id=hostile, task_id=hostile, run_id="r/1?&x")
    html = page(api, "audit", dag_id=hostile, task_id=hostile, run_id="r/1?&x")
    assert hostile not in html and "&lt;script&gt;" in html
    assert "/runs/r%2F1%3F%26x/tasks/" in html
    assert len(parse(html).rows) == 1


def test_tokens_page_highlights_expiring_and_expired(api: Api, audit_db: AuditDb,
                                                     token_connections: TokenConnections) -> None:
    for name in ("pseudonymise", "expiring", "expired", "expired"):
        api.client.post(f"/pseudonymise/api/v1/connections/{token_connections[name]}/pseudonymise",
                        headers=api.auth("admin"), json={"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]})
    html = page(api, "tokens")
    rows = {r["state"]: r for r in parse(html, "token").rows}
    assert set(rows) == {"valid", "expiring", "unknown"}
    assert rows["unknown"]["expired-uses"] == "2"
    assert rows["expiring"]["expired-uses"] == "0"
    assert 'id="expiring"' in html and "1 token expires within 14 days" in html
    assert 'id="expired-uses"' in html and "2 uses of expired tokens refused" in html
    assert "research-a" in html and 'id="escrow"' in html
    assert re.search(r"<td>research-a</td><td class=\"num\">1</td>", html)  # one sealed value (id 1)
    for token in token_connections.tokens.values():
        for secret in secrets_of(token):
            assert secret not in html


def test_expiry_warning_window_is_configurable(api: Api, audit_db: AuditDb, token_connections: TokenConnections,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    api.client.post(f"/pseudonymise/api/v1/connections/{token_connections['expiring']}/pseudonymise",
                    headers=api.auth("admin"), json={"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]})
    assert [r["state"] for r in parse(page(api, "tokens"), "token").rows] == ["expiring"]
    monkeypatch.setenv("AIRFLOW__PSEUDONYMISE__EXPIRY_WARNING_DAYS", "2")
    assert [r["state"] for r in parse(page(api, "tokens"), "token").rows] == ["valid"]


def test_charts(api: Api, audit_db: AuditDb, uses: dict[str, str], token_connections: TokenConnections) -> None:
    api.client.post(f"/pseudonymise/api/v1/connections/{token_connections['expired']}/pseudonymise",
                    headers=api.auth("admin"), json={"policy": {"id": "pseudonymise"}, "records": [{"id": 1}]})
    html = page(api, "charts", days="7")
    bars = re.findall(r'data-outcome="(\w+)" data-day="([\d-]+)" data-count="(\d+)"', html)
    assert {(o, int(n)) for o, _, n in bars} == {("success", 4), ("incomplete", 1), ("denied", 1)}
    assert len({d for _, d, _ in bars}) == 1
    assert re.search(r'data-project="research-a" data-rows="8"', html)  # 4 task uses of 2 patients
    assert html.count("<svg") == 2 and "<script" not in html


@pytest.mark.parametrize("path", ["audit", "tokens", "charts"])
def test_pages_need_an_airflow_user(api: Api, audit_db: AuditDb, path: str) -> None:
    anonymous = api.client.get(f"/pseudonymise/{path}")
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"].startswith("text/html")
    assert 'href="/auth/login' in anonymous.text and "Sign in to Airflow" in anonymous.text
    assert api.client.get(f"/pseudonymise/{path}", headers={"Authorization": "Bearer forged"}).status_code == 403
    assert api.client.get(f"/pseudonymise/{path}", headers={"Cookie": "_token=forged"}).status_code == 403


def test_the_ui_cookie_authenticates_pages(api: Api, audit_db: AuditDb) -> None:
    """Browsers send the ``_token`` cookie the Airflow UI sets at login, not a bearer header."""
    response = api.client.get("/pseudonymise/audit", headers={"Cookie": f"_token={api.tokens['viewer']}"})
    assert response.status_code == 200


def test_index_redirects_to_the_audit_trail(api: Api, audit_db: AuditDb) -> None:
    response = api.client.get("/pseudonymise/", headers=api.auth("viewer"), follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"].endswith("/pseudonymise/audit")


def test_invalid_filter_is_a_clear_error_page(api: Api, audit_db: AuditDb) -> None:
    response = api.client.get("/pseudonymise/audit", params={"since": "last week"}, headers=api.auth("viewer"))
    assert response.status_code == 422 and "since must be a date" in response.text
    response = api.client.get("/pseudonymise/audit", params={"map_index": "one"}, headers=api.auth("viewer"))
    assert response.status_code == 422 and "map_index" in response.text


def test_pages_without_audit_database(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID", raising=False)
    response = api.client.get("/pseudonymise/audit", headers=api.auth("viewer"))
    assert response.status_code == 503 and "[pseudonymise] audit_conn_id" in response.text


def test_pages_are_framable_only_by_airflow_and_run_no_script(api: Api, audit_db: AuditDb) -> None:
    response = api.client.get("/pseudonymise/audit", headers=api.auth("viewer"))
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'self'" in csp and "default-src 'none'" in csp and "script-src" not in csp
    assert response.headers["cache-control"] == "no-store"


def test_tokens_page_shows_uses_left_and_revocations(api: Api, audit_db: AuditDb,
                                                     token_connections: TokenConnections) -> None:
    """A token with max_uses shows how many uses it has left (refused uses do not count), an unlimited one
    shows none; a revoked token shows when, by whom and why (escaped)."""
    issuer = token_connections.issuer
    limited = issuer.issue("research-a", "pseudonymisation", max_uses=3)
    unlimited = issuer.issue("research-a", "pseudonymisation")
    for token in (limited, limited, unlimited):
        task_use(audit_db.store, token, issuer, dag_id="d", task_id="t", run_id="r")
    revoked_jti = reference.claims(unlimited)["jti"]
    audit_db.store.audit.revoke(revoked_jti, "<script>alert(1)</script> leaked",
                                AuditUse(operation="revoke", context={"triggered_by": "dpo"}))
    with pytest.raises(TokenRevokedError):
        task_use(audit_db.store, unlimited, issuer, dag_id="d", task_id="t", run_id="r")
    html = page(api, "tokens")
    rows = {r["jti"]: r for r in parse(html, "token").rows}
    limited_row, revoked_row = rows[reference.claims(limited)["jti"]], rows[revoked_jti]
    assert (limited_row["uses-left"], limited_row["revoked"]) == ("1", "no")
    assert "1 of 3" in html
    assert (revoked_row["uses-left"], revoked_row["revoked"]) == ("", "yes")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; leaked" in html and "<script>alert(1)" not in html
    assert "by dpo" in html
    for token in (limited, unlimited):
        for secret in secrets_of(token):
            assert secret not in html
