"""Real Airflow for the operator tests: a metadata database, and DAG runs in their own processes.

Each DAG run is ``airflow dags test`` (``dag.test()``) in a subprocess, so connections, the
secrets backend and the secret masker are configured exactly as a worker would see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pseudonymise.core.issuer import Issuer
from pseudonymise.core.tokens import new_jti, sign_claims

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
AIRFLOW = str(Path(sys.executable).parent / "airflow")


@dataclass
class DagRun:
    returncode: int
    output: str
    seconds: float


class AirflowWorld:
    """A metadata DB plus helpers to run DAGs with given connections."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PSEUDONYMISE"))}
        self.base_env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(HERE / "dags"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "PYTHONPATH": str(ROOT),
        })

    def env(self, connections: Mapping[str, Mapping[str, Any]], dags_folder: Path | None = None,
            extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(self.base_env)
        if dags_folder is not None:
            env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
        for conn_id, conn in connections.items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
        env.update(extra or {})
        return env

    def dags_test(self, dag_id: str, logical_date: str, connections: Mapping[str, Mapping[str, Any]], *,
                  spec: Mapping[str, Any] | None = None, dags_folder: Path | None = None,
                  extra_env: Mapping[str, str] | None = None, conf: Mapping[str, Any] | None = None,
                  timeout: float = 300) -> DagRun:
        env = self.env(connections, dags_folder, extra_env)
        if spec is not None:
            env["PSEUDONYMISE_TEST_DAG"] = json.dumps(spec)
        cmd = [AIRFLOW, "dags", "test", dag_id, logical_date]
        if conf:
            cmd += ["--conf", json.dumps(conf)]
        started = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        output = proc.stdout + proc.stderr
        (self.home / "runs").mkdir(exist_ok=True)
        (self.home / "runs" / f"{dag_id}-{logical_date}-{time.time_ns()}.log").write_text(output)
        return DagRun(proc.returncode, output, time.monotonic() - started)

    def all_logs(self) -> str:
        """Every log the runs wrote: task log files and captured process output."""
        texts = []
        for path in self.home.rglob("*.log"):
            texts.append(path.read_text(errors="replace"))
        for path in (self.home / "logs").rglob("*") if (self.home / "logs").exists() else []:
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


@pytest.fixture(scope="session")
def airflow_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowWorld]:
    home = tmp_path_factory.mktemp("airflow-home")
    world = AirflowWorld(home)
    proc = subprocess.run([AIRFLOW, "db", "migrate"], env=world.base_env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield world


def pg_conn(url: str) -> dict[str, Any]:
    u = sa.make_url(url)
    return {"conn_type": "postgres", "host": u.host, "port": u.port, "login": u.username, "schema": u.database}


def token_conn(token: str, issuer: Issuer, project: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"issuer_keys": json.dumps(issuer.public_keys().to_jwks())}
    if project:
        extra["project"] = project
    return {"conn_type": "pseudonymise", "password": token, "extra": extra}


def forged_token(issuer: Issuer, project: str, kind: str = "pseudonymisation", *, exp_offset: int = -3600,
                 nbf_offset: int = -7200) -> str:
    """A token signed by the real issuer key but with chosen validity (for expired/not-yet-valid cases)."""
    p = issuer.project(project)
    from pseudonymise.core.tokens import b64url_encode

    now = int(time.time())
    claims = {"iss": issuer.id, "jti": new_jti(), "sub": project, "kind": kind, "iat": now + nbf_offset,
              "nbf": now + nbf_offset, "exp": now + exp_offset, "method": p.method, "treatment": p.treatment,
              "retention_until": p.retention_until.strftime("%Y-%m-%dT%H:%M:%SZ"), "format": p.format.to_claim(),
              "key": b64url_encode(p.key)}
    if p.reversible:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        escrow = X25519PrivateKey.from_private_bytes(p.escrow_private_key)  # type: ignore[arg-type]
        claims["escrow_public_key"] = b64url_encode(escrow.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    return sign_claims(claims, issuer._private, issuer.kid)
