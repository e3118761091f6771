"""Airflow hooks: where tokens come from (a connection, HashiCorp Vault) and where data lives.

:class:`PseudonymisationTokenHook` reads a token from a ``pseudonymise`` connection: its
password, or a HashiCorp Vault KV secret the connection points to (through the hashicorp
provider's ``VaultHook``). A connection served by Airflow's ``VaultBackend`` secrets backend is
just a connection, so it works unchanged. It is the operators' and the HTTP API's
:class:`~pseudonymise.core.use.TokenSource`: every token is registered with Airflow's secret masker
the moment it is read. :class:`SqlDataHook` turns any SQL connection into a SQLAlchemy engine, built
by the connection's own provider hook, for sources, targets and the audit/escrow store.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from functools import cached_property
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret
from sqlalchemy.engine import Engine

from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import DataIOError, TokenError, TokenUnavailableError, VaultUnreachableError
from pseudonymise.core.files import open_sink
from pseudonymise.core.tokens import Token, TrustedKeys, secret_parts, verify_token
from pseudonymise.core.transit import TransitMac
from pseudonymise.core.vault import VaultClient, is_unreachable

if TYPE_CHECKING:
    from pseudonymise.core.approval import Approval


def _unavailable(message: str, exc: BaseException) -> TokenUnavailableError:
    """The error for a failed Vault call: retryable when Vault could not be reached."""
    return (VaultUnreachableError if is_unreachable(exc) else TokenUnavailableError)(message)


def _mask_token(token: str) -> None:
    """Mask the token, its payload segment and every key claim in every encoding (docs/design.md §3), before
    the token is verified: a token that is then refused must not reach a log either."""
    for part in secret_parts(token):
        mask_secret(part)


def vault_client(vault_conn_id: str) -> VaultClient:
    """The plugin's Vault client for a HashiCorp Vault connection, opened by the hashicorp provider's
    ``VaultHook`` (its authentication methods, namespaces and TLS settings). Raises what the hook raises."""
    from airflow.providers.hashicorp.hooks.vault import VaultHook

    return VaultClient(VaultHook(vault_conn_id=vault_conn_id).get_conn())


class PseudonymisationTokenHook(BaseHook):
    """Reads a pseudonymisation, reverse or secondary token and the issuer keys that verify it.

    Connection fields:

    * ``password``: the token (unless the extras point to Vault);
    * extra ``issuer_keys``: the trusted issuer public keys (JWKS from ``pseudonymise issuer public-key``);
    * extra ``project``: optional, refuse tokens of any other project;
    * extras ``vault_conn_id``, ``vault_path``, ``vault_key`` (default ``token``): read the token from
      the KV secret at ``vault_path`` through that Vault connection instead of the password;
    * extra ``transit_vault_conn_id``: for a project whose key is held in Vault Transit, the Vault
      connection allowed to compute HMACs with it.

    :param pseudonymise_conn_id: the connection id (default ``pseudonymise_default``).
    :param require_conn_type: refuse, without reading its password, a connection that is not of type
        ``pseudonymise`` (the HTTP API, where a caller names the connection, sets it).
    """

    conn_name_attr = "pseudonymise_conn_id"
    default_conn_name = "pseudonymise_default"
    conn_type = "pseudonymise"
    hook_name = "Pseudonymisation token"

    def __init__(self, pseudonymise_conn_id: str = default_conn_name, *, require_conn_type: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pseudonymise_conn_id = pseudonymise_conn_id
        self.require_conn_type = require_conn_type
        #: Whether the connection itself could not be read (no such connection, secrets backend down).
        self.connection_unreadable = False

    @cached_property
    def connection(self) -> Any:
        try:
            return self.get_connection(self.pseudonymise_conn_id)
        except Exception as exc:  # Airflow raises several types for a missing connection
            self.connection_unreadable = True
            raise TokenUnavailableError(
                f"connection {self.pseudonymise_conn_id!r} could not be read ({exc.__class__.__name__}); "
                "create it with type 'pseudonymise' (or check the secrets backend)"
            ) from exc

    @property
    def extras(self) -> dict[str, Any]:
        return self.connection.extra_dejson or {}

    @property
    def project(self) -> str | None:
        """The project the connection's tokens must belong to (extra ``project``); ``None``: any."""
        return self.extras.get("project") or None

    def get_token(self) -> str:
        """The raw token, masked in logs from this moment on."""
        connection = self.connection
        if self.require_conn_type and connection.conn_type != self.conn_type:
            # Never read, fingerprint or audit another kind of connection's password as if it were a token.
            raise TokenUnavailableError(
                f"connection {self.pseudonymise_conn_id!r} is of type {connection.conn_type!r}; a token must be "
                "held in a connection of type 'pseudonymise'")
        extras = self.extras
        if extras.get("vault_conn_id") or extras.get("vault_path"):
            token = self._token_from_vault(extras)
        else:
            token = connection.password
            if not token:
                raise TokenUnavailableError(
                    f"connection {self.pseudonymise_conn_id!r} holds no token: put it in the password field, "
                    "or set the extras vault_conn_id and vault_path"
                )
        token = token.strip()
        _mask_token(token)
        return token

    def _token_from_vault(self, extras: dict[str, Any]) -> str:
        from airflow.providers.hashicorp.hooks.vault import VaultHook

        vault_conn_id, path = extras.get("vault_conn_id"), extras.get("vault_path")
        key = extras.get("vault_key") or "token"
        if not vault_conn_id or not path:
            raise TokenUnavailableError(
                f"connection {self.pseudonymise_conn_id!r} names Vault but lacks vault_conn_id or vault_path"
            )
        try:  # the provider's KV read: it knows the connection's KV version and mount
            secret = VaultHook(vault_conn_id=vault_conn_id).get_secret(secret_path=path)
        except Exception as exc:  # hvac/requests raise many types; the message must not quote the token
            raise _unavailable(
                f"the token could not be read from Vault (connection {vault_conn_id!r}, path {path!r}): "
                f"{exc.__class__.__name__}; check that Vault is reachable and the policy allows reading the path", exc
            ) from exc
        if not secret or not isinstance(secret.get(key), str):
            raise TokenUnavailableError(
                f"the Vault secret at {path!r} (connection {vault_conn_id!r}) has no text key {key!r}; "
                "store the token under that key or set the extra vault_key"
            )
        return str(secret[key])

    def get_trusted_keys(self) -> TrustedKeys:
        keys = self.extras.get("issuer_keys")
        if not keys:
            raise TokenUnavailableError(
                f"connection {self.pseudonymise_conn_id!r} has no issuer_keys extra; paste the JWKS printed by "
                "`pseudonymise issuer public-key` so tokens can be verified"
            )
        return TrustedKeys.from_jwks(keys)

    def get_mac_service(self, token: Token) -> TransitMac | None:
        """The Vault Transit HMAC client for a token whose key never leaves Vault (``key_ref``), through
        the connection's ``transit_vault_conn_id`` (a HashiCorp Vault connection); ``None`` for a token
        that carries its key."""
        if token.key_ref is None:
            return None
        conn_id = self.extras.get("transit_vault_conn_id")
        if not conn_id:
            raise TokenUnavailableError(
                f"token {token.jti}'s key is held in Vault Transit; set the extra transit_vault_conn_id of connection "
                f"{self.pseudonymise_conn_id!r} to a Vault connection allowed to use {token.key_ref['mount']}/hmac"
            )
        try:
            client = vault_client(conn_id)
        except Exception as exc:  # hvac/requests raise many types
            raise _unavailable(f"Vault connection {conn_id!r} could not be opened ({exc.__class__.__name__})", exc) from exc
        return TransitMac(client, token.key_ref["mount"], token.key_ref["name"], key_version=token.key_version)

    def mask(self, secret: str) -> None:
        """Register ``secret`` with Airflow's secret masker."""
        mask_secret(secret)

    def test_connection(self) -> tuple[bool, str]:
        """Verify the token (signature, validity) without using it; says nothing secret."""
        try:
            token = verify_token(self.get_token(), self.get_trusted_keys(), project=self.project)
        except TokenError as exc:
            return False, str(exc)
        return True, (f"{token.kind} token {token.jti} for project {token.project!r}, valid until "
                      f"{token.expires.isoformat()}")


#: Extras that say how to build the engine's URL, never arguments for the database driver.
IGNORED_EXTRAS = frozenset({"sqlalchemy_url", "sqlalchemy_scheme", "sqlalchemy_query"})
#: psycopg2 on PostgreSQL: COPY both ways and the cancel of a running COPY are psycopg2's calls.
_POSTGRES_HOOK_PARAMS = {"sqlalchemy_scheme": "postgresql+psycopg2"}


class SqlDataHook(BaseHook):
    """A SQLAlchemy engine for any SQL connection, built by the connection's own provider hook.

    The engine comes from the provider hook's ``get_sqlalchemy_engine()`` (``postgres`` connections
    through psycopg2, which PostgreSQL COPY needs; every extra but the provider's ignore list and
    ``sqlalchemy_*`` goes to the driver, ``connect_timeout`` 10 s unless given). ``sqlite``
    connections (the embedded default, no provider needed) take the database file from ``host``; an
    extra ``sqlalchemy_url`` overrides everything. One engine per hook, made on first use.

    :param sql_conn_id: the connection id.
    """

    conn_name_attr = "sql_conn_id"
    hook_name = "Pseudonymise SQL data"

    def __init__(self, sql_conn_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sql_conn_id = sql_conn_id

    def get_engine(self) -> Engine:
        return self.engine

    @cached_property
    def engine(self) -> Engine:
        try:
            conn = self.get_connection(self.sql_conn_id)
        except Exception as exc:
            raise DataIOError(f"connection {self.sql_conn_id!r} could not be read ({exc.__class__.__name__})") from exc
        extra = conn.extra_dejson or {}
        if extra.get("sqlalchemy_url"):
            return make_engine(extra["sqlalchemy_url"])
        if conn.conn_type == "sqlite":
            path = conn.host or conn.schema
            if not path:
                raise DataIOError(f"sqlite connection {self.sql_conn_id!r} has no database file in 'host'")
            return make_engine(f"sqlite:///{path}")
        postgres = conn.conn_type in ("postgres", "postgresql")
        try:
            hook = self._postgres_hook() if conn.conn_type == "postgresql" else conn.get_hook(
                hook_params=_POSTGRES_HOOK_PARAMS if postgres else None)
        except Exception as exc:  # an unknown type, or its provider is not installed
            raise DataIOError(f"connection {self.sql_conn_id!r} of type {conn.conn_type!r} has no provider hook "
                              f"here ({exc.__class__.__name__}); install its provider") from exc
        if not hasattr(hook, "get_sqlalchemy_engine"):
            raise DataIOError(f"connection {self.sql_conn_id!r} of type {conn.conn_type!r} is not a SQL database")
        if not postgres:
            return hook.get_sqlalchemy_engine()
        ignored = IGNORED_EXTRAS | set(getattr(hook, "ignored_extra_options", ()))
        connect_args = {k: v for k, v in extra.items() if k not in ignored}
        connect_args.setdefault("connect_timeout", 10)
        return hook.get_sqlalchemy_engine(engine_kwargs={"connect_args": connect_args, "pool_pre_ping": True})

    def _postgres_hook(self) -> Any:
        """The postgres provider's hook for a connection whose type is spelt ``postgresql`` (the provider
        registers ``postgres``)."""
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        return PostgresHook(postgres_conn_id=self.sql_conn_id, **_POSTGRES_HOOK_PARAMS)

    def key_ranges(self, table: str, key_column: str, parts: int, schema: str | None = None) -> list[dict[str, Any]]:
        """Split ``table`` into ``parts`` ranges of ``key_column`` for dynamic task mapping.

        Returns ``[{"lo": ..., "hi": ...}, ...]``: half-open ranges ``lo <= key < hi`` covering every
        row (the last ``hi`` is one past the maximum for integer keys). Boundaries come from the
        data (``NTILE``), so skewed keys still give balanced ranges.
        """
        if parts < 1:
            raise ValueError("parts must be at least 1")
        engine = self.get_engine()
        t = sa.Table(table, sa.MetaData(), autoload_with=engine, schema=schema)
        key = t.c[key_column]
        bucket = sa.func.ntile(parts).over(order_by=key).label("bucket")
        inner = sa.select(key.label("k"), bucket).subquery()
        query = sa.select(sa.func.min(inner.c.k), sa.func.max(inner.c.k)).group_by(inner.c.bucket).order_by(inner.c.bucket)
        with engine.connect() as conn:
            bounds = conn.execute(query).all()
        if not bounds:
            return []
        ranges = []
        for i, (lo, hi) in enumerate(bounds):
            nxt = bounds[i + 1][0] if i + 1 < len(bounds) else (hi + 1 if isinstance(hi, int) else None)
            ranges.append({"lo": lo, "hi": nxt})
        return ranges


def is_object_storage(path: str) -> bool:
    """``s3://…``, ``gs://…``, ``file://…`` and the like go through Airflow's ObjectStoragePath."""
    return "://" in str(path)


class ObjectStorageHook(BaseHook):
    """CSV/Parquet files on object storage, through Airflow's ``ObjectStoragePath``.

    Sources are copied to a local temporary file in chunks (the readers stream from it); targets
    are written locally, atomically, then uploaded when the run commits, and removed again if the
    audit cannot record the success.

    :param storage_conn_id: the connection of the storage (e.g. an AWS or GCP connection), if any.
    """

    hook_name = "Pseudonymise object storage"

    def __init__(self, storage_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage_conn_id = storage_conn_id

    def path(self, uri: str) -> Any:
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(uri, conn_id=self.storage_conn_id)

    def download(self, uri: str, directory: str) -> str:
        import shutil

        remote = self.path(uri)
        local = os.path.join(directory, "source" + os.path.splitext(remote.name)[1])
        try:
            with remote.open("rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as exc:
            raise DataIOError(f"cannot read {uri!r} ({exc.__class__.__name__}); check the path and storage connection") from exc
        return local

    def upload(self, local: str, uri: str) -> None:
        """Copy the local file ``local`` to ``uri``, in chunks."""
        import shutil

        try:
            with open(local, "rb") as src, self.path(uri).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as exc:
            raise DataIOError(f"cannot write {uri!r} ({exc.__class__.__name__}); check the path and storage connection") from exc

    def destination(self, uri: str, fmt: str | None = None) -> ObjectStorageDestination:
        """Where a run writes the file ``uri`` (format ``fmt``, default from the extension)."""
        return ObjectStorageDestination(self, uri, fmt)


class ObjectStorageDestination:
    """A CSV or Parquet file on object storage: written to a local temporary file, atomically, and
    uploaded when the run commits (a :class:`~pseudonymise.core.plan.Destination`)."""

    #: the file sinks write ``pyarrow.RecordBatch`` es as they are
    takes_arrow = True

    def __init__(self, hook: ObjectStorageHook, uri: str, fmt: str | None = None) -> None:
        self.hook, self.uri, self.fmt = hook, uri, fmt
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def open(self, columns: list[str], conn: Any) -> _UploadingSink:
        self._scratch = tempfile.TemporaryDirectory(prefix="pseudonymise-")
        local = os.path.join(self._scratch.name, "target" + os.path.splitext(self.uri)[1])
        return _UploadingSink(self.hook, open_sink(local, columns, self.fmt), local, self.uri)


class _UploadingSink:
    def __init__(self, hook: ObjectStorageHook, sink: Any, local: str, uri: str) -> None:
        self.hook, self.sink, self.local, self.uri = hook, sink, local, uri
        self.uploaded = False

    def write(self, batch: Any) -> None:
        self.sink.write(batch)

    def commit(self) -> None:
        self.sink.commit()
        self.hook.upload(self.local, self.uri)
        self.uploaded = True

    def abort(self) -> None:
        self.sink.abort()
        if self.uploaded:
            with contextlib.suppress(Exception):  # best effort: the audit shows the use as failed
                self.hook.path(self.uri).unlink()


class AuditSigningHook(BaseHook):
    """The audit signing key and the witnesses of signed audit checkpoints (docs/design.md §6.1), from one connection.

    Connection fields (any connection type, ``generic`` for instance):

    * ``password``: the private Ed25519 JWK written by ``pseudonymise audit keygen`` (masked in logs, in
      every encoding, the moment it is read), unless the extras name a Transit key;
    * extras ``transit_key`` (``MOUNT/NAME`` of an ``ed25519`` Transit key) and ``transit_vault_conn_id``
      (a HashiCorp Vault connection whose policy allows ``MOUNT/sign/NAME`` and reading ``MOUNT/keys/NAME``):
      Vault signs, the key never leaves it;
    * extra ``witness_path``: an append-only JSON-lines file, a local or mounted path, given every checkpoint;
    * extras ``witness_vault_path`` (``MOUNT/PATH`` on a KV v2 engine) and ``witness_vault_conn_id`` (default
      ``transit_vault_conn_id``): the latest checkpoint of each audit, written with check-and-set;
    * extra ``audit_id``: the audit's name in checkpoints (default ``<dialect>/<database>/<schema>/<table>``);
    * extra ``public_keys``: earlier public keys (a JWKS) still trusted after the key was rotated.

    :param audit_signing_conn_id: the connection id (default ``pseudonymise_audit_signing``).
    """

    conn_name_attr = "audit_signing_conn_id"
    default_conn_name = "pseudonymise_audit_signing"
    hook_name = "Pseudonymise audit signing"

    def __init__(self, audit_signing_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_signing_conn_id = audit_signing_conn_id

    @cached_property
    def connection(self) -> Any:
        from pseudonymise.core.errors import CheckpointError

        try:
            return self.get_connection(self.audit_signing_conn_id)
        except Exception as exc:  # Airflow raises several types for a missing connection
            raise CheckpointError(
                f"connection {self.audit_signing_conn_id!r} could not be read ({exc.__class__.__name__}); create it "
                "with the private JWK of `pseudonymise audit keygen` as its password, or extras naming a Transit key"
            ) from exc

    @property
    def extras(self) -> dict[str, Any]:
        return self.connection.extra_dejson or {}

    def _vault(self, conn_id: str | None, what: str) -> VaultClient:
        from pseudonymise.core.errors import SigningUnavailableError, SigningUnreachableError

        if not conn_id:
            raise SigningUnavailableError(f"connection {self.audit_signing_conn_id!r} names {what} but no Vault "
                                          "connection: set the extra transit_vault_conn_id (or witness_vault_conn_id)")
        try:
            return vault_client(conn_id)
        except Exception as exc:  # hvac/requests raise many types
            cls = SigningUnreachableError if is_unreachable(exc) else SigningUnavailableError
            raise cls(f"Vault connection {conn_id!r} could not be opened ({exc.__class__.__name__})") from exc

    def get_signer(self) -> Any:
        """The audit signing key: a :class:`~pseudonymise.core.checkpoint.TransitSigner` or a ``LocalSigner``."""
        from pseudonymise.core.checkpoint import CheckpointError, LocalSigner, TransitSigner
        from pseudonymise.core.tokens import b64url_decode, key_encodings

        extras = self.extras
        if extras.get("transit_key"):
            mount, _, name = str(extras["transit_key"]).strip("/").partition("/")
            if not mount or not name:
                raise CheckpointError(f"the extra transit_key of connection {self.audit_signing_conn_id!r} must be "
                                      "MOUNT/NAME, e.g. transit/audit-signing")
            return TransitSigner(self._vault(extras.get("transit_vault_conn_id"), "a Transit key"), mount, name)
        secret = self.connection.password
        if not secret:
            raise CheckpointError(
                f"connection {self.audit_signing_conn_id!r} holds no audit signing key: put the private JWK of "
                "`pseudonymise audit keygen` in its password, or set the extras transit_key and transit_vault_conn_id")
        mask_secret(secret)
        signer = LocalSigner.from_jwk(secret)
        for form in key_encodings(b64url_decode(signer.private_jwk()["d"])):
            mask_secret(form)
        return signer

    def get_witnesses(self) -> list[Any]:
        from pseudonymise.core.checkpoint import CheckpointError, FileWitness, VaultKVWitness

        extras, out = self.extras, []
        if extras.get("witness_path"):
            path = str(extras["witness_path"])
            if is_object_storage(path):
                raise CheckpointError(f"the witness_path of connection {self.audit_signing_conn_id!r} is an "
                                      "object-storage URI, which is not supported: mount it, or use witness_vault_path")
            out.append(FileWitness(path))
        if extras.get("witness_vault_path"):
            mount, _, path = str(extras["witness_vault_path"]).strip("/").partition("/")
            if not mount or not path:
                raise CheckpointError(f"the extra witness_vault_path of connection {self.audit_signing_conn_id!r} "
                                      "must be MOUNT/PATH, e.g. secret/pseudonymise/checkpoints")
            client = self._vault(extras.get("witness_vault_conn_id") or extras.get("transit_vault_conn_id"),
                                 "a Vault KV witness")
            out.append(VaultKVWitness(client, mount, path))
        return out

    def checkpointer(self, audit: Any) -> Any:
        """A :class:`~pseudonymise.core.checkpoint.Checkpointer` of ``audit`` with this key and these witnesses."""
        from pseudonymise.core.checkpoint import Checkpointer, PublicKeys

        extras = self.extras
        earlier = PublicKeys.from_jwks(extras["public_keys"]) if extras.get("public_keys") else None
        return Checkpointer(audit, self.get_signer(), self.get_witnesses(), audit_id=extras.get("audit_id") or None,
                            public_keys=earlier)


class AirflowApprovalHook(BaseHook):
    """Reads, through the Airflow REST API, who triggered a DAG run and who answered its approval task, so a
    reversal can hold to four eyes (:func:`~pseudonymise.core.approval.require_four_eyes`).

    The answer of an ``ApprovalOperator`` (Airflow's human-in-the-loop) is read from the API server, which
    records the user who answered it; its XCom is not trusted, because DAG code or any user who may edit
    XCom entries could write one. Connection fields (type ``http`` or ``generic``): ``host`` (with
    ``http://`` or ``https://``, or ``schema`` giving it), ``port``, and ``login``/``password`` of an Airflow
    user that may read DAG runs and human-in-the-loop details (the ``viewer`` role is enough); the password
    and the API's JWT are masked in logs.

    :param airflow_api_conn_id: the connection id (default ``airflow_api``).
    """

    conn_name_attr = "airflow_api_conn_id"
    default_conn_name = "airflow_api"
    hook_name = "Airflow REST API (four-eyes approvals)"
    APPROVE = "Approve"  # ApprovalOperator's option for yes

    def __init__(self, airflow_api_conn_id: str = default_conn_name, timeout: float = 30, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.airflow_api_conn_id, self.timeout = airflow_api_conn_id, timeout

    @cached_property
    def base_url(self) -> str:
        from pseudonymise.core.errors import ApprovalError

        try:
            conn = self.get_connection(self.airflow_api_conn_id)
        except Exception as exc:  # Airflow raises several types for a missing connection
            raise ApprovalError(f"connection {self.airflow_api_conn_id!r} could not be read ({exc.__class__.__name__});"
                                " create it with the Airflow API server's URL and a user that may read DAG runs "
                                "and human-in-the-loop details (the viewer role)") from None
        if not conn.host or not conn.login or not conn.password:
            raise ApprovalError(f"connection {self.airflow_api_conn_id!r} needs host, login and password (an Airflow "
                                "user that may read DAG runs and human-in-the-loop details)")
        mask_secret(conn.password)
        self._credentials = (conn.login, conn.password)
        host = conn.host.rstrip("/")
        if "://" not in host:
            host = f"{conn.schema or 'http'}://{host}"
        if conn.port and host.count(":") < 2:
            host = f"{host}:{conn.port}"
        return host

    def _call(self, method: str, path: str, body: Any = None, jwt: str | None = None) -> Any:
        import json
        import urllib.error
        import urllib.request

        from pseudonymise.core.errors import ApprovalError

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", "Accept": "application/json",
                                                  **({"Authorization": f"Bearer {jwt}"} if jwt else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ApprovalError(f"the Airflow API refused connection {self.airflow_api_conn_id!r}'s user "
                                    f"(HTTP {exc.code} on {path.split('?')[0]}); give it a role that may read DAG "
                                    "runs and human-in-the-loop details (viewer)") from None
            if exc.code == 404:
                return None
            raise ApprovalError(f"the Airflow API answered HTTP {exc.code} on {path.split('?')[0]}; no approval "
                                "could be read, so nothing is revealed") from None
        except (urllib.error.URLError, OSError) as exc:
            from pseudonymise.core.errors import ApprovalUnavailableError

            raise ApprovalUnavailableError(f"the Airflow API at {self.base_url} is unreachable ({exc.__class__.__name__}); no "
                                "approval could be read, so nothing is revealed. Check connection "
                                f"{self.airflow_api_conn_id!r}") from None

    def _jwt(self) -> str:
        from pseudonymise.core.errors import ApprovalError

        base = self.base_url  # reads the credentials
        answer = self._call("POST", "/auth/token", {"username": self._credentials[0],
                                                    "password": self._credentials[1]})
        if not isinstance(answer, dict) or not answer.get("access_token"):
            raise ApprovalError(f"the Airflow API at {base} gave no token for connection "
                                f"{self.airflow_api_conn_id!r}'s user; check its login and password")
        mask_secret(answer["access_token"])
        return str(answer["access_token"])

    def approval(self, dag_id: str, run_id: str, approval_task_id: str, *, reason: str | None,
                 map_index: int = -1) -> Approval:
        """The approval of run ``run_id`` by its task ``approval_task_id``, held to four eyes.

        :class:`ApprovalError` unless the task was answered ``Approve`` by a person other than the user
        who triggered the run (both as the API server recorded them), and its text (the body the approver
        read, as the API server stored it) names exactly one pseudonym set
        (:func:`~pseudonymise.core.approval.approved_set_digest`): the returned approval carries that digest,
        and the reversal must read that very set.
        """
        from urllib.parse import quote

        from pseudonymise.core.approval import Approval, approved_set_digest, require_four_eyes
        from pseudonymise.core.errors import ApprovalError

        jwt = self._jwt()
        run_path = f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"
        run = self._call("GET", run_path, jwt=jwt)
        if run is None:
            raise ApprovalError(f"the Airflow API does not know run {run_id!r} of DAG {dag_id!r}")
        what = f"the reversal in run {run_id!r}"
        detail = self._call("GET", f"{run_path}/taskInstances/{quote(approval_task_id, safe='')}/{map_index}"
                                   "/hitlDetails", jwt=jwt)
        if detail is None:
            raise ApprovalError(f"{what} has no approval: run {run_id!r} has no human-in-the-loop task "
                                f"{approval_task_id!r}; put an ApprovalOperator with that task id upstream")
        user = detail.get("responded_by_user") or {}
        if not detail.get("response_received"):
            raise ApprovalError(f"{what} has not been approved yet (task {approval_task_id!r} has no answer)")
        if self.APPROVE not in (detail.get("chosen_options") or []):
            raise ApprovalError(f"{what} was not approved: task {approval_task_id!r} was answered "
                                f"{', '.join(detail.get('chosen_options') or []) or 'nothing'}")
        if not user:
            raise ApprovalError(f"{what} was answered by no person (a timeout's default, or the task itself); "
                                "four eyes needs a user's approval")
        approver = str(user.get("name") or user.get("id") or "")
        require_four_eyes(run.get("triggering_user_name"), approver, what=what)
        digest = approved_set_digest(detail.get("body"), what=what)
        return Approval(requester=str(run["triggering_user_name"]), approver=approver, reason=reason,
                        approved_at=detail.get("responded_at"), via="airflow-hitl", reference=approval_task_id,
                        pseudonym_set_digest=digest)
