"""Airflow finds the plugin on its own: the entry point, the app it mounts, the navigation it adds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from airflow import plugins_manager
from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse
from pseudonymise import get_provider_info
from pseudonymise.operators import AUDIT_PAGE

from tests.plugin.conftest import AIRFLOW, Api

ROOT = Path(__file__).resolve().parents[2]


def test_airflow_loads_the_plugin_from_the_installed_package(api: Api) -> None:
    plugins, errors = plugins_manager._get_plugins()
    ours = [p for p in plugins if p.name == "pseudonymise"]
    assert len(ours) == 1
    assert not [e for e in errors if "pseudonymise" in e], (
        f"{errors}: Airflow sees the package twice; a `pip install -e .` leaves plugins/*.egg-info on sys.path, "
        "which scripts/setup.sh removes")
    assert "airflow-provider-pseudonymise" in str(ours[0].source)
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [a["url_prefix"] for a in apps if a["name"] == "Pseudonymisation"] == ["/pseudonymise"]


def test_navigation_entries_are_valid_external_views() -> None:
    from pseudonymise.plugin import PseudonymisePlugin

    views = [ExternalViewResponse.model_validate(v) for v in PseudonymisePlugin.external_views]
    assert {v.destination for v in views} == {"nav", "task_instance"}
    assert all(v.href.startswith("/pseudonymise/") and v.url_route for v in views)
    task_view = next(v for v in views if v.destination == "task_instance")
    assert task_view.href.startswith(AUDIT_PAGE + "?")  # the page the operators' extra link opens
    assert all(p in task_view.href for p in ("{DAG_ID}", "{TASK_ID}", "{RUN_ID}", "{MAP_INDEX}"))


def test_the_provider_publishes_the_config_section_not_a_second_plugin() -> None:
    info = get_provider_info()
    assert "plugins" not in info  # the entry point registers it; listing it here too loads it twice
    options = info["config"]["pseudonymise"]["options"]
    assert {name: o["default"] for name, o in options.items()} == {
        "audit_conn_id": None, "audit_table": "pseudonymise_audit", "audit_schema": None,
        "expiry_warning_days": "14", "api_max_rows": "1000", "api_allow_reversal": "False",
        "audit_signing_conn_id": None, "reverse_request_ttl_minutes": "1440"}


@pytest.mark.slow
def test_airflow_reports_the_plugin_and_its_defaults(api: Api) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__PSEUDONYMISE")}
    listed = subprocess.run([AIRFLOW, "plugins", "--output", "json"], env=env, capture_output=True, text=True,
                            check=True, timeout=120)
    plugin = next(p for p in json.loads(listed.stdout) if p["name"] == "pseudonymise")
    assert [v["name"] for v in plugin["external_views"]] == ["Audit trail", "Tokens", "Reversal requests", "Risk",
                                                           "Charts", "Pseudonymisation audit"]
    value = subprocess.run([AIRFLOW, "config", "get-value", "pseudonymise", "expiry_warning_days"], env=env,
                           capture_output=True, text=True, check=True, timeout=120)
    assert value.stdout.strip() == "14"


@pytest.mark.slow
def test_loaded_once_when_the_repository_is_the_plugins_folder(tmp_path: Path) -> None:
    """docker-compose.yaml mounts plugins/ as Airflow's plugins folder while the package is installed."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins")})
    script = ("import json; from airflow import plugins_manager as m; p, e = m._get_plugins(); "
              "print(json.dumps([[x.name for x in p], e]))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    names, errors = json.loads(out.strip().splitlines()[-1])
    assert names.count("pseudonymise") == 1 and errors == {}
