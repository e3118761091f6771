"""docker-compose.yaml is valid YAML with the services the README promises (no Docker engine here)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_declares_the_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "vault", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer"} <= set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__SECRETS__BACKEND"].endswith("VaultBackend")
    assert "./dags:/opt/airflow/dags" in services["airflow-scheduler"]["volumes"]
    assert (ROOT / services["airflow-scheduler"]["build"]["dockerfile"]).exists()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


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
        assert "./dags:/opt/airflow/dags" in worker["volumes"] and "./plugins:/opt/airflow/plugins" in worker["volumes"]
        hostnames.add(worker["hostname"])
    assert len(hostnames) == 2
    # every Airflow service reads the same broker; the image has the Celery provider
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == \
        services["airflow-worker-1"]["environment"]["AIRFLOW__CELERY__BROKER_URL"]
    assert "apache-airflow-providers-celery" in (ROOT / services["airflow-worker-1"]["build"]["dockerfile"]).read_text()
