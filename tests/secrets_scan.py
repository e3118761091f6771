"""After the whole suite: search every log, captured output and file the tests left in the session's
temporary folder for every token and key the tests used. Any hit fails the run (issue: secrets never appear).

Secrets are collected from every JWS signed in the test process (tokens.jws_sign is wrapped) and,
at the end, from the token files and issuer stores the tests and their subprocesses wrote (those
files are where secrets are meant to live, so they are sources, not scan targets). Scanned: captured
stdout/stderr/log of every test, failure reports, and every *.log, *.db (the SQLite audit and escrow
databases), *.csv, *.parquet, *.json, *.txt and *.out file under the session's temporary folder, except
token files and issuer stores. What is not there by the session's end is not scanned here: the
PostgreSQL databases (dropped with their clusters) and the servers' own logs; the tests that write audit
rows to PostgreSQL check those rows for the token themselves. The search is for each secret's own text
(base64url), not for other encodings of it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from pseudonymise.core import tokens as _tokens

_SIGNED: set[str] = set()
_OUTPUTS: list[str] = []
_original_jws_sign = _tokens.jws_sign


def _recording_jws_sign(*args: Any, **kwargs: Any) -> str:
    token = _original_jws_sign(*args, **kwargs)
    _SIGNED.add(token)
    return token


_tokens.jws_sign = _recording_jws_sign


def _claims_secrets(token: str) -> set[str]:
    if not token:  # an empty token file (a test of that error) holds no secret; "" would be found everywhere
        return set()
    out = {token}
    try:
        claims = json.loads(_tokens.b64url_decode(token.split(".")[1]))
    except (ValueError, IndexError):
        return out
    if not isinstance(claims, dict):  # tests also sign payloads that are no claim set
        return out
    for name in ("key", "escrow_private_key"):
        if isinstance(claims.get(name), str) and len(claims[name]) >= 40:
            out.add(claims[name])
    return out


def _is_secret_home(path: Path, text: str) -> bool:
    """Whether the file is where secrets belong (a token file, an issuer's store document, the Airflow
    passwords file), so its secrets are searched for elsewhere rather than reported in it. Only by its name
    and, for a JSON document, by the names at its top level: a log, a database, a CSV or a document that
    merely mentions a key (a token's decoded claims in a log line) is a place to scan, never a home."""
    if path.suffix == ".token" or path.name == "passwords.json":
        return True
    if path.suffix != ".json" or not text.lstrip().startswith("{"):
        return False
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    # An issuer's project document holds the project key even when it has no escrow key (irreversible).
    return isinstance(doc, dict) and ("private_key" in doc or "escrow_private_key" in doc
                                      or ("key" in doc and "key_version" in doc))


#: Runs of base64url text: every secret has one (a key, a token's segments), whatever surrounds it.
_RUN = re.compile(r"[A-Za-z0-9_\-]{16,}")
_PROBE = 16


class _SecretIndex:
    """Finds which secrets occur in a text: exactly ``{s for s in secrets if s in text}``, without searching
    the whole text once per secret (thousands of secrets over megabytes made that the longest part of a
    session). A secret is searched for only where the first characters of its longest base64url run occur
    in one of the text's base64url runs, then confirmed with ``in``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._by_probe: defaultdict[str, list[str]] = defaultdict(list)
        self._short: list[str] = []  # too short to index (none are, today): searched in the whole text
        for secret in secrets:
            probe = max(re.split(r"[^A-Za-z0-9_\-]", secret), key=len)[:_PROBE]
            if len(probe) < _PROBE:
                self._short.append(secret)
            else:
                self._by_probe[probe].append(secret)

    def found_in(self, text: str) -> set[str]:
        found = {secret for secret in self._short if secret in text}
        for run in _RUN.finditer(text):
            chars = run.group()
            for i in range(len(chars) - _PROBE + 1):
                for secret in self._by_probe.get(chars[i:i + _PROBE], ()):
                    if secret in text:
                        found.add(secret)
        return found


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for _name, content in report.sections:
        _OUTPUTS.append(content)
    if report.failed and report.longrepr is not None:
        _OUTPUTS.append(str(report.longrepr))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = factory.getbasetemp()
    secrets: set[str] = set()
    for token in _SIGNED:
        secrets |= _claims_secrets(token)
    targets: list[tuple[str, str]] = [(f"captured output #{i}", text) for i, text in enumerate(_OUTPUTS)]
    for path in base.rglob("*"):
        if not path.is_file() or path.stat().st_size > 200 * 1024 * 1024:
            continue
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        if _is_secret_home(path, text):
            if path.suffix == ".token":
                secrets |= _claims_secrets(text.strip())
            elif path.suffix == ".json":
                doc = json.loads(text)
                for name in ("private_key", "key", "escrow_private_key"):
                    if isinstance(doc.get(name), str):
                        secrets.add(doc[name])
                secrets.update(v for v in (doc.get("previous_keys") or {}).values() if isinstance(v, str))
            continue
        if path.suffix in (".log", ".db", ".csv", ".parquet", ".json", ".txt", ".out"):
            targets.append((str(path.relative_to(base)), text))
    index, hits = _SecretIndex(secrets), []
    for where, text in targets:
        found = index.found_in(text)
        hits += [(where, secret[:12] + "…") for secret in secrets if secret in found]
    summary = {"secrets_searched": len(secrets), "places_scanned": len(targets), "hits": len(hits)}
    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "secrets-scan.json").write_text(json.dumps({**summary, "where": hits[:50]}, indent=2))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"secrets scan: {summary['secrets_searched']} tokens/keys searched in "
                            f"{summary['places_scanned']} logs, outputs and files: {summary['hits']} found")
    if hits:
        if reporter is not None:
            for where, secret in hits[:20]:
                reporter.write_line(f"  secret {secret} found in {where}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
