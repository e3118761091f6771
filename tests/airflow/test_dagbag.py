"""Every example DAG imports cleanly in a real DagBag, and the provider registers its connection type."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.airflow.conftest import AIRFLOW, ROOT, AirflowWorld

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

SCRIPT = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {k: str(v)[:500] for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids)}))
"""


def test_example_dags_import_without_errors(airflow_world: AirflowWorld) -> None:
    env = {**airflow_world.base_env, "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "dags")], env=env,
                          capture_output=True, text=True, check=True)
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"] == ["pseudonymise_audit_checkpoint", "pseudonymise_audit_reversal",
                              "pseudonymise_patient_extract",
                              "pseudonymise_research_extract", "pseudonymise_retention_purge",
                              "pseudonymise_token_expiry_check",
                              "pseudonymise_vendor_share", "pseudonymise_visits_by_key_range"]


def test_provider_and_connection_type_are_registered(airflow_world: AirflowWorld) -> None:
    providers = subprocess.run([AIRFLOW, "providers", "list", "--output", "json"], env=airflow_world.base_env,
                               capture_output=True, text=True, check=True).stdout
    assert "airflow-provider-pseudonymise" in providers
    hooks = subprocess.run([AIRFLOW, "providers", "hooks", "--output", "json"], env=airflow_world.base_env,
                           capture_output=True, text=True, check=True).stdout
    assert "pseudonymise.hooks.PseudonymisationTokenHook" in hooks
    fields = subprocess.run(
        [sys.executable, "-c",
         "from airflow.providers_manager import ProvidersManager as P; import json;"
         "b = P().field_behaviours.get('pseudonymise'); print(json.dumps(b))"],
        env=airflow_world.base_env, capture_output=True, text=True, check=True).stdout
    assert '"Token"' in fields and "hidden_fields" in fields
