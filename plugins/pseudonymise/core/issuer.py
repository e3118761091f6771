"""The token issuer: a stand-in for the organisation's token portal, with its project store.

The store keeps the issuer's Ed25519 key pair and, per project, its settings and secrets (the
pseudonymisation key and, for reversible projects, the escrow key pair). It is either a
directory of JSON files readable by their owner only (mode 0600), or HashiCorp Vault / OpenBao
KV v2. Tokens are issued from it; DAG authors only ever hold tokens, never the store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from pseudonymise.core.errors import IssuerError
from pseudonymise.core.formats import PseudonymFormat
from pseudonymise.core.instants import utc_seconds
from pseudonymise.core.mac import derive_secondary_key
from pseudonymise.core.tokens import (
    KINDS,
    MAX_TOKEN_LENGTH,
    METHODS,
    TREATMENTS,
    IssuerKey,
    TrustedKeys,
    b64url_decode,
    b64url_encode,
    jwk_thumbprint,
    new_jti,
    parse_instant,
    sign_claims,
)
from pseudonymise.core.vault import VaultCallError, VaultClient

_T = TypeVar("_T")
PROJECT_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}\Z")  # \Z: "$" would accept a trailing newline


class ProjectStore(Protocol):
    """Where the issuer keeps its secrets: documents by name."""

    def read(self, name: str) -> dict[str, Any] | None: ...
    def write(self, name: str, document: Mapping[str, Any]) -> None: ...
    def names(self, prefix: str) -> list[str]: ...


class DirectoryStore:
    """JSON files under a directory (mode 0700), each written atomically with mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.json"

    def read(self, name: str) -> dict[str, Any] | None:
        file = self._file(name)
        try:
            mode = file.stat().st_mode
        except FileNotFoundError:
            return None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IssuerError(f"{file} is readable by other users; run `chmod 600 {file}`: it holds secrets")
        return json.loads(file.read_text(encoding="utf-8"))

    def write(self, name: str, document: Mapping[str, Any]) -> None:
        file = self._file(name)
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)

    def names(self, prefix: str) -> list[str]:
        folder = self.path / prefix
        if not folder.is_dir():
            return []
        return sorted(f"{prefix}/{p.stem}" for p in folder.glob("*.json"))

    def __str__(self) -> str:
        return str(self.path)


class VaultStore:
    """HashiCorp Vault / OpenBao KV version 2 (through :class:`~pseudonymise.core.vault.VaultClient`):
    ``<mount>/<path>/<name>``."""

    def __init__(self, url: str, token: str, mount: str = "secret", path: str = "pseudonymise",
                 namespace: str | None = None, timeout: float = 10.0) -> None:
        self.mount, self.base = mount, path.strip("/")
        self.client = VaultClient.connect(url, token, namespace=namespace, timeout=timeout)
        self.url = url

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except VaultCallError as exc:
            if exc.unreachable:
                raise IssuerError(f"Vault at {self.url} is unreachable; check VAULT_ADDR and that the server is running") from None
            if exc.cause == "Forbidden":
                raise IssuerError(f"Vault at {self.url} refused to {what} (permission denied); check the Vault token's policy") from None
            raise IssuerError(f"Vault at {self.url} failed to {what} ({exc.cause})") from None

    def read(self, name: str) -> dict[str, Any] | None:
        return self._call(f"read {self.base}/{name}", lambda: self.client.kv_version(self.mount, f"{self.base}/{name}"))

    def write(self, name: str, document: Mapping[str, Any]) -> None:
        self._call(f"write {self.base}/{name}", lambda: self.client.kv_write(self.mount, f"{self.base}/{name}", document))

    def names(self, prefix: str) -> list[str]:
        keys = self._call(f"list {self.base}/{prefix}", lambda: self.client.kv_list(self.mount, f"{self.base}/{prefix}"))
        return sorted(f"{prefix}/{k}" for k in keys if not k.endswith("/"))

    def __str__(self) -> str:
        return f"vault:{self.url}/{self.mount}/{self.base}"


@dataclass(frozen=True, repr=False)
class Project:
    """A project's settings (public) and secrets (the store's only)."""

    id: str
    method: str
    treatment: str
    retention_until: datetime
    format: PseudonymFormat
    created_at: datetime
    key: bytes
    escrow_private_key: bytes | None = None
    #: Earlier pseudonymisation keys by version; ``key`` is version ``key_version``.
    previous_keys: Mapping[int, bytes] = field(default_factory=dict)
    key_version: int = 1
    #: ``None``: the key is in the store and travels in tokens; else the Vault Transit key that holds it.
    transit: Mapping[str, str] | None = None

    def key_of(self, version: int) -> bytes:
        if version == self.key_version:
            return self.key
        if version not in self.previous_keys:
            raise IssuerError(f"project {self.id!r} has no key version {version}")
        return self.previous_keys[version]

    @property
    def reversible(self) -> bool:
        return self.method == "reversible"

    def settings(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "method": self.method,
            "treatment": self.treatment,
            "retention_until": utc_seconds(self.retention_until),
            "format": self.format.to_claim(),
            "created_at": utc_seconds(self.created_at),
            "key_version": self.key_version,
            "custody": "transit" if self.transit else "local",
            **({"transit": dict(self.transit)} if self.transit else {}),
        }

    def to_document(self) -> dict[str, Any]:
        doc = {**self.settings(), "key": b64url_encode(self.key), "key_version": self.key_version,
               "previous_keys": {str(v): b64url_encode(k) for v, k in self.previous_keys.items()}}
        if self.escrow_private_key is not None:
            doc["escrow_private_key"] = b64url_encode(self.escrow_private_key)
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Project:
        return cls(
            id=doc["id"], method=doc["method"], treatment=doc["treatment"],
            retention_until=parse_instant(doc["retention_until"]),
            format=PseudonymFormat.from_claim(doc["format"]),
            created_at=parse_instant(doc["created_at"]),
            key=b64url_decode(doc["key"]),
            key_version=int(doc.get("key_version", 1)),
            previous_keys={int(v): b64url_decode(k) for v, k in (doc.get("previous_keys") or {}).items()},
            escrow_private_key=b64url_decode(doc["escrow_private_key"]) if doc.get("escrow_private_key") else None,
            transit=doc.get("transit") or None,
        )

    def __repr__(self) -> str:
        return f"Project(id={self.id!r}, method={self.method!r}, treatment={self.treatment!r})"


class Issuer:
    """Creates projects and issues signed tokens from a :class:`ProjectStore`."""

    def __init__(self, store: ProjectStore, transit_client: Any = None) -> None:
        """:param transit_client: a :class:`~pseudonymise.core.vault.VaultClient` (or an ``hvac.Client``) for
        projects whose key lives in Vault Transit (default: the store's own client when the store is Vault)."""
        self.store = store
        self.transit_client = transit_client or getattr(store, "client", None)
        doc = store.read("issuer")
        if doc is None:
            raise IssuerError(f"no issuer in {store}; create one with `pseudonymise issuer init`")
        self.id: str = doc["issuer_id"]
        self._private = Ed25519PrivateKey.from_private_bytes(b64url_decode(doc["private_key"]))
        self.kid: str = doc["kid"]

    @classmethod
    def init(cls, store: ProjectStore, issuer_id: str) -> Issuer:
        """Create the issuer key pair; refuses to overwrite an existing issuer."""
        if store.read("issuer") is not None:
            raise IssuerError(f"an issuer already exists in {store}; refusing to overwrite its key")
        if not issuer_id or len(issuer_id) > 200:
            raise IssuerError("the issuer id must be 1 to 200 characters")
        private = Ed25519PrivateKey.generate()
        raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        x = b64url_encode(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        store.write("issuer", {"issuer_id": issuer_id, "kid": jwk_thumbprint(x), "private_key": b64url_encode(raw_private)})
        return cls(store)

    def public_keys(self) -> TrustedKeys:
        """The JWKS a consumer needs to verify this issuer's tokens."""
        keys = [IssuerKey(self.kid, self._private.public_key())]
        return TrustedKeys(keys)

    # --- projects -------------------------------------------------------------------------------
    def create_project(self, project_id: str, *, method: str = "irreversible", treatment: str = "deterministic",
                       retention_until: datetime | None = None, retention: timedelta | None = None,
                       format: PseudonymFormat | None = None, custody: str = "local",
                       transit_mount: str = "transit") -> Project:
        """Create a project with its own key. With ``custody="transit"`` the pseudonymisation key is
        created inside Vault Transit and never leaves it: tokens carry a reference to it instead."""
        if not PROJECT_ID.match(project_id or ""):
            raise IssuerError(
                f"project id {project_id!r} is invalid: use lowercase letters, digits, '.', '_' and '-' (at most 100)"
            )
        if method not in METHODS:
            raise IssuerError(f"method {method!r} is unknown; use {' or '.join(METHODS)}")
        if treatment not in TREATMENTS:
            raise IssuerError(f"treatment {treatment!r} is unknown; use {' or '.join(TREATMENTS)}")
        if self.store.read(f"projects/{project_id}") is not None:
            raise IssuerError(f"project {project_id!r} already exists; its key cannot be replaced by re-creating it")
        now = datetime.now(UTC).replace(microsecond=0)
        if retention_until is None:
            retention_until = now + (retention if retention is not None else timedelta(days=365))
        if retention_until <= now:
            raise IssuerError("the retention end must be in the future")
        if custody not in ("local", "transit"):
            raise IssuerError(f"custody {custody!r} is unknown; use local or transit")
        transit = None
        if custody == "transit":
            transit = {"mount": transit_mount, "name": f"pseudonymise-{project_id}"}
            self._transit("create the Transit key",
                          lambda c: c.transit_create_key(transit_mount, transit["name"], "aes256-gcm96"))
        escrow = None
        if method == "reversible":
            escrow = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        project = Project(project_id, method, treatment, retention_until.astimezone(UTC),
                          format or PseudonymFormat(), now, secrets.token_bytes(32), escrow, transit=transit)
        self.store.write(f"projects/{project_id}", project.to_document())
        return project

    def project(self, project_id: str) -> Project:
        doc = self.store.read(f"projects/{project_id}") if PROJECT_ID.match(project_id or "") else None
        if doc is None:
            raise IssuerError(f"project {project_id!r} does not exist in {self.store}; create it with `pseudonymise project create`")
        return Project.from_document(doc)

    def projects(self) -> list[Project]:
        return [self.project(name.split("/", 1)[1]) for name in self.store.names("projects")]

    @property
    def transit_client(self) -> VaultClient | None:
        return self._transit_client

    @transit_client.setter
    def transit_client(self, client: Any) -> None:
        self._transit_client = None if client is None else VaultClient.of(client)

    def _transit(self, what: str, call: Callable[[VaultClient], None]) -> None:
        if self._transit_client is None:
            raise IssuerError(f"cannot {what}: no Vault client; set VAULT_ADDR and VAULT_TOKEN")
        try:
            call(self._transit_client)
        except VaultCallError as exc:
            raise IssuerError(f"cannot {what} in Vault ({exc.cause}); check that the Transit engine "
                              "is enabled and the Vault token may use it") from None

    def rotate_key(self, project_id: str) -> Project:
        """Give the project a new pseudonymisation key (version + 1); earlier versions stay for re-keying.

        Tokens issued afterwards carry the new key and ``key_version``; the escrow key pair is kept, so
        reverse tokens keep opening escrow written under any key version.
        """
        project = self.project(project_id)
        if project.transit:
            self._transit("rotate the Transit key",
                          lambda c: c.transit_rotate_key(project.transit["mount"], project.transit["name"]))
        rotated = dataclasses.replace(
            project, key=secrets.token_bytes(32), key_version=project.key_version + 1,
            previous_keys={**project.previous_keys, project.key_version: project.key},
        )
        self.store.write(f"projects/{project_id}", rotated.to_document())
        return rotated

    # --- tokens ---------------------------------------------------------------------------------
    def issue(self, project_id: str, kind: str, *, expires_in: timedelta = timedelta(days=30),
              source_project: str | None = None, not_before: datetime | None = None,
              key_version: int | None = None, max_uses: int | None = None) -> str:
        """Issue a signed token of ``kind`` for ``project_id``.

        Reverse tokens are refused for irreversible projects and never outlive the retention end; for
        deterministic projects they carry ``verify_keys``, the project's HMAC key of every key version
        it has had, so that reversal can recompute each pseudonym from the opened value (docs/design.md §5.1).
        Projects whose key is held in Vault Transit (``custody="transit"``) cannot: their key never
        leaves Vault, so their reverse tokens carry no ``verify_keys``.

        Secondary tokens name the ``source_project`` whose pseudonyms they turn into second-level ones
        and carry its ``source_format``, so the consumer refuses input that is not such a pseudonym.
        Their ``key`` is derived from this project's key (:func:`derive_secondary_key`), never the key
        itself: a secondary token cannot make this project's first-level pseudonyms. A Transit project's
        secondary token carries a ``key_ref`` instead, like its pseudonymisation tokens (HKDF cannot run
        on a key that never leaves Vault): there, Transit's own HMAC of the secondary message layout
        makes the secondary pseudonyms, and Vault's policy is what keeps the key's other uses apart.

        ``max_uses`` (v1.1) limits how many times the token may be used: every consumer counts its uses
        in the audit and refuses the token once they reach it (see :class:`~pseudonymise.core.use.TokenUse`).
        """
        if kind not in KINDS:
            raise IssuerError(f"token kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
        if max_uses is not None and (isinstance(max_uses, bool) or not isinstance(max_uses, int) or max_uses < 1):
            raise IssuerError("max_uses must be a positive whole number (or none, for no limit)")
        project = self.project(project_id)
        now = int(time.time())
        if expires_in <= timedelta(0):
            raise IssuerError("the token lifetime must be positive")
        exp = now + int(expires_in.total_seconds())
        if not_before is not None and int(not_before.timestamp()) >= exp:
            raise IssuerError("the token's not-before time must come before its expiry")
        retention_end = int(project.retention_until.timestamp())
        if now >= retention_end and kind == "reverse":
            raise IssuerError(f"project {project_id!r}'s retention has ended; reverse tokens can no longer be issued")
        claims: dict[str, Any] = {
            "iss": self.id,
            "jti": new_jti(),
            "sub": project.id,
            "kind": kind,
            "iat": now,
            "nbf": int(not_before.timestamp()) if not_before else now,
            "exp": exp,
            "method": project.method,
            "treatment": project.treatment,
            "retention_until": utc_seconds(project.retention_until),
            "format": project.format.to_claim(),
        }
        if max_uses is not None:
            claims["max_uses"] = max_uses
        version = project.key_version if key_version is None else key_version
        if kind in ("pseudonymisation", "secondary"):
            claims["key_version"] = version
        if kind == "pseudonymisation":
            if project.transit:
                claims["key_ref"] = {"engine": "transit", **project.transit}
            else:
                claims["key"] = b64url_encode(project.key_of(version))
            if project.reversible:  # the escrow keys are the issuer's, wherever the pseudonymisation key is held
                escrow = X25519PrivateKey.from_private_bytes(project.escrow_private_key)  # type: ignore[arg-type]
                claims["escrow_public_key"] = b64url_encode(escrow.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        elif kind == "reverse":
            if not project.reversible:
                raise IssuerError(f"project {project_id!r} is irreversible: it has no reverse tokens")
            claims["exp"] = min(exp, retention_end)
            claims["escrow_private_key"] = b64url_encode(project.escrow_private_key)  # type: ignore[arg-type]
            if project.treatment == "deterministic" and not project.transit:
                versions = {**project.previous_keys, project.key_version: project.key}
                claims["verify_keys"] = {str(v): b64url_encode(versions[v]) for v in sorted(versions)}
        else:
            if not source_project:
                raise IssuerError("a secondary token must name its --source-project")
            if source_project == project_id:
                raise IssuerError("a secondary token's source project must be another project")
            source = self.project(source_project)  # must exist
            claims["source_project"] = source_project
            claims["source_format"] = source.format.to_claim()
            if project.transit:
                claims["key_ref"] = {"engine": "transit", **project.transit}
            else:
                claims["key"] = b64url_encode(derive_secondary_key(project.key_of(version), source_project))
        token = sign_claims(claims, self._private, self.kid)
        if len(token) > MAX_TOKEN_LENGTH:
            raise IssuerError(
                f"the {kind} token of project {project_id!r} would be {len(token)} characters, more than the "
                f"{MAX_TOKEN_LENGTH} a consumer accepts (too many key versions for its verify_keys)"
            )
        return token
