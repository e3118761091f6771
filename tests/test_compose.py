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
