"""Vault (HashiCorp Vault or OpenBao) behind one small client: the only module that imports ``hvac``.

:class:`VaultClient` offers the few calls the plugin makes (Transit HMAC, sign and keys; KV v2
metadata, versions and check-and-set writes) and turns every failure into a :class:`VaultCallError`
that says how the call failed (unreachable, nothing at the path, a check-and-set conflict) and the
class of the original error, never what was sent. Callers turn it into their own error, retryable
when Vault could not be reached. The Airflow layer opens the client through the hashicorp
provider's ``VaultHook`` (a Vault connection); the CLI from ``VAULT_ADDR`` and ``VAULT_TOKEN``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pseudonymise.core.errors import PseudonymiseError

_T = TypeVar("_T")


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says a service could not be reached (connection refused or reset, timeout, Vault
    sealed or down, a 5xx answer), as opposed to a refusal that a retry cannot change (403, 404)."""
    if isinstance(exc, VaultCallError):
        return exc.unreachable
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests comes with hvac and Airflow
        pass
    try:
        from hvac import exceptions as vault

        if isinstance(exc, (vault.VaultDown, vault.InternalServerError, vault.BadGateway, vault.VaultNotInitialized)):
            return True
    except ImportError:  # pragma: no cover - hvac is a dependency of the Vault extras only
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


class VaultCallError(PseudonymiseError):
    """A Vault call failed. Callers re-raise it as their own error; its message names only the call.

    :ivar cause: the class name of the original error (``ConnectionError``, ``Forbidden`` …), for messages.
    :ivar unreachable: Vault could not be reached: a retry may succeed.
    :ivar missing: nothing is at the path (no such key or secret, or a deleted version).
    :ivar conflict: a KV check-and-set write lost to another writer.
    """

    def __init__(self, action: str, exc: BaseException) -> None:
        super().__init__(f"Vault could not {action} ({exc.__class__.__name__})")
        self.cause = exc.__class__.__name__
        self.unreachable = is_unreachable(exc)
        invalid_path = exc.__class__.__name__ == "InvalidPath"
        self.missing = invalid_path and not self.unreachable
        self.conflict = exc.__class__.__name__ == "InvalidRequest" and "check-and-set" in str(exc)


class VaultClient:
    """The plugin's calls to one Vault server, through an ``hvac.Client``.

    :param client: an ``hvac.Client`` (from ``VaultHook.get_conn()``, or :meth:`connect`), or a
        :class:`VaultClient`, which is used as it is.
    """

    def __init__(self, client: Any) -> None:
        self.hvac = client.hvac if isinstance(client, VaultClient) else client

    @classmethod
    def of(cls, client: Any) -> VaultClient:
        """``client`` itself when it is a :class:`VaultClient`, else one around the ``hvac.Client``."""
        return client if isinstance(client, VaultClient) else cls(client)

    @classmethod
    def connect(cls, url: str, token: str, *, namespace: str | None = None, timeout: float = 30) -> VaultClient:
        """A client of the server at ``url`` authenticated by the Vault ``token``."""
        import hvac

        return cls(hvac.Client(url=url, token=token, namespace=namespace, timeout=timeout))

    @classmethod
    def from_environment(cls) -> VaultClient | None:
        """A client from ``VAULT_ADDR`` and ``VAULT_TOKEN``, or ``None`` when either is not set."""
        addr, token = os.environ.get("VAULT_ADDR"), os.environ.get("VAULT_TOKEN")
        if not addr or not token:
            return None
        return cls.connect(addr, token)

    def _call(self, action: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except Exception as exc:  # hvac and requests raise many types; none may quote what was sent
            raise VaultCallError(action, exc) from exc

    # --- Transit --------------------------------------------------------------------------------
    def transit_hmac(self, mount: str, name: str, batch: list[dict[str, str]],
                     key_version: int | None = None) -> list[dict[str, Any]]:
        """HMAC-SHA256 of each ``{"input": base64}`` of ``batch`` with the Transit key ``mount/name``, in
        one request (hvac's ``generate_hmac`` has no batch input: posted through its adapter)."""
        body: dict[str, Any] = {"batch_input": batch}
        if key_version is not None:
            body["key_version"] = key_version
        return self._call("compute HMACs", lambda: list(self.hvac.adapter.post(
            f"/v1/{mount}/hmac/{name}/sha2-256", json=body)["data"]["batch_results"]))

    def transit_key(self, mount: str, name: str) -> dict[str, Any]:
        """What Vault tells about the Transit key ``mount/name`` (type, versions, public keys)."""
        return self._call("read the key", lambda: dict(
            self.hvac.secrets.transit.read_key(name=name, mount_point=mount)["data"]))

    def transit_create_key(self, mount: str, name: str, key_type: str) -> None:
        """Create the Transit key ``mount/name`` of ``key_type`` (never exportable)."""
        self._call(f"create an {key_type} key", lambda: self.hvac.secrets.transit.create_key(
            name=name, key_type=key_type, exportable=False, mount_point=mount))

    def transit_rotate_key(self, mount: str, name: str) -> None:
        """Give the Transit key ``mount/name`` a new version (earlier versions stay usable for verification)."""
        self._call("rotate the key", lambda: self.hvac.secrets.transit.rotate_key(name=name, mount_point=mount))

    def transit_sign(self, mount: str, name: str, message: bytes) -> str:
        """Vault's signature of ``message`` with the Transit key ``mount/name``: ``vault:v<version>:<base64>``."""
        encoded = base64.b64encode(message).decode("ascii")
        return self._call("sign", lambda: str(self.hvac.secrets.transit.sign_data(
            name=name, hash_input=encoded, mount_point=mount)["data"]["signature"]))

    # --- KV version 2 ---------------------------------------------------------------------------
    def kv_metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        """The metadata of the KV v2 secret at ``mount/path`` (versions, current version); ``None`` if absent."""
        try:
            return self._call("read the metadata", lambda: dict(self.hvac.secrets.kv.v2.read_secret_metadata(
                path=path, mount_point=mount)["data"]))
        except VaultCallError as exc:
            if exc.missing:
                return None
            raise

    def kv_version(self, mount: str, path: str, version: int | None = None) -> dict[str, Any] | None:
        """The data of a version (default: the current one) of the KV v2 secret at ``mount/path``; ``None``
        when it does not exist or was deleted or destroyed."""
        try:
            return self._call("read", lambda: dict(self.hvac.secrets.kv.v2.read_secret_version(
                path=path, version=version, mount_point=mount, raise_on_deleted_version=True)["data"]["data"]))
        except VaultCallError as exc:
            if exc.missing:
                return None
            raise

    def kv_list(self, mount: str, path: str) -> list[str]:
        """The names under the KV v2 folder ``mount/path`` (sub-folders end with ``/``); empty if there is none."""
        try:
            return self._call("list", lambda: list(self.hvac.secrets.kv.v2.list_secrets(
                path=path, mount_point=mount)["data"]["keys"]))
        except VaultCallError as exc:
            if exc.missing:
                return []
            raise

    def kv_write(self, mount: str, path: str, secret: Mapping[str, Any], cas: int | None = None) -> None:
        """Write ``secret`` as a new version at ``mount/path``; with ``cas``, only if the current version is
        ``cas`` (0: only if there is none), else :class:`VaultCallError` with ``conflict`` set."""
        self._call("write", lambda: self.hvac.secrets.kv.v2.create_or_update_secret(
            path=path, secret=dict(secret), cas=cas, mount_point=mount))

    def __repr__(self) -> str:
        return f"VaultClient({getattr(self.hvac, 'url', '?')!r})"
