"""Pseudonymisation for Apache Airflow: tokens, pseudonyms, sealed escrow and a tamper-evident audit.

``pseudonymise.core`` has no Airflow import and backs the ``pseudonymise`` CLI; ``hooks`` and
``operators`` bring it into DAGs.
"""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""
    return {
        "package-name": "airflow-provider-pseudonymise",
        "name": "Pseudonymise",
        "description": "Pseudonymise identifiers with project tokens, with sealed escrow and a tamper-evident audit.",
        "versions": [__version__],
        "connection-types": [
            {
                "connection-type": "pseudonymise",
                "hook-class-name": "pseudonymise.hooks.PseudonymisationTokenHook",
            }
        ],
    }
