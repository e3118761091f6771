"""The Airflow plugin: UI pages and an HTTP API in the Airflow 3 API server, behind Airflow's auth.

Registered through the ``airflow.plugins`` entry point ``pseudonymise.plugin:PseudonymisePlugin``,
so installing the package is enough. The class (and with it FastAPI and the API server's security
modules) is imported only when Airflow asks for it: the provider info reads
:mod:`pseudonymise.plugin.config` while Airflow's own configuration loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PseudonymisePlugin"]


def __getattr__(name: str) -> Any:
    if name == "PseudonymisePlugin":
        from pseudonymise.plugin.registration import PseudonymisePlugin

        return PseudonymisePlugin
    raise AttributeError(name)
