"""A task that logs a token's secrets in every form the code produces, to check the secret masker.

It reads each token through :class:`PseudonymisationTokenHook` (which registers it with the masker),
then logs the token, its payload segment and every key claim as base64url, base64 and hex: the test
reading the task log must find none of them, only the line counting them.
Connections: ``PSEUDONYMISE_TEST_MASKING`` = ``{"conn_ids": [...]}``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from datetime import datetime

from airflow.sdk import DAG, task
from pseudonymise.hooks import PseudonymisationTokenHook

log = logging.getLogger(__name__)


def _forms(key: bytes) -> list[str]:
    std = base64.b64encode(key).decode()
    return [base64.urlsafe_b64encode(key).decode().rstrip("="), std, key.hex(), key.hex().upper()]


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


with DAG(dag_id="pseudonymise_token_log", schedule=None, start_date=datetime(2026, 11, 1), catchup=False):

    @task
    def leak() -> None:
        count = 0
        for conn_id in json.loads(os.environ.get("PSEUDONYMISE_TEST_MASKING", "{}")).get("conn_ids", []):
            token = PseudonymisationTokenHook(conn_id).get_token()
            payload = token.split(".")[1]
            claims = json.loads(_decode(payload))
            keys = [_decode(claims[k]) for k in ("key", "escrow_public_key", "escrow_private_key") if k in claims]
            keys += [_decode(v) for v in claims.get("verify_keys", {}).values()]
            forms = [token, payload, *(form for key in keys for form in _forms(key))]
            for form in forms:
                log.info("token form: %s", form)
                print(f"printed token form: {form}")
            log.info("claims as read: %s", json.dumps(claims))
            count += len(forms)
        log.info("logged %d secret forms", count)

    leak()
