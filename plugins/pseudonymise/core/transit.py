"""Key custody in Vault Transit: HMAC-SHA256 computed by Vault, the key never leaves it.

For a project created with ``custody="transit"``, tokens carry a reference to a Transit key
instead of the key. The pseudonymiser then sends whole batches of messages (the same
``pseudonymise/v1`` message layout as the local path) to Transit's batch ``hmac`` endpoint, in
requests bounded in items and bytes so the server's request limits are respected, through the
plugin's one Vault client (:class:`~pseudonymise.core.vault.VaultClient`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from pseudonymise.core.errors import TransitUnavailableError, TransitUnreachableError
from pseudonymise.core.vault import VaultCallError, VaultClient

#: Items and bytes per Transit request. OpenBao refuses JSON bodies of more than 1,000 strings by
#: default ("high complexity"; each item is two strings), and both servers cap requests at 32 MiB.
MAX_ITEMS = 400
MAX_BYTES = 4 * 1024 * 1024


class TransitMac:
    """Batch HMAC-SHA256 through the Transit key ``name`` on ``mount``.

    :param client: the Vault client (a :class:`~pseudonymise.core.vault.VaultClient`, or an ``hvac.Client``).
    :param key_version: the key version the token names (default: Vault's latest).
    """

    def __init__(self, client: Any, mount: str, name: str, key_version: int | None = None) -> None:
        self.client = VaultClient.of(client)
        self.mount, self.name, self.key_version = mount, name, key_version
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
            results = self.client.transit_hmac(self.mount, self.name, batch, self.key_version)
        except VaultCallError as exc:
            raise (TransitUnreachableError if exc.unreachable else TransitUnavailableError)(
                f"Vault Transit could not compute HMACs with key {self.name!r} on mount {self.mount!r} "
                f"({exc.cause}); check that Vault is reachable and the policy allows transit/hmac"
            ) from exc
        self.requests += 1
        if len(results) != len(batch) or any("error" in r and r["error"] for r in results):
            raise TransitUnavailableError(f"Vault Transit refused part of a batch for key {self.name!r}")
        return [base64.b64decode(r["hmac"].split(":", 2)[2]) for r in results]
