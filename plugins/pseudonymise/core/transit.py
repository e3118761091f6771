"""Key custody in Vault Transit: HMAC-SHA256 computed by Vault, the key never leaves it.

For a project created with ``custody="transit"``, tokens carry a reference to a Transit key
instead of the key. The pseudonymiser then sends whole batches of messages (the same
``pseudonymise/v1`` message layout as the local path) to Transit's batch ``hmac`` endpoint, in
requests bounded in items and bytes so the server's request limits are respected.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from pseudonymise.core.errors import ServiceUnavailableError, TokenError, is_unreachable

#: Items and bytes per Transit request. OpenBao refuses JSON bodies of more than 1,000 strings by
#: default ("high complexity"; each item is two strings), and both servers cap requests at 32 MiB.
MAX_ITEMS = 400
MAX_BYTES = 4 * 1024 * 1024


class TransitUnavailableError(TokenError):
    """Vault Transit could not compute the HMACs (unreachable, forbidden, or no such key)."""


class TransitUnreachableError(TransitUnavailableError, ServiceUnavailableError):
    """Vault Transit could not be reached: a retry may succeed."""


class TransitMac:
    """Batch HMAC-SHA256 through the Transit key ``name`` on ``mount``, with an ``hvac.Client``."""

    def __init__(self, client: Any, mount: str, name: str, key_version: int | None = None) -> None:
        self.client, self.mount, self.name, self.key_version = client, mount, name, key_version
        self.requests = 0

    def macs(self, messages: Sequence[bytes]) -> list[bytes]:
        out: list[bytes] = []
        chunk: list[dict[str, str]] = []
        size = 0
        for message in messages:
            encoded = base64.b64encode(message).decode("ascii")
            if chunk and (len(chunk) >= MAX_ITEMS or size + len(encoded) > MAX_BYTES):
                out.extend(self._request(chunk))
                chunk, size = [], 0
            chunk.append({"input": encoded})
            size += len(encoded) + 16
        if chunk:
            out.extend(self._request(chunk))
        return out

    def _request(self, batch: list[dict[str, str]]) -> list[bytes]:
        try:
            # hvac's generate_hmac has no batch_input: post to the batch endpoint through its adapter.
            body: dict[str, Any] = {"batch_input": batch}
            if self.key_version is not None:
                body["key_version"] = self.key_version
            response = self.client.adapter.post(f"/v1/{self.mount}/hmac/{self.name}/sha2-256", json=body)
        except Exception as exc:  # hvac/requests raise many types; none may quote the data
            raise (TransitUnreachableError if is_unreachable(exc) else TransitUnavailableError)(
                f"Vault Transit could not compute HMACs with key {self.name!r} on mount {self.mount!r} "
                f"({exc.__class__.__name__}); check that Vault is reachable and the policy allows transit/hmac"
            ) from exc
        self.requests += 1
        results = response["data"]["batch_results"]
        if len(results) != len(batch) or any("error" in r and r["error"] for r in results):
            raise TransitUnavailableError(f"Vault Transit refused part of a batch for key {self.name!r}")
        return [base64.b64decode(r["hmac"].split(":", 2)[2]) for r in results]
