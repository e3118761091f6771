"""The plugin's settings, from the ``[pseudonymise]`` section of Airflow's configuration.

Read on every request (``AIRFLOW__PSEUDONYMISE__*`` environment variables included), so a
changed setting needs no code reload; the defaults here match the provider's config section.
"""

from __future__ import annotations

from dataclasses import dataclass

from pseudonymise.core.errors import ConfigurationError

SECTION = "pseudonymise"

#: Option name -> (default, description), also published as the provider's config section.
OPTIONS: dict[str, tuple[str, str]] = {
    "audit_conn_id": ("", "Airflow connection of the database holding the audit and escrow tables that the UI "
                          "pages show and the HTTP API writes (for example the DAGs' target database)."),
    "audit_table": ("pseudonymise_audit", "Name of the audit table in that database."),
    "audit_schema": ("", "Schema of the audit and escrow tables (empty: the database's default)."),
    "expiry_warning_days": ("14", "Tokens expiring within this many days are highlighted on the Tokens page."),
    "api_max_rows": ("1000", "Most records one HTTP API call may pseudonymise, re-pseudonymise or reverse."),
    "audit_signing_conn_id": ("", "Airflow connection of the audit signing key and witnesses (see "
                                  "AuditCheckpointOperator): when set, every token use through the HTTP API is "
                                  "followed by a signed checkpoint of the audit chain. Empty: only the scheduled "
                                  "checkpoints."),
    "api_allow_reversal": ("False", "Allow reversal through the HTTP API at all (audited with the calling user). "
                                    "Off by default: originals then only ever reach a target a DAG names. When on, "
                                    "each reversal is a request that a second user approves (four eyes)."),
    "reverse_request_ttl_minutes": ("1440", "How long a reversal request of the HTTP API waits for approval, and "
                                            "how long its requester then has to execute it once."),
}


@dataclass(frozen=True)
class PluginConfig:
    audit_conn_id: str | None
    audit_table: str
    audit_schema: str | None
    expiry_warning_days: int
    api_max_rows: int
    api_allow_reversal: bool
    audit_signing_conn_id: str | None = None
    reverse_request_ttl_minutes: int = 1440

    @classmethod
    def load(cls) -> PluginConfig:
        # Imported here: the provider info (below) is read while Airflow's configuration loads.
        from airflow.configuration import conf

        def get(name: str) -> str:
            return (conf.get(SECTION, name, fallback=OPTIONS[name][0]) or "").strip()

        def integer(name: str, minimum: int) -> int:
            try:
                value = int(get(name))
            except ValueError:
                value = minimum - 1
            if value < minimum:
                raise ConfigurationError(f"[{SECTION}] {name} must be an integer of at least {minimum}")
            return value

        reversal = get("api_allow_reversal").lower()
        if reversal not in ("true", "false", "1", "0", "yes", "no", ""):
            raise ConfigurationError(f"[{SECTION}] api_allow_reversal must be True or False")
        return cls(
            audit_conn_id=get("audit_conn_id") or None,
            audit_table=get("audit_table") or OPTIONS["audit_table"][0],
            audit_schema=get("audit_schema") or None,
            expiry_warning_days=integer("expiry_warning_days", 0),
            api_max_rows=integer("api_max_rows", 1),
            api_allow_reversal=reversal in ("true", "1", "yes"),
            audit_signing_conn_id=get("audit_signing_conn_id") or None,
            reverse_request_ttl_minutes=integer("reverse_request_ttl_minutes", 1),
        )


def provider_config() -> dict[str, object]:
    """The ``config`` entry of the provider info, so ``airflow config list`` documents the section."""
    return {
        SECTION: {
            "description": "The pseudonymisation plugin's UI pages and HTTP API in the Airflow API server.\n",
            "options": {
                name: {"description": description + "\n", "version_added": "0.1.0",
                       "type": "boolean" if name == "api_allow_reversal" else
                       "integer" if default.isdigit() else "string",
                       "example": None, "default": default or None}
                for name, (default, description) in OPTIONS.items()
            },
        }
    }
