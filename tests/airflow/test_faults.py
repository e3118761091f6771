"""Faults: the worker killed while extracting and while committing, the target database restarted
mid-run, the audit database or Vault unreachable, a full disk. Each time the target is unchanged
(or complete), the audit shows what happened, and a retry gives the same rows."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer

from scripts.services import RestartableOpenBao, free_port, start_postgres
from tests.airflow.conftest import AIRFLOW, audit_rows, dag_spec, pg_conn, rows, vault_conn
from tests.airflow.retry import fault_then_retry

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.slow]


def _start_run(env_: dict[str, Any], spec: dict[str, Any], connections: dict[str, Any] | None = None) -> Any:
    env = env_["airflow"].env(connections or env_["connections"], extra={"PSEUDONYMISE_TEST_DAG": json.dumps(spec)})
    return subprocess.Popen([AIRFLOW, "dags", "test", "pseudonymise_test", "2026-11-04"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(url: str, sql: str, timeout: float = 120) -> None:
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                with engine.connect() as conn:
                    if conn.execute(sa.text(sql)).scalar():
                        return
            except sa.exc.ProgrammingError:
                pass  # the table does not exist yet
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise AssertionError(f"timed out waiting for: {sql}")


@pytest.mark.parametrize("point", ["extract", "commit"])
def test_sigkill_while_extracting_or_committing(world: dict[str, Any], point: str) -> None:
    spec = dag_spec(world, write_mode="replace_partition", partition_column="visit_date")
    first = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
    assert first.returncode == 0, first.output[-3000:]
    before = rows(world["urls"]["research"], "visits", "visit_id")
    research = world["urls"]["research"]
    if point == "extract":
        slow = dag_spec(world, write_mode="replace_partition", partition_column="visit_date",
                       sql=spec["tasks"][0]["sql"].replace("FROM patient_visits", "FROM patient_visits, pg_sleep(60)"))
        proc = _start_run(world, slow)
        _wait_for(research, "SELECT count(*) = 2 FROM pseudonymise_audit WHERE event = 'started'")
        _wait_for(world["urls"]["hospital"], "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND datname = current_database()")
    else:
        engine = sa.create_engine(research)
        with engine.begin() as conn:  # a deferred trigger that sleeps inside COMMIT (once), after the load
            conn.execute(sa.text(
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF current_setting('pseudonymise_test.slept', true) IS DISTINCT FROM 'yes' THEN"
                " PERFORM set_config('pseudonymise_test.slept', 'yes', true); PERFORM pg_sleep(5); END IF;"
                " RETURN NULL; END $$"))
            conn.execute(sa.text("CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON visits DEFERRABLE INITIALLY DEFERRED"
                                 " FOR EACH ROW EXECUTE FUNCTION slow_commit()"))
        engine.dispose()
        proc = _start_run(world, spec)
        _wait_for(research, "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND datname = current_database()")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    audit = audit_rows(research)
    if point == "extract":
        assert [a["outcome"] for a in audit] == ["started", "success", "started"]
    else:
        # COMMIT had reached the server: it completes without the client, data and audit together
        _wait_for(research, "SELECT count(*) = 0 FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                            " AND datname = current_database()")
        audit = audit_rows(research)
        assert [a["outcome"] for a in audit] == ["started", "success", "started", "success"]
    assert rows(research, "visits", "visit_id") == before
    if point == "commit":
        with sa.create_engine(research).begin() as conn:
            conn.execute(sa.text("DROP TRIGGER slow ON visits"))
    retry = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", world["connections"], spec=spec)
    assert retry.returncode == 0, retry.output[-3000:]
    assert rows(research, "visits", "visit_id") == before


def test_target_database_restarted_mid_run(world: dict[str, Any]) -> None:
    """Its own cluster, so restarting it does not disturb the other tests."""
    server = start_postgres()
    try:
        admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text('CREATE DATABASE "target"'))
        admin.dispose()
        target_url = server.url("target")
        connections = {**world["connections"], "research_db": pg_conn(target_url)}
        slow = dag_spec(world, write_mode="replace_partition", partition_column="visit_date",
                       sql=dag_spec(world)["tasks"][0]["sql"].replace("FROM patient_visits", "FROM patient_visits, pg_sleep(20)"))
        proc = _start_run(world, slow, connections)
        _wait_for(target_url, "SELECT count(*) = 1 FROM pseudonymise_audit WHERE event = 'started'")
        server.stop("fast")
        server.start()
        proc.wait(300)
        assert proc.returncode != 0
        audit = audit_rows(target_url)
        # the server is back by the time the task fails: the failure is recorded with its class
        assert [a["outcome"] for a in audit] == ["started", "failed"]
        assert audit[1]["error_class"]
        assert not sa.inspect(sa.create_engine(target_url)).has_table("visits")
        spec = dag_spec(world, write_mode="replace_partition", partition_column="visit_date")
        retry = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections, spec=spec)
        assert retry.returncode == 0, retry.output[-3000:]
        assert len(rows(target_url, "visits", "visit_id")) == 24
    finally:
        server.stop("immediate", remove=True)


def test_unreachable_audit_database_refuses_the_token(world: dict[str, Any]) -> None:
    dead = {"conn_type": "postgres", "host": "127.0.0.1", "port": free_port(), "login": "postgres", "schema": "x"}
    connections = {**world["connections"], "audit_db": dead}
    spec = dag_spec(world, audit_conn_id="audit_db")
    run = world["airflow"].dags_test("pseudonymise_test", "2026-11-04", connections, spec=spec)
    assert run.returncode != 0
    assert "the token was NOT used" in run.output or "cannot create the audit table" in run.output
    assert not sa.inspect(sa.create_engine(world["urls"]["research"])).has_table("visits")


@pytest.mark.vault
def test_unreachable_vault_is_a_clear_denied_use_and_the_retry_gives_identical_rows(
        world: dict[str, Any], restartable_openbao: RestartableOpenBao) -> None:
    """Its own OpenBao, with storage on disk, so stopping it disturbs no other test and it comes back
    with the secret on the same address."""
    bao = restartable_openbao
    bao.client().secrets.kv.v2.create_or_update_secret(
        path="pseudonymise/research-a", secret={"token": world["token"]}, mount_point="secret")
    keys = world["connections"]["pseudonymise_research"]["extra"]["issuer_keys"]
    connections = {
        **world["connections"],
        "vault_default": vault_conn(bao),
        "pseudonymise_research": {"conn_type": "pseudonymise", "extra": {
            "issuer_keys": keys, "vault_conn_id": "vault_default", "vault_path": "pseudonymise/research-a"}},
    }
    fault_then_retry(world, connections, bao.stop, bao.start, message="could not be read from Vault",
                     error_class="VaultUnreachableError", retryable=True,
                     outcome="denied", secrets=[world["token"]],
                     spec=dag_spec(world, write_mode="replace_partition", partition_column="visit_date"))


def test_disk_full_for_a_file_target_leaves_no_file(issuer: Issuer, tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the write fails with EFBIG, like ENOSPC would."""
    token = tmp_path / "t.token"
    token.write_text(issuer.issue("research-b", "pseudonymisation"))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(issuer.public_keys().to_jwks()))
    big = tmp_path / "big.csv"
    with big.open("w") as fh:
        fh.write("patient_id,note\n")
        for i in range(200_000):
            fh.write(f"P{i},{'x' * 40}\n")
    out = tmp_path / "out" / "pseudonymised.csv"
    out.parent.mkdir()
    db = f"sqlite:///{tmp_path / 'audit.db'}"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, 2 * 1024 * 1024))

    cmd = [sys.executable, "-m", "pseudonymise.cli", "file", "pseudonymise", str(big), str(out), "--columns",
           "patient_id", "--keep", "note", "--token-file", str(token), "--issuer-keys", str(keys), "--db", db]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "error: cannot write" in proc.stderr and "nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []
    from pseudonymise.core.audit import AuditLog

    audit = list(AuditLog(sa.create_engine(db)).iter_rows())
    assert [a["outcome"] for a in audit] == ["started", "failed"] and audit[1]["error_class"] == "DataIOError"
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert out.exists()
