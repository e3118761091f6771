"""The one exception hierarchy of the plugin: every message says what is wrong and how to fix it.

No message ever contains a token, a key or a data value: callers pass column names, claim
names, ids and counts, never the values themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import NoReturn


class PseudonymiseError(Exception):
    """Base class of every error the plugin raises on purpose."""


class ServiceUnavailableError(PseudonymiseError):
    """Marks an error caused by a service that could not be reached (Vault down, a timeout): the same
    task may succeed when retried, so the operators let Airflow's ``retries`` apply to it."""


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


class TokenRevokedError(TokenError):
    """The token's ``jti`` is in the revocation table (v1.1): it is refused for ever."""


class TokenUsedUpError(TokenError):
    """The token has had as many uses as its ``max_uses`` claim allows (v1.1)."""


class TokenUnavailableError(TokenError):
    """The token could not be read from its connection or from Vault."""


class VaultUnreachableError(TokenUnavailableError, ServiceUnavailableError):
    """Vault could not be reached to read the token or to compute HMACs: a retry may succeed."""


class TransitUnavailableError(TokenError):
    """Vault Transit could not compute the HMACs (unreachable, forbidden, or no such key)."""


class TransitUnreachableError(TransitUnavailableError, ServiceUnavailableError):
    """Vault Transit could not be reached: a retry may succeed."""


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


class RiskGateError(PolicyError):
    """The output's re-identification risk is above what the run's risk gate allows (k, l); nothing was committed."""
class DeidentifyError(PolicyError):
    """A value a de-identifying action cannot take (a date that does not parse, a shift out of range), named by
    column and row, never by value."""


class CollisionError(PseudonymiseError):
    """Two different values gave one pseudonym within a run; the run must fail."""


# --- escrow -----------------------------------------------------------------------------------
class EscrowError(PseudonymiseError):
    """Escrow could not be written, read or opened."""


class EscrowNotFoundError(EscrowError):
    """A reversal that must reveal every pseudonym found some without escrow (unknown, purged, or of
    another project); nothing was written."""


class EscrowIntegrityError(EscrowError):
    """An escrow ciphertext failed authentication (tampered, or moved to another pseudonym)."""


class EscrowRefusedError(EscrowIntegrityError):
    """Escrow rows that cannot be proven (docs/design.md §5.1); nothing of the call was revealed."""

    def __init__(self, project: str, refused: Mapping[str, str]) -> None:
        self.refused = dict(refused)
        shown = "; ".join(f"{p}: {why}" for p, why in list(self.refused.items())[:10])
        more = f" (and {len(self.refused) - 10} more)" if len(self.refused) > 10 else ""
        super().__init__(
            f"{len(self.refused)} escrow row(s) of project {project!r} were refused and nothing was revealed — "
            f"{shown}{more}. Run `pseudonymise audit verify --escrow` to list them and restore escrow from a backup"
        )


# --- audit ------------------------------------------------------------------------------------
class AuditError(PseudonymiseError):
    """The audit table could not be written or read; token use is refused (fail closed)."""


class CheckpointError(AuditError):
    """A signed checkpoint of the audit chain could not be made, recorded, witnessed or checked."""


class CheckpointContradictionError(CheckpointError):
    """The audit chain contradicts a checkpoint signed earlier: rows were cut off or rewritten."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint, a key or a witness entry is not in the expected form."""


class WitnessError(CheckpointError):
    """A witness could not be read or written."""


class WitnessUnreachableError(WitnessError, ServiceUnavailableError):
    """A witness (Vault) could not be reached: a retry may succeed."""


class SigningUnavailableError(CheckpointError):
    """The audit signing key could not sign (Vault Transit refused, or the key is of the wrong type)."""


class SigningUnreachableError(SigningUnavailableError, ServiceUnavailableError):
    """Vault Transit could not be reached to sign a checkpoint: a retry may succeed."""


# --- I/O --------------------------------------------------------------------------------------
class DataIOError(PseudonymiseError):
    """A source or target could not be read or written."""


class DelimiterError(DataIOError):
    """A CSV file looks separated by another delimiter than the one it is read with (its header is one
    column that holds that delimiter); :attr:`seen` is the delimiter found there."""

    def __init__(self, message: str, seen: str) -> None:
        super().__init__(message)
        self.seen = seen


class DatabaseIOError(DataIOError):
    """A database refused a statement while the plugin read a source or wrote a target, escrow or the audit.

    Made by :func:`database_error`: the message says what the plugin was doing, the SQLSTATE (on SQLite
    the result code), the driver's exception class, the column, table or constraint when the driver
    names it, and how to fix it; never the driver's own message, which quotes data values.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None, driver_class: str | None = None,
                 column: str | None = None, table: str | None = None, constraint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate, self.driver_class = sqlstate, driver_class
        self.column, self.table, self.constraint = column, table, constraint


class RetireRefusedError(PseudonymiseError):
    """Source rows were not retired: no verified load of their interval, or the source changed since."""


class ApprovalError(PseudonymiseError):
    """A reversal lacks the approval of a second person (four eyes): none recorded, rejected, given by the
    requester, expired, already executed, or for other pseudonyms; nothing was revealed."""


class ApprovalUnavailableError(ApprovalError, ServiceUnavailableError):
    """The record of the approval (the Airflow API server) could not be reached; retrying may help."""


class ErasureError(PseudonymiseError):
    """A subject erasure cannot be done as asked (randomised project by identifiers, no identifiers, a
    missing target); nothing was erased."""


# --- configuration and requests ------------------------------------------------------------------
class ConfigurationError(PseudonymiseError):
    """A setting (a ``[pseudonymise]`` option of Airflow's configuration) is missing or invalid; the message
    names it and the values it accepts."""


class RequestError(PseudonymiseError):
    """An HTTP API request's body cannot be read (type, size, JSON or CSV); ``status`` is the HTTP status
    to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- database errors, without the driver's text ----------------------------------------------------
# A driver's message quotes the values it refused ('invalid input syntax for type bigint: "P770839"',
# 'Key (patient_id)=(P770839) already exists'), and SQLAlchemy's own text adds the statement and its
# parameters. None of it may reach a message, the audit or a log: the plugin's error keeps only what
# the driver exposes as fields (SQLSTATE, class, column, table, constraint) and is raised without
# its cause or context, so a traceback (Airflow logs the whole chain) cannot print the driver's text.

#: Top-level modules whose exceptions come from a database (their text can quote data values).
_DATABASE_MODULES = frozenset({"sqlalchemy", "psycopg2", "psycopg", "sqlite3", "_sqlite3", "pg8000", "asyncpg",
                               "pymysql", "MySQLdb", "mysql", "oracledb", "cx_Oracle", "pyodbc", "pymssql",
                               "duckdb", "snowflake"})
#: SQLite result codes that Python's sqlite3 module may not name (it says "unknown").
_SQLITE_NAMES = {3091: "SQLITE_CONSTRAINT_DATATYPE"}
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
#: The column a COPY FROM error is about, from the start of PostgreSQL's error context (the rest quotes the value).
_COPY_CONTEXT = re.compile(r"COPY [^,\n]+, line \d+, column ([^:\n]+):")
#: Where SQLite's own constraint messages name table.column (only names the caller knows are kept).
_SQLITE_NAMED = re.compile(r"(?:UNIQUE|NOT NULL|PRIMARY KEY|CHECK|FOREIGN KEY) constraint failed: (.+)"
                           r"|cannot store [A-Z]+ value in [A-Z]+ column (.+)")

DEFAULT_DATA_FIX = ("a value does not fit the type it is converted to (a cast in the query or the type of a column): "
                    "compare the types of the source, the query and the target")
SOURCE_DATA_FIX = ("a value of the source does not convert to the type the query casts it to (or a function refused "
                   "it): fix the cast, or filter out the rows that do not convert, in the source query")
TARGET_DATA_FIX = ("a value does not fit the type of its column in the target (a kept column whose type differs): "
                   "give the target column the source column's type, cast the column in the source query, or let "
                   "the plugin create the target table")

_PG_HINTS = {
    "23502": "a column is NULL in some rows but NOT NULL in the target: allow NULL there, or filter those rows out "
             "in the source query",
    "23505": "a row repeats a key that the target already holds or that the run writes twice: use write mode "
             "'upsert' on that key, 'replace_partition' or 'replace', or remove the duplicates in the source query",
    "23503": "a row refers to a row that does not exist (foreign key): load the referenced table first, or drop "
             "the foreign key",
    "23514": "a row breaks a CHECK constraint of the target: compare the data with the constraint",
    "25P02": "an earlier statement of the same transaction failed: fix that one first",
    "40001": "the database aborted the transaction (serialization failure): run the task again",
    "40P01": "the database aborted the transaction (deadlock): run the task again",
    "42501": "the database role lacks a privilege: grant it what the run needs "
             "(include/sql/least_privilege.sql lists the grants)",
    "42601": "the SQL has a syntax error: check the query",
    "42703": "a column does not exist: check the column names of the query, the policy and the target",
    "42P01": "a table does not exist: check the table and schema names of the query and the target",
    "57014": "the statement was cancelled (statement_timeout, or a cancel request): raise the timeout or run the "
             "task again",
}
_PG_CLASS_HINTS = {
    "08": "the connection to the database failed or was lost: check that the server is up and reachable, then run "
          "the task again",
    "23": "a row breaks a constraint of the target: compare the data with the target's keys and constraints",
    "28": "the database refused the login: check the connection's user and password",
    "3D": "the database does not exist: check the connection",
    "40": "the database rolled the transaction back: run the task again",
    "42": "the SQL names something that does not exist or may not be used: check the query, the table and column "
          "names, and the grants",
    "53": "the database ran out of a resource (disk, memory, connections): free it, then run the task again",
    "54": "the statement exceeds a limit of the database: simplify it",
    "55": "an object the statement needs is locked or in use: run the task again",
    "57": "the statement was cancelled or the server is shutting down: run the task again once the database is back",
    "58": "the database server hit a system error: see the server's log",
    "XX": "the database server hit an internal error: see the server's log",
}
_SQLITE_HINTS = {
    "SQLITE_CONSTRAINT_NOTNULL": _PG_HINTS["23502"],
    "SQLITE_CONSTRAINT_UNIQUE": _PG_HINTS["23505"],
    "SQLITE_CONSTRAINT_PRIMARYKEY": _PG_HINTS["23505"],
    "SQLITE_CONSTRAINT_FOREIGNKEY": _PG_HINTS["23503"],
    "SQLITE_CONSTRAINT_CHECK": _PG_HINTS["23514"],
    "SQLITE_CONSTRAINT": _PG_CLASS_HINTS["23"],
    "SQLITE_BUSY": "the database file is locked by another connection: run the task again",
    "SQLITE_LOCKED": "the database file is locked by another connection: run the task again",
    "SQLITE_READONLY": "the database file cannot be written: check its path and permissions",
    "SQLITE_CANTOPEN": "the database file cannot be opened: check its path and permissions",
    "SQLITE_PERM": "the database file cannot be written: check its path and permissions",
    "SQLITE_FULL": "the disk holding the database file is full: free space, then run the task again",
    "SQLITE_IOERR": "the database file could not be read or written: check the disk",
    "SQLITE_CORRUPT": "the database file is damaged: restore it from a backup",
    "SQLITE_NOTADB": "the file is not an SQLite database: check the connection",
    "SQLITE_TOOBIG": "a value is larger than SQLite allows",
    "SQLITE_INTERRUPT": "the statement was interrupted: run the task again",
    "SQLITE_ERROR": "the SQL is wrong, names a table or column that does not exist, or a function refused a value: "
                    "check the query and the names",
}


def _module_root(cls: type) -> str:
    return cls.__module__.split(".", 1)[0]


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from SQLAlchemy or a database driver, whose text can quote data values."""
    if isinstance(exc, PseudonymiseError):
        return False
    return any(_module_root(cls) in _DATABASE_MODULES for cls in type(exc).__mro__)


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _identifier(value: object) -> str | None:
    """A name the database reported in a field of its own (never parsed from its message), if it looks like one."""
    if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
        return value
    return None


def _field(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:  # a diagnostic of a closed connection, for instance
        return None


def _pg_condition(code: str) -> str | None:
    try:
        from psycopg2 import errorcodes

        return str(errorcodes.lookup(code)).lower()
    except (ImportError, KeyError):
        return None


def _known_column(candidates: Iterable[str], known: Iterable[str]) -> str | None:
    """The first candidate that is one of the caller's own column names (anything else may be a value)."""
    names = set(known)
    for candidate in candidates:
        name = candidate.strip().rsplit(".", 1)[-1].strip('"')
        if name in names:
            return name
    return None


def database_error(exc: BaseException, what: str, *, columns: Iterable[str] = (),
                   data_fix: str | None = None) -> DatabaseIOError:
    """The plugin's error for a database error ``exc``: ``what`` failed, with the SQLSTATE, the driver's class,
    the column, table or constraint when the driver names them, and a fix; never the driver's text.

    :param what: what the plugin was doing, as a clause: ``"reading the source query failed"``.
    :param columns: the column names the statement works on; a column is named from the driver's text
        (PostgreSQL's COPY context, SQLite's constraint messages) only if it is one of these.
    :param data_fix: what to do when a value does not fit its type (SQLSTATE class 22 and the like).
    """
    columns = list(columns)
    orig: BaseException | None = exc
    classes = [_qualified(exc)]
    if _module_root(type(exc)) == "sqlalchemy":
        inner = getattr(exc, "orig", None)
        orig = inner if isinstance(inner, BaseException) else None
        if orig is not None:
            classes.append(_qualified(orig))
    facts: list[str] = []
    sqlstate = column = table = constraint = None
    hint: str | None = None
    on_server = False
    if orig is not None:
        code = _field(orig, "pgcode") or _field(orig, "sqlstate")
        if isinstance(code, str) and _SQLSTATE.fullmatch(code):
            sqlstate, on_server = code, True
            condition = _pg_condition(code)
            facts.append(f"SQLSTATE {code}" + (f" {condition}" if condition else ""))
            hint = _PG_HINTS.get(code) or (data_fix or DEFAULT_DATA_FIX if code.startswith("22")
                                           else _PG_CLASS_HINTS.get(code[:2]))
        diag = _field(orig, "diag")
        if diag is not None:
            column = _identifier(_field(diag, "column_name"))
            table = _identifier(_field(diag, "table_name"))
            constraint = _identifier(_field(diag, "constraint_name"))
            datatype = _identifier(_field(diag, "datatype_name"))
            context = _field(diag, "context")
            if column is None and isinstance(context, str):
                match = _COPY_CONTEXT.match(context)
                column = _known_column([match.group(1)], columns) if match else None
            if datatype:
                facts.append(f"type {datatype!r}")
        sqlite_code = _field(orig, "sqlite_errorcode")
        if isinstance(sqlite_code, int):
            name = _field(orig, "sqlite_errorname")
            name = name if isinstance(name, str) and name.startswith("SQLITE_") else _SQLITE_NAMES.get(sqlite_code)
            sqlstate = name or str(sqlite_code)
            facts.append(f"SQLite {name} ({sqlite_code})" if name else f"SQLite result code {sqlite_code}")
            if name in ("SQLITE_CONSTRAINT_DATATYPE", "SQLITE_MISMATCH"):
                hint = data_fix or DEFAULT_DATA_FIX
            else:
                hint = next((h for prefix, h in sorted(_SQLITE_HINTS.items(), key=lambda kv: -len(kv[0]))
                             if name and name.startswith(prefix)), None)
            match = _SQLITE_NAMED.fullmatch(str(orig).strip())
            if match:  # only a name the caller gave can come out of SQLite's text
                column = _known_column((match.group(1) or match.group(2)).split(","), columns)
        if sqlstate is None and not is_database_error(orig):
            # SQLAlchemy could not bind a value (a TypeError in a type's bind processor, say)
            hint = data_fix or DEFAULT_DATA_FIX
        elif sqlstate is None and type(orig).__name__ in ("OperationalError", "InterfaceError"):
            hint = _PG_CLASS_HINTS["08"]
    facts.append(" from ".join(classes))
    for label, value in (("column", column), ("table", table), ("constraint", constraint)):
        if value:
            facts.append(f"{label} {value!r}")
    hint = hint or "see the database's log for the statement's error"
    where = "; the database server's log has it" if on_server else ""
    return DatabaseIOError(
        f"{what} ({', '.join(facts)}): {hint}. The driver's message is left out because it can quote data values"
        f"{where}",
        sqlstate=sqlstate, driver_class=classes[-1], column=column, table=table, constraint=constraint,
    )


def raise_alone(error: BaseException) -> NoReturn:
    """Raise ``error`` with no cause and no context, even inside an ``except`` block: a traceback of it
    (Airflow logs the whole chain of causes and contexts) then shows nothing of the exception it replaces."""
    try:
        raise error
    except BaseException as raised:
        raised.__cause__ = None
        raised.__context__ = None
        raised.__suppress_context__ = True
        raise


class database_errors:
    """Turns a database error escaping the block into :func:`database_error`'s, raised alone (:func:`raise_alone`).

    ``with database_errors("writing the target table:visits failed", columns=cols, data_fix=TARGET_DATA_FIX):``
    Errors of the plugin's own pass through unchanged, as does anything that is not a database error.
    """

    def __init__(self, what: str, *, columns: Iterable[str] = (), data_fix: str | None = None) -> None:
        self.what, self.columns, self.data_fix = what, columns, data_fix

    def __enter__(self) -> database_errors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or not is_database_error(exc):
            return False
        error = database_error(exc, self.what, columns=self.columns, data_fix=self.data_fix)
        del exc, tb  # the driver's exception must not stay reachable from this frame of the traceback
        raise_alone(error)
