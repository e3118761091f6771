"""The one exception hierarchy of the plugin: every message says what is wrong and how to fix it.

No message ever contains a token, a key or a data value: callers pass column names, claim
names, ids and counts, never the values themselves.
"""

from __future__ import annotations


class PseudonymiseError(Exception):
    """Base class of every error the plugin raises on purpose."""


# --- tokens -----------------------------------------------------------------------------------
class TokenError(PseudonymiseError):
    """A token could not be used; the audit records these uses as ``denied``."""


class MalformedTokenError(TokenError):
    """The token is not a well-formed compact JWS with the claims of token format v1."""


class UnknownIssuerKeyError(TokenError):
    """The token's ``kid`` names no issuer key the consumer trusts."""


class TokenSignatureError(TokenError):
    """The signature does not verify with the trusted issuer key."""


class TokenExpiredError(TokenError):
    """The token's ``exp`` has passed."""


class TokenNotYetValidError(TokenError):
    """The token's ``nbf`` is in the future."""


class TokenKindError(TokenError):
    """The token is of another kind than the operation needs."""


class TokenProjectError(TokenError):
    """The token belongs to another project than the one the operation names."""


class RetentionEndedError(TokenError):
    """The project's retention period has ended: reversal is impossible for ever."""


# --- issuer -----------------------------------------------------------------------------------
class IssuerError(PseudonymiseError):
    """The issuer or its project store refused an operation."""


# --- policy and data --------------------------------------------------------------------------
class PolicyError(PseudonymiseError):
    """A column policy or pseudonym format is invalid or does not match the data."""


class UnsupportedTypeError(PolicyError):
    """A value of a type the pseudonym algorithm refuses (floats, for instance)."""


class InvalidTextError(PolicyError):
    """Text that is not valid Unicode (undecodable bytes, lone surrogates)."""


class CollisionError(PseudonymiseError):
    """Two different values gave one pseudonym within a run; the run must fail."""


# --- escrow -----------------------------------------------------------------------------------
class EscrowError(PseudonymiseError):
    """Escrow could not be written, read or opened."""


class EscrowIntegrityError(EscrowError):
    """An escrow ciphertext failed authentication (tampered, or moved to another pseudonym)."""


# --- audit ------------------------------------------------------------------------------------
class AuditError(PseudonymiseError):
    """The audit table could not be written or read; token use is refused (fail closed)."""


# --- I/O --------------------------------------------------------------------------------------
class DataIOError(PseudonymiseError):
    """A source or target could not be read or written."""


class ServiceUnavailableError(PseudonymiseError):
    """Marks an error caused by a service that could not be reached (Vault down, a timeout): the same
    task may succeed when retried, so the operators let Airflow's ``retries`` apply to it."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says a service could not be reached (connection refused or reset, timeout, Vault
    sealed or down, a 5xx answer), as opposed to a refusal that a retry cannot change (403, 404)."""
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

