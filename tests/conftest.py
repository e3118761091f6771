"""Shared fixtures: real PostgreSQL, real OpenBao, an issuer with projects, and databases to test on."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import DirectoryStore, Issuer

from scripts.services import OpenBaoServer, PostgresServer, start_openbao, start_postgres

pytest_plugins = ["tests.secrets_scan"]
#: Airflow's secret maskers (the Task SDK's and the API server's), each one per process.
_MASKERS = ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker")


@pytest.fixture(autouse=True)
def _fresh_secret_masker() -> Iterator[None]:
    """Each test ends with Airflow's secret maskers emptied, as a worker's holds only its own task's secrets.

    A masker recompiles one regular expression of every secret it was ever given at each new one; over a
    session of tests that register every form of every token they issue, that made each token use of the
    HTTP API tests take seconds. What a test checks about masking, it registers and checks itself.
    """
    yield
    for name in _MASKERS:
        module = sys.modules.get(name)  # only where Airflow was imported: core tests never load it
        if module is not None:
            module.reset_secrets_masker()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop("immediate", remove=True)


def fresh_database(postgres: PostgresServer, options: str = "") -> Iterator[str]:
    """A fresh, empty database (``options`` follow ``CREATE DATABASE name``), dropped afterwards: yields its URL."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" {options}'))
    yield postgres.url(name)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    yield from fresh_database(postgres)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on the embedded default (SQLite) and on real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoServer]:
    server = start_openbao()
    yield server
    server.stop()


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    """An issuer with the projects most tests need."""
    issuer = Issuer.init(DirectoryStore(tmp_path / "issuer-store"), "test-issuer")
    issuer.create_project("research-a", method="reversible", treatment="deterministic", retention=timedelta(days=30))
    issuer.create_project("research-b", method="irreversible", treatment="deterministic")
    issuer.create_project("random-r", method="reversible", treatment="randomised", retention=timedelta(days=30))
    issuer.create_project("vendor-x", method="irreversible", treatment="deterministic")
    return issuer


def wait_for_lock_wait(engine: sa.Engine, timeout: float = 30, waiters: int = 1) -> None:
    """Return once ``waiters`` backends of ``engine``'s database wait for a lock (PostgreSQL's own view of
    it), or fail: a test then knows the state it names was reached, instead of hoping a sleep was long enough.
    Each look is its own transaction (a transaction sees one snapshot of ``pg_stat_activity``)."""
    import time

    deadline = time.monotonic() + timeout
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
        while time.monotonic() < deadline:
            if watch.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND wait_event_type = 'Lock'")).scalar() >= waiters:
                return
            time.sleep(0.05)
    raise AssertionError(f"no {waiters} backend(s) waited for a lock within {timeout} s")
