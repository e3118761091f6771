"""What the plugin registers with Airflow: its FastAPI app and the navigation entries.

The app is mounted at ``/pseudonymise``; the navigation gets the five pages (under Plugins →
Pseudonymisation, each shown inside the Airflow UI) and every task instance a "Pseudonymisation
audit" tab with its own audit rows, the page the operators' extra link opens.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.plugins_manager import AirflowPlugin

from pseudonymise.plugin.app import PREFIX, app

CATEGORY = "Pseudonymisation"


class PseudonymisePlugin(AirflowPlugin):
    name = "pseudonymise"
    fastapi_apps: list[Any] = [{"app": app, "url_prefix": PREFIX, "name": "Pseudonymisation"}]  # noqa: RUF012
    external_views: list[Any] = [  # noqa: RUF012
        {"name": "Audit trail", "href": f"{PREFIX}/audit", "url_route": "pseudonymise-audit", "category": CATEGORY},
        {"name": "Tokens", "href": f"{PREFIX}/tokens", "url_route": "pseudonymise-tokens", "category": CATEGORY},
        {"name": "Reversal requests", "href": f"{PREFIX}/reverse-requests", "url_route": "pseudonymise-requests",
         "category": CATEGORY},
        {"name": "Risk", "href": f"{PREFIX}/risk", "url_route": "pseudonymise-risk", "category": CATEGORY},
        {"name": "Charts", "href": f"{PREFIX}/charts", "url_route": "pseudonymise-charts", "category": CATEGORY},
        {"name": "Pseudonymisation audit", "destination": "task_instance", "url_route": "pseudonymise-task",
         "href": f"{PREFIX}/audit?dag_id={{DAG_ID}}&task_id={{TASK_ID}}&run_id={{RUN_ID}}&map_index={{MAP_INDEX}}"},
    ]

