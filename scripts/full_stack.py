"""The production-like stack from plain processes: PostgreSQL, OpenBao, and Airflow's API server,
scheduler and DAG processor (LocalExecutor), with the token connection served by the VaultBackend.
With ``--executor celery``: CeleryExecutor, Redis as its broker and two Celery workers, each its own
process with its own hostname.

    .venv/bin/python scripts/full_stack.py                      # start, run the demo below, stop
    .venv/bin/python scripts/full_stack.py --keep               # ... and keep it running (Ctrl-C stops it)
    .venv/bin/python scripts/full_stack.py --executor celery    # the same on CeleryExecutor, two workers

The demo triggers the patient-extract DAG through the REST API (/api/v2) as a real client would,
runs `airflow backfill create` over three days twice, waits for success and prints the target and
audit rows. The end-to-end test tests/stack/test_full_stack.py drives the same class.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.seed import LOGIN_USER, seed  # noqa: E402
from scripts.services import free_port, start_openbao, start_postgres, start_redis  # noqa: E402

BIN = Path(sys.executable).parent
DAG_ID = "pseudonymise_patient_extract"
EXECUTORS = ("local", "celery")


class FullStack:
    """Start everything in a temporary folder; ``stop()`` ends every process.

    :param executor: ``local`` (LocalExecutor, ``parallelism`` task processes) or ``celery``
        (CeleryExecutor: Redis as the broker, the metadata database as the result backend, and
        ``workers`` Celery workers of ``concurrency`` task processes each, named :attr:`worker_hostnames`).
    """

    def __init__(self, workdir: Path | None = None, *, parallelism: int = 8, dags_folder: Path | None = None,
                 executor: str = "local", workers: int = 2, concurrency: int = 4,
                 users: dict[str, str] | None = None, triggerer: bool = False) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor {executor!r} is unknown; use one of {', '.join(EXECUTORS)}")
        self.work = Path(workdir or tempfile.mkdtemp(prefix="pseudonymise-stack-"))
        self.parallelism, self.dags_folder = parallelism, Path(dags_folder or ROOT / "dags")
        self.executor, self.concurrency = executor, concurrency
        self.worker_hostnames = [f"stack-worker-{n}" for n in range(1, workers + 1)] if executor == "celery" else []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pg = self.bao = self.redis = None
        self.api_token: str | None = None
        #: user name -> role of the simple auth manager: ``admin``, the ``airflow_api`` connection's reader
        #: of approvals (a viewer), and those asked for
        self.users = {LOGIN_USER: "admin", "approvals-reader": "viewer", **(users or {})}
        self.user_tokens: dict[str, str] = {}
        self.with_triggerer = triggerer

    # --- setup ------------------------------------------------------------------------------
    def start(self) -> FullStack:
        t0 = time.monotonic()
        self.pg = start_postgres()
        admin = sa.create_engine(self.pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for db in ("airflow_meta", "hospital", "research", "vendor"):
                conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
        admin.dispose()
        self.bao = start_openbao()
        # the compose file's seeding, here too: issuer, token connections in Vault, login, JWT secret, source rows
        seeded = seed(vault_url=self.bao.addr, vault_token=self.bao.token, hospital_url=self.pg.url("hospital"),
                      issuer_store=self.work / "issuer", secrets_dir=self.work / "secrets")
        self.issuer, self.token = seeded.issuer, seeded.tokens["pseudonymise_research"]
        self.vendor_token = seeded.tokens["pseudonymise_vendor"]
        self.passwords_file, self.jwt_secret_file = seeded.passwords_file, seeded.jwt_secret_file
        if self.executor == "celery":
            self.redis = start_redis()
        self.port = free_port()
        seeded_passwords = json.loads(self.passwords_file.read_text())
        # the seeded login keeps its password; the other users of this stack get theirs here
        self.passwords = {user: seeded_passwords.get(user) or secrets.token_urlsafe(12) for user in self.users}
        self.password = self.passwords[LOGIN_USER]
        self.users_file = self.work / "users.json"
        self.users_file.write_text(json.dumps(self.passwords))
        self.users_file.chmod(0o600)
        self.env = self._airflow_env()
        self._run("db", "migrate")
        for name in ("api-server", "scheduler", "dag-processor", *(["triggerer"] if self.with_triggerer else [])):
            self._spawn(name, [name] + (["--port", str(self.port)] if name == "api-server" else []))
        for hostname in self.worker_hostnames:
            self._spawn(hostname, *self._celery_worker(hostname))
        self._wait_for_api()
        self._wait_for_workers()
        self.started_in = time.monotonic() - t0
        return self

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
        self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=env or self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _celery_worker(self, hostname: str) -> tuple[list[str], dict[str, str]]:
        """``airflow celery worker`` as its own process: its Celery node name, pid file and log server port
        (two workers share this machine), and the hostname Airflow records in its task instances.

        A task instance's ``hostname`` is what ``[core] hostname_callable`` returns in the task's process
        (the Task SDK reports it when the task starts), not the Celery node name: on one machine both
        workers would report its one name, so each worker's callable returns its own (as separate
        machines would report theirs).
        """
        env = {**self.env, "AIRFLOW__CORE__HOSTNAME_CALLABLE": "scripts.celery_stack.hostname",
               "PSEUDONYMISE_STACK_WORKER_HOSTNAME": hostname,
               "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
        args = ["celery", "worker", "--celery-hostname", f"{hostname}@%h", "--concurrency", str(self.concurrency),
                "--pid", str(self.work / f"{hostname}.pid")]
        return args, env

    def _wait_for_workers(self, timeout: float = 120) -> None:
        """Wait until every Celery worker has joined the broker (its log says ``ready``)."""
        deadline = time.monotonic() + timeout
        waiting = list(self.worker_hostnames)
        while waiting and time.monotonic() < deadline:
            for hostname in list(waiting):
                if self.procs[hostname].poll() is not None:
                    raise RuntimeError(f"{hostname} exited: {(self.work / f'{hostname}.log').read_text()[-3000:]}")
                if " ready." in (self.work / f"{hostname}.log").read_text(errors="replace"):
                    waiting.remove(hostname)
            time.sleep(1)
        if waiting:
            raise RuntimeError(f"Celery worker(s) {', '.join(waiting)} did not get ready within {timeout} s")

    def _airflow_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PSEUDONYMISE"))}

        def pg(db: str) -> str:
            return json.dumps({"conn_type": "postgres", "host": self.pg.host, "port": self.pg.port,
                               "login": self.pg.user, "schema": db})

        env.update({
            "AIRFLOW_HOME": str(self.work / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor" if self.executor == "celery" else "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in self.users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.users_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__PORT": str(self.port),
            # read from the seeded file by every process, as in the compose file
            "AIRFLOW__API_AUTH__JWT_SECRET_CMD": f"cat {self.jwt_secret_file}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg.url("airflow_meta"),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SECRETS__BACKEND": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
            "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps({
                "connections_path": "connections", "variables_path": None, "config_path": None,
                "mount_point": "secret", "url": self.bao.addr, "token": self.bao.token, "kv_engine_version": 2}),
            "AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID": "research_db",
            "AIRFLOW_CONN_HOSPITAL_DB": pg("hospital"),
            "AIRFLOW_CONN_RESEARCH_DB": pg("research"),
            "AIRFLOW_CONN_VENDOR_DB": pg("vendor"),
            # the REST API as the reversal DAG reads its four-eyes approval (a viewer user)
            "AIRFLOW_CONN_AIRFLOW_API": json.dumps({"conn_type": "http", "host": "http://127.0.0.1", "port": self.port,
                                                    "login": "approvals-reader",
                                                    "password": self.passwords["approvals-reader"]}),
        })
        if self.redis is not None:
            env.update({
                "AIRFLOW__CELERY__BROKER_URL": self.redis.url(),
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.pg.url("airflow_meta").replace("+psycopg2", ""),
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.concurrency),
                # Airflow's Celery configuration with prefetching off (scripts/celery_stack.py)
                "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "scripts.celery_stack.CELERY_CONFIG",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            })
        return env

    def airflow(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``airflow <args>`` with the stack's environment, whatever its exit status."""
        return subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
                              timeout=600, check=False)

    def _run(self, *args: str) -> str:
        proc = self.airflow(*args)
        if proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc.stdout

    # --- REST API ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, auth: bool = True, user: str = "admin") -> Any:
        """A REST call as ``user`` (one of :attr:`users`), JSON in and out."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token_for(user)}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def token_for(self, user: str) -> str:
        """The API JWT of ``user`` (logged in once)."""
        if user == LOGIN_USER and self.api_token:
            return self.api_token
        if user not in self.user_tokens:
            self.user_tokens[user] = self.request("POST", "/auth/token", {"username": user,
                                                                          "password": self.passwords[user]},
                                                  auth=False)["access_token"]
        return self.user_tokens[user]

    def _wait_for_api(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {(self.work / f'{name}.log').read_text()[-3000:]}")
            try:
                self.api_token = self.request("POST", "/auth/token", {"username": LOGIN_USER, "password": self.password},
                                              auth=False)["access_token"]
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise RuntimeError("the API server did not answer within its timeout")

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", f"/api/v2/dags/{dag_id}")
                self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
                return
            except urllib.error.HTTPError:
                time.sleep(2)
        raise RuntimeError(f"DAG {dag_id} was not parsed within {timeout} s")

    def trigger(self, dag_id: str, logical_date: str | None, conf: dict[str, Any] | None = None,
                user: str = "admin") -> str:
        """Trigger a run of ``dag_id`` as ``user`` through the REST API; its run id."""
        body: dict[str, Any] = {"logical_date": logical_date, **({"conf": conf} if conf else {})}
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body, user=user)["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600, poll: float = 1) -> dict[str, Any]:
        """Wait until the DAG run ``run_id`` has ended (success or failed) and return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run: dict[str, Any] = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(poll)
        raise RuntimeError(f"{dag_id} run {run_id} did not finish within {timeout} s")

    def wait_for_runs(self, dag_id: str, expected: int, timeout: float = 600) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
            done = [r for r in runs if r["state"] in ("success", "failed")]
            if len(done) >= expected and len(done) == len(runs):
                return runs
            time.sleep(2)
        raise RuntimeError(f"{dag_id}: runs did not finish within {timeout} s")

    def backfill(self, dag_id: str, start: str, end: str, reprocess: str = "none", timeout: float = 600,
                 wait: bool = True) -> None:
        """``airflow backfill create`` and (unless ``wait`` is false) wait until the backfill has completed."""
        self._run("backfill", "create", "--dag-id", dag_id, "--from-date", start, "--to-date", end,
                  "--reprocess-behavior", reprocess)
        if wait:
            self.wait_for_backfills(dag_id, timeout)

    def wait_for_backfills(self, dag_id: str, timeout: float = 600) -> None:
        """Wait until every backfill of ``dag_id`` is marked completed (the scheduler does so every 30 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            backfills = self.request("GET", f"/api/v2/backfills?dag_id={dag_id}")["backfills"]
            if backfills and all(b.get("completed_at") for b in backfills):
                return
            time.sleep(1)
        raise RuntimeError(f"the backfill of {dag_id} did not complete within {timeout} s")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self.bao:
            self.bao.stop()
        if self.redis:
            self.redis.stop()
        if self.pg:
            self.pg.stop("immediate", remove=True)

    def research_rows(self, sql: str, database: str = "research") -> list[tuple[Any, ...]]:
        engine = sa.create_engine(self.pg.url(database))
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.text(sql))]
        engine.dispose()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the stack running after the demo")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: LocalExecutor; celery: CeleryExecutor with Redis and two workers")
    args = parser.parse_args()
    stack = FullStack(executor=args.executor)
    try:
        t0 = time.monotonic()
        stack.start()
        print(f"stack up in {stack.started_in:.0f} s ({args.executor} executor): API http://127.0.0.1:{stack.port}"
              f" (admin / {stack.password}), logs in {stack.work}")
        stack.wait_for_dag(DAG_ID)
        stack.trigger(DAG_ID, "2026-11-06T00:00:00Z")
        stack.wait_for_runs(DAG_ID, 1)
        for reprocess in ("none", "completed"):
            stack.backfill(DAG_ID, "2026-11-03", "2026-11-05", reprocess)
        runs = stack.wait_for_runs(DAG_ID, 4)
        print("runs:", ", ".join(f"{r['logical_date'][:10]} {r['state']}" for r in runs))
        print("target rows per day:", stack.research_rows(
            "SELECT visit_date, count(*) FROM patient_visits_pseudonymised GROUP BY 1 ORDER BY 1"))
        print("audit uses:", stack.research_rows(
            "SELECT outcome, count(*) FROM pseudonymise_audit GROUP BY 1 ORDER BY 1"))
        print(f"total wall time {time.monotonic() - t0:.0f} s")
        if args.keep:
            print("running; Ctrl-C stops everything")
            signal.pause()
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
