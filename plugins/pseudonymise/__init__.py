"""Pseudonymisation for Apache Airflow: tokens, pseudonyms, sealed escrow and a tamper-evident audit.

``pseudonymise.core`` has no Airflow import and backs the ``pseudonymise`` CLI; ``hooks`` and
``operators`` bring it into DAGs.
"""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata Airflow reads through the ``apache_airflow_provider`` entry point."""
    from pseudonymise.plugin.config import provider_config

    return {
        "package-name": "airflow-provider-pseudonymise",
        "name": "Pseudonymise",
        "description": "Pseudonymise identifiers with project tokens, with sealed escrow and a tamper-evident audit.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Pseudonymise",
                "external-doc-url": "https://airflow.apache.org/docs/",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "Pseudonymise", "python-modules": ["pseudonymise.hooks"]}],
        "operators": [{"integration-name": "Pseudonymise", "python-modules": ["pseudonymise.operators"]}],
        "extra-links": ["pseudonymise.operators.AuditTrailLink"],
        # The UI pages and HTTP API are an Airflow plugin registered by the ``airflow.plugins`` entry
        # point, not listed under "plugins" here: Airflow would then load it twice when
        # [core] lazy_discover_providers is off, and report the second as an import error.
        "config": provider_config(),
        "connection-types": [
            {
                "connection-type": "pseudonymise",
                "hook-class-name": "pseudonymise.hooks.PseudonymisationTokenHook",
                "hook-name": "Pseudonymisation token",
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "schema", "login", "port", "extra"],
                    "relabeling": {"password": "Token"},
                    "placeholders": {"password": "the token issued for the project (leave empty when read from Vault)"},
                },
                "conn-fields": {
                    "issuer_keys": {
                        "label": "Trusted issuer keys (JWKS)",
                        "schema": {"type": ["string", "null"]},
                        "description": "Output of `pseudonymise issuer public-key`.",
                    },
                    "project": {
                        "label": "Project",
                        "schema": {"type": ["string", "null"]},
                        "description": "Refuse tokens of any other project.",
                    },
                    "vault_conn_id": {
                        "label": "Vault connection id",
                        "schema": {"type": ["string", "null"]},
                        "description": "Read the token from HashiCorp Vault through this connection.",
                    },
                    "vault_path": {"label": "Vault KV v2 path", "schema": {"type": ["string", "null"]}},
                    "transit_vault_conn_id": {
                        "label": "Vault connection for Transit custody",
                        "schema": {"type": ["string", "null"]},
                        "description": "For projects whose key never leaves Vault Transit.",
                    },
                    "vault_key": {
                        "label": "Vault secret key",
                        "schema": {"type": ["string", "null"], "default": "token"},
                    },
                },
            }
        ],
    }
