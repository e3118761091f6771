"""Fixtures of the core tests: verified tokens of the shared ``issuer`` fixture's projects, and an
in-memory source and sink for the pipeline's run functions.

``long_lived_issuer`` is the same issuer, session-scoped, for Hypothesis tests (which must not
depend on function-scoped fixtures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pseudonymise.core.audit import AuditLog
from pseudonymise.core.db import make_engine
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.tokens import Token, verify_token

Mint = Callable[..., Token]


class Rows:
    """A source of one batch holding ``columns`` (a fresh copy at each read)."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = list(columns)
        self._data = columns

    def batches(self) -> Iterator[dict[str, list[Any]]]:
        yield {k: list(v) for k, v in self._data.items()}


class Collect:
    """A sink that keeps what it is given, and whether it was committed or aborted."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Any]] = {}
        self.committed = self.aborted = False

    def write(self, batch: dict[str, list[Any]]) -> None:
        for k, v in batch.items():
            self.rows.setdefault(k, []).extend(v)

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


def mint_with(issuer: Issuer) -> Mint:
    """A function issuing a token of ``issuer`` and returning it verified."""

    def mint(project: str, kind: str = "pseudonymisation", **kwargs: object) -> Token:
        raw = issuer.issue(project, kind, **kwargs)  # type: ignore[arg-type]
        return verify_token(raw, issuer.public_keys(), kind=kind, project=project)

    return mint


@pytest.fixture
def audit(db_url: str) -> Iterator[AuditLog]:
    """An empty audit log with its tables, on SQLite and on PostgreSQL."""
    log = AuditLog(make_engine(db_url))
    log.create()
    yield log
    log.engine.dispose()


@pytest.fixture
def mint(issuer: Issuer) -> Mint:
    return mint_with(issuer)


@pytest.fixture(scope="session")
def long_lived_issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    store = DirectoryStore(Path(tmp_path_factory.mktemp("long-lived")) / "issuer-store")
    issuer = Issuer.init(store, "long-lived-issuer")
    issuer.create_project("research-a", method="reversible", treatment="deterministic", retention=timedelta(days=30))
    issuer.create_project("research-b", method="irreversible", treatment="deterministic")
    issuer.create_project("vendor-x", method="irreversible", treatment="deterministic")
    for alphabet, length in (("hex", 64), ("base32", 52), ("base64url", 43), ("digits", 77),
                             ("hex", 16), ("base32", 13), ("base64url", 11), ("digits", 20)):
        issuer.create_project(f"fmt-{alphabet}-{length}", format=PseudonymFormat(alphabet, length, "P-"))
    return issuer


@pytest.fixture(scope="session")
def long_lived_mint(long_lived_issuer: Issuer) -> Mint:
    return mint_with(long_lived_issuer)
