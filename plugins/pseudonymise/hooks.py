"""Airflow hooks: where tokens come from (a connection, HashiCorp Vault) and where data lives.

:class:`PseudonymisationTokenHook` reads a token from a ``pseudonymise`` connection: its
password, or a HashiCorp Vault KV secret the connection points to (through the hashicorp
provider's ``VaultHook``). A connection served by Airflow's ``VaultBackend`` secrets backend is
just a connection, so it works unchanged. Every token is registered with Airflow's secret
masker the moment it is read. :class:`SqlDataHook` turns any SQL connection into a SQLAlchemy
engine for sources, targets and the audit/escrow store.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any, ClassVar

import sqlalchemy as sa
from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret
from sqlalchemy.engine import Engine

from pseudonymise.core.db import make_engine
from pseudonymise.core.errors import DataIOError, ServiceUnavailableError, TokenError, is_unreachable
from pseudonymise.core.tokens import TrustedKeys, secret_parts, verify_token


class TokenUnavailableError(TokenError):
    """The token could not be read from its connection or from Vault."""


class VaultUnreachableError(TokenUnavailableError, ServiceUnavailableError):
    """Vault could not be reached to read the token or to compute HMACs: a retry may succeed."""


def _unavailable(message: str, exc: BaseException) -> TokenUnavailableError:
    """The error for a failed Vault call: retryable when Vault could not be reached."""
    return (VaultUnreachableError if is_unreachable(exc) else TokenUnavailableError)(message)


def _mask_token(token: str) -> None:
    """Mask the token, its payload segment and every key claim in every encoding (DESIGN §3), before
    the token is verified: a token that is then refused must not reach a log either."""
    for part in secret_parts(token):
        mask_secret(part)


class PseudonymisationTokenHook(BaseHook):
    """Reads a pseudonymisation, reverse or secondary token and the issuer keys that verify it.

    Connection fields:

    * ``password``: the token (unless the extras point to Vault);
    * extra ``issuer_keys``: the trusted issuer public keys (JWKS from ``pseudonymise issuer public-key``);
    * extra ``project``: optional, refuse tokens of any other project;
    * extras ``vault_conn_id``, ``vault_path``, ``vault_key`` (default ``token``): read the token from
      the KV secret at ``vault_path`` through that Vault connection instead of the password.

    :param pseudonymise_conn_id: the connection id (default ``pseudonymise_default``).
    """

    conn_name_attr = "pseudonymise_conn_id"
    default_conn_name = "pseudonymise_default"
    conn_type = "pseudonymise"
    hook_name = "Pseudonymisation token"

    def __init__(self, pseudonymise_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pseudonymise_conn_id = pseudonymise_conn_id

    @cached_property
    def connection(self) -> Any:
        try:
            return self.get_connection(self.pseudonymise_conn_id)
        except Exception as exc:  # Airflow raises several types for a missing connection
            raise TokenUnavailableError(
                f"connection {self.pseudonymise_conn_id!r} could not be read ({exc.__class__.__name__}); "
                "create it with type 'pseudonymise' (or check the secrets backend)"
            ) from exc

    @property
    def extras(self) -> dict[str, Any]:
        return self.connection.extra_dejson or {}

    @property
    def project(self) -> str | None:
        return self.extras.get("project") or None

    def get_token(self) -> str:
        """The raw token, masked in logs from this moment on."""
        extras = self.extras
        if extras.get("vault_conn_id") or extras.get("vault_path"):
            token = self._token_from_vault(extras)
        else:
            token = self.connection.password
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
        try:
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
        return secret[key]

    def get_trusted_keys(self) -> TrustedKeys:
        keys = self.extras.get("issuer_keys")
        if not keys:
            raise TokenUnavailableError(
                f"connection {self.pseudonymise_conn_id!r} has no issuer_keys extra; paste the JWKS printed by "
                "`pseudonymise issuer public-key` so tokens can be verified"
            )
        return TrustedKeys.from_jwks(keys)

    def get_transit(self, token: Any) -> Any:
        """The Vault Transit HMAC client for a token whose key never leaves Vault (``key_ref``), through
        the connection's ``transit_vault_conn_id`` (a HashiCorp Vault connection)."""
        from airflow.providers.hashicorp.hooks.vault import VaultHook

        from pseudonymise.core.transit import TransitMac

        conn_id = self.extras.get("transit_vault_conn_id")
        if not conn_id:
            raise TokenUnavailableError(
                f"token {token.jti}'s key is held in Vault Transit; set the extra transit_vault_conn_id of connection "
                f"{self.pseudonymise_conn_id!r} to a Vault connection allowed to use {token.key_ref['mount']}/hmac"
            )
        try:
            client = VaultHook(vault_conn_id=conn_id).get_conn()
        except Exception as exc:  # hvac/requests raise many types
            raise _unavailable(f"Vault connection {conn_id!r} could not be opened ({exc.__class__.__name__})", exc) from exc
        return TransitMac(client, token.key_ref["mount"], token.key_ref["name"], key_version=token.key_version)

    def test_connection(self) -> tuple[bool, str]:
        """Verify the token (signature, validity) without using it; says nothing secret."""
        try:
            token = verify_token(self.get_token(), self.get_trusted_keys(), project=self.project)
        except TokenError as exc:
            return False, str(exc)
        return True, (f"{token.kind} token {token.jti} for project {token.project!r}, valid until "
                      f"{token.expires.isoformat()}")


class SqlDataHook(BaseHook):
    """A SQLAlchemy engine for any SQL connection (PostgreSQL, SQLite, or any DB-API hook's engine).

    ``postgres`` connections use psycopg2 (so COPY is available); ``sqlite`` connections take the
    database file from ``host``; an extra ``sqlalchemy_url`` overrides everything; other types use
    their provider hook's ``get_sqlalchemy_engine()``.

    :param sql_conn_id: the connection id.
    """

    conn_name_attr = "sql_conn_id"
    hook_name = "Pseudonymise SQL data"
    _engines: ClassVar[dict[str, Engine]] = {}

    def __init__(self, sql_conn_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sql_conn_id = sql_conn_id

    def get_engine(self) -> Engine:
        engine = self._engines.get(self.sql_conn_id)
        if engine is None:
            engine = self._engines[self.sql_conn_id] = self._make_engine()
        return engine

    def _make_engine(self) -> Engine:
        try:
            conn = self.get_connection(self.sql_conn_id)
        except Exception as exc:
            raise DataIOError(f"connection {self.sql_conn_id!r} could not be read ({exc.__class__.__name__})") from exc
        extra = conn.extra_dejson or {}
        if extra.get("sqlalchemy_url"):
            return make_engine(extra["sqlalchemy_url"])
        if conn.conn_type in ("postgres", "postgresql"):
            url = sa.URL.create("postgresql+psycopg2", username=conn.login or None, password=conn.password or None,
                                host=conn.host or None, port=conn.port or None, database=conn.schema or None)
            connect_args = {k: extra[k] for k in ("sslmode", "sslcert", "sslkey", "sslrootcert", "application_name",
                                                  "connect_timeout", "options") if k in extra}
            connect_args.setdefault("connect_timeout", 10)
            return make_engine(url.render_as_string(hide_password=False), connect_args=connect_args, pool_pre_ping=True)
        if conn.conn_type == "sqlite":
            path = conn.host or conn.schema
            if not path:
                raise DataIOError(f"sqlite connection {self.sql_conn_id!r} has no database file in 'host'")
            return make_engine(f"sqlite:///{path}")
        hook = conn.get_hook()
        if not hasattr(hook, "get_sqlalchemy_engine"):
            raise DataIOError(f"connection {self.sql_conn_id!r} of type {conn.conn_type!r} is not a SQL database")
        return hook.get_sqlalchemy_engine()

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
        import os
        import shutil

        remote = self.path(uri)
        local = os.path.join(directory, "source" + os.path.splitext(remote.name)[1])
        try:
            with remote.open("rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as exc:
            raise DataIOError(f"cannot read {uri!r} ({exc.__class__.__name__}); check the path and storage connection") from exc
        return local

    def uploading_sink(self, sink: Any, local: str, uri: str) -> Any:
        return _UploadingSink(self, sink, local, uri)


class _UploadingSink:
    def __init__(self, hook: ObjectStorageHook, sink: Any, local: str, uri: str) -> None:
        self.hook, self.sink, self.local, self.uri = hook, sink, local, uri
        self.uploaded = False

    def write(self, batch: dict[str, list[Any]]) -> None:
        self.sink.write(batch)

    def commit(self) -> None:
        import shutil

        self.sink.commit()
        try:
            with open(self.local, "rb") as src, self.hook.path(self.uri).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except Exception as exc:
            raise DataIOError(f"cannot write {self.uri!r} ({exc.__class__.__name__}); check the path and storage connection") from exc
        self.uploaded = True

    def abort(self) -> None:
        self.sink.abort()
        if self.uploaded:
            with contextlib.suppress(Exception):  # best effort: the audit shows the use as failed
                self.hook.path(self.uri).unlink()


class AuditSigningHook(BaseHook):
    """The audit signing key and the witnesses of signed audit checkpoints (DESIGN §6.1), from one connection.

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

    def _vault(self, conn_id: str | None, what: str) -> Any:
        from airflow.providers.hashicorp.hooks.vault import VaultHook

        from pseudonymise.core.checkpoint import SigningUnavailableError, SigningUnreachableError

        if not conn_id:
            raise SigningUnavailableError(f"connection {self.audit_signing_conn_id!r} names {what} but no Vault "
                                          "connection: set the extra transit_vault_conn_id (or witness_vault_conn_id)")
        try:
            return VaultHook(vault_conn_id=conn_id).get_conn()
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
