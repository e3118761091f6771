"""The ``pseudonymise`` command: issue and inspect tokens, and pseudonymise files without Airflow.

Built on :mod:`pseudonymise.core` only. Tokens are read from a file, an environment variable or
standard input, never from the command line, where other users could read them in the process
list (:class:`CliTokens`, the CLI's token source). Vault (a ``vault:`` store, Transit custody,
checkpoint signing and witnesses) is reached with ``VAULT_ADDR`` and ``VAULT_TOKEN``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pseudonymise import __version__
from pseudonymise.core.defaults import DRY_RUN_SAMPLE, MAX_REPORT_QIS, MEMORY_GROUPS, PUBLIC_KEYS_ENV, SIGNING_KEY_ENV
from pseudonymise.core.errors import (
    AuditError,
    CheckpointError,
    DataIOError,
    DelimiterError,
    ErasureError,
    EscrowNotFoundError,
    IssuerError,
    PolicyError,
    PseudonymiseError,
    TokenError,
)
from pseudonymise.core.formats import ALPHABETS, DEFAULT_ALPHABET, DEFAULT_LENGTH, PseudonymFormat
from pseudonymise.core.instants import utc_seconds
from pseudonymise.core.policy import ColumnPolicy, ColumnRule
from pseudonymise.core.transit import TransitMac
from pseudonymise.core.vault import VaultClient

# The rest of the core is imported by the commands that use it: SQLAlchemy, numpy, pyarrow and cryptography
# take most of a short command's time.
if TYPE_CHECKING:
    from pseudonymise.core.checkpoint import CheckpointSigner, PublicKeys, Witness, WitnessVerifyResult
    from pseudonymise.core.files import CsvSource, ParquetSource
    from pseudonymise.core.issuer import ProjectStore
    from pseudonymise.core.pipeline import Store
    from pseudonymise.core.plan import Sink, Source
    from pseudonymise.core.pseudonymiser import Stats
    from pseudonymise.core.risk import RiskSpec
    from pseudonymise.core.tokens import Token, TrustedKeys

DEFAULT_STORE = "~/.pseudonymise"
DEFAULT_DB = "sqlite:///pseudonymise.db"
TOKEN_ENV = "PSEUDONYMISE_TOKEN"
_DURATION = re.compile(r"^(\d+)([smhdwy])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90d, 12h, 2w or 1y")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


# --- what the CLI prints: no secret, no Airflow term ---------------------------------------------
#: what a pasted token or key looks like: a compact JWS (three long base64url parts), or one long run of
#: base64url or hex characters
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}")
_SECRET_LIKE = re.compile(rf"{_TOKEN_LIKE.pattern}|[A-Za-z0-9_\-+=]{{32,}}")
#: the command line being run: its words that look like a secret are never printed back
_ARGV: list[str] = []
REDACTED = "<redacted>"

#: The core's messages are written for Airflow tasks, where a token lives in a connection; on the command
#: line the same advice names the token file, the database URL or the option instead.
_CLI_WORDING = (
    ("check the connection password, Vault secret or token file", "check the token file or variable"),
    ("add the issuer's JWKS to the connection",
     "pass --issuer-keys FILE (from `pseudonymise issuer public-key`) or set PSEUDONYMISE_ISSUER_KEYS"),
    ("to the connection's issuer_keys", "to --issuer-keys"),
    ("update the connection", "use the new token file"),
    ("use a connection that holds the right kind", "use a token file of the right kind"),
    ("give the connection a transit_vault_conn_id so HMACs can be computed there",
     "set VAULT_ADDR and VAULT_TOKEN so HMACs can be computed there"),
    ("check the connection's user and password", "check the user and password in --db"),
    ("check the connection", "check the database URL (--db)"),
    ("run the task again", "run the command again"),
)


def redact(text: str) -> str:
    """``text`` without any token (JWS-shaped text) or any word of the command line that looks like a token
    or a key (all of it a long base64url or hex run), each replaced by ``<redacted>``. Paths and names
    stay readable: only a whole word of the command line, or a whole JWS, is replaced."""
    words = {value for word in _ARGV for value in (word, word.partition("=")[2]) if _SECRET_LIKE.fullmatch(value)}
    for word in sorted(words, key=len, reverse=True):
        text = text.replace(word, REDACTED)
    return _TOKEN_LIKE.sub(REDACTED, text)


def cli_message(text: str) -> str:
    """An error message as the CLI prints it: in its own words, and redacted."""
    for airflow, cli in _CLI_WORDING:
        text = text.replace(airflow, cli)
    return redact(text)


class _Parser(argparse.ArgumentParser):
    """argparse, except that its error messages (which quote the argument: "invalid choice: '…'",
    "unrecognized arguments: …") never echo a token or a key pasted in the wrong place."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact(message)}\n")


# --- where things come from -------------------------------------------------------------------
def open_store(spec: str) -> ProjectStore:
    """``vault:<mount>/<path>`` (with VAULT_ADDR and VAULT_TOKEN) or a directory."""
    from pseudonymise.core.issuer import DirectoryStore, VaultStore
    if spec.startswith("vault:"):
        mount, _, path = spec[len("vault:"):].partition("/")
        addr, token = os.environ.get("VAULT_ADDR"), os.environ.get("VAULT_TOKEN")
        if not addr or not token:
            raise IssuerError("a vault: store needs VAULT_ADDR and VAULT_TOKEN in the environment")
        return VaultStore(addr, token, mount=mount or "secret", path=path or "pseudonymise")
    return DirectoryStore(spec)


class CliTokens:
    """The CLI's token source: ``--token-file`` (``-`` for standard input), ``--token-env``,
    ``PSEUDONYMISE_TOKEN`` or standard input when it is not a terminal; the issuer keys from
    ``--issuer-keys``, ``PSEUDONYMISE_ISSUER_KEYS`` or the local store's issuer; Transit HMACs with
    ``VAULT_ADDR`` and ``VAULT_TOKEN``. Nothing to mask: the CLI never prints a token."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @property
    def project(self) -> str | None:
        """``--project``: refuse tokens of any other project."""
        return getattr(self.args, "project", None) or None

    def get_token(self) -> str:
        args = self.args
        if args.token_file:
            if args.token_file == "-":
                text = sys.stdin.read()
            else:
                try:
                    text = Path(args.token_file).read_text(encoding="utf-8")
                except OSError as exc:
                    raise TokenError(f"cannot read the token file {args.token_file!r}: {exc.strerror}") from exc
        elif args.token_env:
            if args.token_env not in os.environ:
                raise TokenError(f"environment variable {args.token_env} is not set; export the token in it")
            text = os.environ[args.token_env]
        elif os.environ.get(TOKEN_ENV):
            text = os.environ[TOKEN_ENV]
        elif not sys.stdin.isatty():
            text = sys.stdin.read()
        else:
            raise TokenError(
                f"no token given: use --token-file FILE, --token-env VAR, set {TOKEN_ENV}, or pipe it on standard input"
            )
        return text.strip()

    def get_trusted_keys(self) -> TrustedKeys:
        from pseudonymise.core.issuer import Issuer
        from pseudonymise.core.tokens import TrustedKeys
        spec = self.args.issuer_keys or os.environ.get("PSEUDONYMISE_ISSUER_KEYS")
        if spec:
            if spec.lstrip().startswith("{") or spec.lstrip().startswith("["):
                return TrustedKeys.from_jwks(spec)
            try:
                return TrustedKeys.from_jwks(Path(spec).read_text(encoding="utf-8"))
            except OSError as exc:
                raise TokenError(f"cannot read issuer keys from {spec!r}: {exc.strerror}") from exc
        try:
            return Issuer(open_store(self.args.store)).public_keys()
        except IssuerError as exc:
            raise TokenError(
                "no trusted issuer keys: pass --issuer-keys FILE (from `pseudonymise issuer public-key`) "
                "or set PSEUDONYMISE_ISSUER_KEYS"
            ) from exc

    def get_mac_service(self, token: Token) -> TransitMac | None:
        """For a token whose key is held in Vault Transit: a client from VAULT_ADDR and VAULT_TOKEN."""
        if token.key_ref is None:
            return None
        client = VaultClient.from_environment()
        if client is None:
            raise TokenError(f"token {token.jti}'s key is held in Vault Transit: set VAULT_ADDR and VAULT_TOKEN")
        return TransitMac(client, token.key_ref["mount"], token.key_ref["name"], key_version=token.key_version)

    def mask(self, secret: str) -> None:
        """Nothing to mask: the CLI never prints or logs a token."""


def build_policy(args: argparse.Namespace) -> ColumnPolicy:
    if args.policy:
        policy = ColumnPolicy.from_file(args.policy)
        if args.columns or args.drop or args.keep:
            raise PolicyError("give either --policy or --columns/--keep/--drop, not both")
        return policy
    if not args.columns:
        raise PolicyError("say which columns to pseudonymise: --columns a,b or --policy FILE")
    normalise = _pairs(args.normalise, "--normalise")
    domains = _pairs(args.domain, "--domain")
    rules: dict[str, ColumnRule] = {}
    for column in _split(args.columns):
        rules[column] = ColumnRule(column, "pseudonymise",
                                   tuple(_split(normalise.pop(column, ""))), domains.pop(column, ""))
    for extra in (normalise, domains):
        if extra:
            raise PolicyError(f"{', '.join(extra)} named in --normalise/--domain are not in --columns")
    for column in _split(args.keep or ""):
        rules[column] = ColumnRule(column, "keep")
    for column in _split(args.drop or ""):
        rules[column] = ColumnRule(column, "drop")
    return ColumnPolicy(rules, args.default)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()] if text else []


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        column, sep, value = item.partition("=")
        if not sep:
            raise PolicyError(f"{flag} takes COLUMN=VALUE, got {item!r}")
        out[column.strip()] = value
    return out


class ProgressPrinter:
    """Rows and rate on standard error, at most every half second, when asked or on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = self.last = time.monotonic()

    def __call__(self, stats: Stats) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.5:
            return
        self.last = now
        rate = stats.rows_in / max(now - self.start, 1e-9)
        print(f"  … {stats.rows_in:,} rows ({rate:,.0f} rows/s)", file=sys.stderr, flush=True)


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def existing_store(args: argparse.Namespace) -> Store:
    """The audit database of a command that reads or acts on an existing audit (``audit verify``/``show``/
    ``checkpoint``, ``token revoke``/``revocations``, ``escrow purge``, ``subject erase``): refused, with
    nothing created, when the SQLite file or the audit table is not there. A command that uses a token
    (``file …``) creates them instead: its run is the audit's first row."""
    import sqlalchemy as sa

    from pseudonymise.core.pipeline import Store
    url = sa.engine.make_url(args.db)
    table, schema = getattr(args, "table", "pseudonymise_audit"), getattr(args, "schema", None)
    if url.get_backend_name() == "sqlite" and not url.query.get("uri"):
        path = url.database or ""
        if path in ("", ":memory:"):
            raise AuditError(f"--db {args.db!r} is an in-memory SQLite database, which holds no audit; give the "
                             "audit database the runs wrote to, e.g. sqlite:///pseudonymise.db")
        if not Path(path).is_file():
            raise AuditError(f"no audit database at {path!r}: the file does not exist (nothing was created); "
                             "give the audit database the runs wrote to with --db or PSEUDONYMISE_DB")
    store = Store(args.db, audit_table=table, schema=schema)
    with store.engine.connect() as conn:
        present = sa.inspect(conn).has_table(table, schema=schema)
    if not present:
        where = f"{schema}.{table}" if schema else table
        raise AuditError(f"the audit database {url.render_as_string(hide_password=True)!r} has no audit table "
                         f"{where!r} (nothing was created); check --db, --table and --schema")
    return store


# --- commands ---------------------------------------------------------------------------------
def cmd_issuer_init(args: argparse.Namespace) -> int:
    from pseudonymise.core.issuer import Issuer
    issuer = Issuer.init(open_store(args.store), args.issuer_id)
    print(f"issuer {issuer.id!r} created in {issuer.store} (key id {issuer.kid})")
    return 0


def cmd_issuer_public_key(args: argparse.Namespace) -> int:
    from pseudonymise.core.issuer import Issuer
    jwks = json.dumps(Issuer(open_store(args.store)).public_keys().to_jwks(), indent=2)
    if args.output:
        Path(args.output).write_text(jwks + "\n", encoding="utf-8")
        print(f"issuer public keys written to {args.output}", file=sys.stderr)
    else:
        print(jwks)
    return 0


def cmd_project_create(args: argparse.Namespace) -> int:
    from pseudonymise.core.issuer import Issuer
    from pseudonymise.core.tokens import parse_instant
    transit_client = None
    if args.custody == "transit":
        vault = VaultClient.from_environment()
        if vault is None:
            raise IssuerError("--custody transit needs VAULT_ADDR and VAULT_TOKEN in the environment")
        transit_client = vault
    issuer = Issuer(open_store(args.store), transit_client=transit_client)
    retention_until = parse_instant(args.retention_until) if args.retention_until else None
    project = issuer.create_project(
        args.project, method=args.method, treatment=args.treatment, retention_until=retention_until,
        retention=args.retention, format=PseudonymFormat(args.alphabet, args.length, args.prefix),
        custody=args.custody, transit_mount=args.transit_mount,
    )
    _emit(project.settings())
    return 0


def cmd_project_list(args: argparse.Namespace) -> int:
    from pseudonymise.core.issuer import Issuer
    _emit([p.settings() for p in Issuer(open_store(args.store)).projects()])
    return 0


def cmd_project_show(args: argparse.Namespace) -> int:
    from pseudonymise.core.issuer import Issuer
    _emit(Issuer(open_store(args.store)).project(args.project).settings())
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    from pseudonymise.core.issuer import Issuer
    max_uses = args.max_uses
    if max_uses is None and args.kind == "reverse":
        max_uses = 1  # docs/design.md §3 (v1.1): a reverse token is single-use unless asked otherwise
    if max_uses == 0:
        max_uses = None  # --max-uses 0: no limit but the token's lifetime
    token = Issuer(open_store(args.store)).issue(args.project, args.kind, expires_in=args.expires_in,
                                                 source_project=args.source_project, max_uses=max_uses)
    if args.output == "-":
        print(token)
    else:
        path = Path(args.output)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(token + "\n")
        os.chmod(path, 0o600)
        uses = "any number of uses" if max_uses is None else f"{max_uses} use{'s' if max_uses != 1 else ''}"
        print(f"{args.kind} token for project {args.project!r} ({uses} until it expires) written to {path} "
              "(mode 0600)", file=sys.stderr)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from pseudonymise.core.audit import AuditUse
    from pseudonymise.core.use import RunContext, current_user
    store = existing_store(args)
    use = AuditUse(operation="revoke", source="cli", context=RunContext(triggered_by=current_user()).audit_fields())
    store.audit.revoke(args.jti, args.reason, use)
    print(f"token {args.jti} revoked; every later use of it is refused and audited 'denied' (audit use {use.use_id})")
    return 0


def cmd_token_revocations(args: argparse.Namespace) -> int:
    rows = existing_store(args).audit.revocations()
    if args.json:
        print(json.dumps([{**r, "revoked_at": utc_seconds(r["revoked_at"])} for r in rows], indent=2))
    elif not rows:
        print("no token has been revoked")
    for r in rows if not args.json else []:
        print(f"{utc_seconds(r['revoked_at'])}  {r['jti']}  by {r['revoked_by'] or '?'}: {r['reason']}")
    return 0


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from pseudonymise.core.tokens import verify_token
    tokens = CliTokens(args)
    raw = tokens.get_token()
    keys = tokens.get_trusted_keys()
    try:
        token = verify_token(raw, keys)
        result: dict[str, Any] = {"valid": True, **token.public_claims()}
    except TokenError as exc:
        result = {"valid": False, "error": type(exc).__name__, "reason": cli_message(str(exc))}
    if args.field:
        if args.field not in result:
            raise TokenError(f"the token has no claim {args.field!r}; it has {', '.join(sorted(result))}")
        value = result[args.field]
        print(value if isinstance(value, str) else json.dumps(value))
    elif args.json:
        _emit(result)
    else:
        print(_claims_text(result))
    return 0 if result["valid"] else 1


#: the claims that are instants (seconds since 1970), printed as UTC times
_TIME_CLAIMS = {"iat": "issued", "nbf": "valid from", "exp": "expires"}


def human_time(value: datetime | int | float, now: datetime | None = None) -> str:
    """``2026-12-31 00:00 UTC (in 31 days)``: an instant in UTC to the minute, and how far it is from now."""
    when = datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else value.astimezone(UTC)
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    ago = seconds >= 0
    seconds = abs(seconds)
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size * 0.995:  # a year's token issued a few seconds ago expires "in 1 year"
            count = max(1, round(seconds / size))
            span = f"{count} {unit}{'s' if count != 1 else ''}"
            break
    else:
        return f"{when:%Y-%m-%d %H:%M} UTC (now)"
    return f"{when:%Y-%m-%d %H:%M} UTC ({span} ago)" if ago else f"{when:%Y-%m-%d %H:%M} UTC (in {span})"


def _claims_text(result: dict[str, Any]) -> str:
    """``token inspect``'s answer for people: one claim a line, times in UTC with how far they are."""
    from pseudonymise.core.tokens import parse_instant
    lines = []
    for name, value in result.items():
        if name in _TIME_CLAIMS:
            text = f"{human_time(value)}  [{_TIME_CLAIMS[name]}]"
        elif name == "retention_until":
            text = human_time(parse_instant(value))
        elif isinstance(value, dict | list):
            text = json.dumps(value, sort_keys=True)
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"{name + ':':<21} {text}")
    return "\n".join(lines)


class OutputFile:
    """The output file of a ``file`` command, written atomically (a :class:`~pseudonymise.core.plan.Destination`).

    A Parquet output of a pseudonymisation keeps the input's Parquet types for the columns that pass
    through and gives pseudonymised columns the string type; a reversal writes originals of any type
    where the input held text pseudonyms, so its output schema is inferred from the first batch.
    """

    #: the file sinks write ``pyarrow.RecordBatch`` es as they are
    takes_arrow = True

    def __init__(self, args: argparse.Namespace, source: Source, pseudonymised: set[str] | None) -> None:
        """:param pseudonymised: the columns whose output is text (pseudonymised, generalised, masked); ``None`` for
            a reversal."""
        self.path, self.fmt, self.source, self.pseudonymised = args.output, args.output_format, source, pseudonymised
        self.delimiter = args.output_delimiter or args.delimiter

    def open(self, columns: list[str], conn: Any) -> Sink:
        from pseudonymise.core.files import open_sink
        schema = None
        input_schema = getattr(self.source, "schema", None)  # a Parquet input's Arrow schema
        if input_schema is not None and self.pseudonymised is not None \
                and Path(self.path).suffix.lower() in (".parquet", ".pq"):
            import pyarrow as pa

            schema = pa.schema([pa.field(name, pa.string()) if name in self.pseudonymised else input_schema.field(name)
                                for name in columns])
        return open_sink(self.path, columns, self.fmt, schema, self.delimiter)


def _report(summary: Any, started: float) -> None:
    elapsed = time.monotonic() - started
    counts = summary.counts
    rate = counts.get("rows_in", 0) / max(elapsed, 1e-9)
    print(
        f"{summary.operation}: {counts.get('rows_in', 0):,} rows in, {counts.get('rows_out', 0):,} out, "
        f"{counts.get('values_pseudonymised', 0):,} values, {counts.get('nulls', 0):,} NULL, "
        f"{counts.get('escrow_rows', 0):,} escrow rows in {elapsed:.2f}s ({rate:,.0f} rows/s); audit use {summary.use_id}",
        file=sys.stderr,
    )


def _file_source(args: argparse.Namespace, batch_size: int | None = None) -> CsvSource | ParquetSource:
    """The input of a ``file`` command, refused when it is also the output (after symbolic links and relative
    paths are resolved), or when its header says the CSV delimiter is another one."""
    from pseudonymise.core.files import open_source
    source_path, output_path = Path(args.input).resolve(), Path(args.output).resolve()
    if source_path == output_path or (output_path.exists() and source_path.exists()
                                      and os.path.samefile(source_path, output_path)):
        raise DataIOError(f"the output {args.output!r} is the input file: it would be overwritten; write to "
                          "another file")
    try:
        return open_source(args.input, args.input_format, batch_size or args.batch_size, args.delimiter)
    except DelimiterError as exc:
        raise DelimiterError(f"{exc} (--delimiter {_DELIMITER_ARGUMENT.get(exc.seen, exc.seen)})", exc.seen) from None


def cmd_file_pseudonymise(args: argparse.Namespace, secondary: bool = False) -> int:
    policy = build_policy(args)
    sample = DRY_RUN_SAMPLE if args.sample is None else args.sample
    batch_size = max(1, min(args.batch_size, sample)) if args.dry_run else args.batch_size  # no more than the sample
    source = _file_source(args, batch_size)
    try:
        if not args.dry_run and args.sample is None:
            # parse the first batches on another core while the engine loads and the audit opens (the file
            # only: the token is used after its audited start, as ever)
            source.start_reading()
        return _file_pseudonymise(args, secondary, policy, source, sample)
    finally:
        source.close()


def _file_pseudonymise(args: argparse.Namespace, secondary: bool, policy: ColumnPolicy,
                       source: CsvSource | ParquetSource, sample: int) -> int:
    from pseudonymise.core.pipeline import Store, run_dry_run, run_pseudonymisation
    from pseudonymise.core.plan import plan_transfer
    from pseudonymise.core.use import RunContext, current_user

    _freeze_loaded()
    risk = build_risk(args)
    transfer = plan_transfer(source, OutputFile(args, source, set(policy.text_columns)), policy,
                             source_label=f"file:{args.input}", target_label=f"file:{args.output}")
    started = time.monotonic()
    if args.dry_run:
        summary = run_dry_run(Store(args.db), CliTokens(args), policy, transfer, RunContext(triggered_by=current_user()),
                              secondary=secondary, sample=sample, risk=risk,
                              risk_memory_groups=args.risk_memory_groups)
        _emit(summary.as_dict())
        _report_dry_run(summary.dry_run or {})
        return 0
    if args.sample is not None:
        raise PolicyError("--sample applies to a dry run only; add --dry-run")
    summary = run_pseudonymisation(Store(args.db), CliTokens(args), policy, transfer,
                                   RunContext(triggered_by=current_user()), secondary=secondary,
                                   progress=ProgressPrinter(args.progress), risk=risk,
                                   risk_memory_groups=args.risk_memory_groups)
    _report(summary, started)
    if summary.risk is not None:
        r = summary.risk
        print(f"risk gate passed: {r['classes']:,} classes, smallest {r['smallest_class']} (k={r['k']})", file=sys.stderr)
    return 0


def _report_dry_run(report: dict[str, Any]) -> None:
    """What a real run would do, for a person (the JSON on standard output says the same)."""
    lines = [f"dry run: nothing was written; {report.get('sample_rows', 0):,} rows sampled ({report.get('sample')})",
             f"  target: {report.get('target')} ({report.get('would')})"]
    lines += [f"  {column}: {action}" for column, action in report.get("actions", {}).items()]
    risk = report.get("risk")
    if risk:
        verdict = "would pass" if risk["passed"] else "would FAIL"
        lines.append(f"  risk gate on the sample {verdict}: {risk['classes']:,} classes, smallest {risk['smallest_class']}, "
                     f"{risk['classes_below_k']:,} classes ({risk['rows_below_k']:,} rows) below k={risk['k']}"
                     + (f"; {risk['classes_below_l']:,} classes below l={risk['l']['min']}" if "l" in risk else ""))
        lines.append("  (a sample's classes are not the whole run's: the real run's gate decides)")
    print("\n".join(lines), file=sys.stderr)


def build_risk(args: argparse.Namespace) -> RiskSpec | None:
    """The risk gate of ``--risk FILE`` or of ``--quasi-identifiers`` with ``--risk-k``, ``--l-column``, ``--l-min``."""
    from pseudonymise.core.risk import RiskSpec
    flags = args.quasi_identifiers or args.risk_k is not None or args.l_column or args.l_min is not None
    if args.risk:
        if flags:
            raise PolicyError("give either --risk FILE or --quasi-identifiers/--risk-k/--l-column/--l-min, not both")
        try:
            return RiskSpec.parse(json.loads(Path(args.risk).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise PolicyError(f"cannot read the risk settings {args.risk!r} ({exc.__class__.__name__}); check the "
                              "path and JSON") from None
    if not flags:
        return None
    if not args.quasi_identifiers:
        raise PolicyError("--risk-k, --l-column and --l-min need --quasi-identifiers a,b,c")
    if args.l_min is not None and not args.l_column:
        raise PolicyError("--l-min needs --l-column, the sensitive column")
    data: dict[str, Any] = {"quasi_identifiers": _split(args.quasi_identifiers),
                            "k": 5 if args.risk_k is None else args.risk_k}
    if args.l_column:
        data["l"] = {"column": args.l_column, "min": 2 if args.l_min is None else args.l_min}
    return RiskSpec.parse(data)


def cmd_risk_report(args: argparse.Namespace) -> int:
    from pseudonymise.core.db import make_engine
    from pseudonymise.core.files import open_source
    from pseudonymise.core.pipeline import Store, run_risk_report
    from pseudonymise.core.risk import describe_batches, describe_table
    from pseudonymise.core.use import RunContext, current_user
    spec = build_risk(args)
    if spec is None:
        raise PolicyError("say which columns are quasi-identifiers: --quasi-identifiers a,b,c (or --risk FILE)")
    if bool(args.input) == bool(args.source_db):
        raise PolicyError("describe either a file (INPUT) or a table (--source-db with --table or --query)")
    if args.input:
        label = f"file:{args.input}"
        source = open_source(args.input, args.input_format, args.batch_size)
        batches = source.record_batches if hasattr(source, "record_batches") else source.batches

        def describe() -> Any:
            return describe_batches(batches(), source.columns, spec, label, memory_groups=args.risk_memory_groups,
                                    max_quasi_identifiers=args.max_quasi_identifiers)
    else:
        if bool(args.table) == bool(args.query):
            raise PolicyError("with --source-db, give --table or --query")
        label = f"table:{(args.schema + '.') if args.schema else ''}{args.table}" if args.table else "query"
        engine = make_engine(args.source_db)

        def describe() -> Any:
            with engine.connect() as conn:
                return describe_table(conn, args.table, spec, schema=args.schema, query=args.query, label=label,
                                      max_quasi_identifiers=args.max_quasi_identifiers)
    report = run_risk_report(Store(args.db), describe, RunContext(triggered_by=current_user()), source=label,
                             columns=spec.columns)
    if args.json:
        _emit(report.as_dict())
    else:
        print(report.text())
    return 0


def cmd_file_secondary(args: argparse.Namespace) -> int:
    return cmd_file_pseudonymise(args, secondary=True)


def cmd_file_reverse(args: argparse.Namespace) -> int:
    from pseudonymise.core.pipeline import Store, run_reversal
    from pseudonymise.core.plan import plan_transfer
    from pseudonymise.core.use import RunContext, current_user
    columns = _split(args.columns)
    source = _file_source(args)
    transfer = plan_transfer(source, OutputFile(args, source, None), None,
                             source_label=f"file:{args.input}", target_label=f"file:{args.output}")
    started = time.monotonic()
    try:
        summary = run_reversal(Store(args.db), CliTokens(args), columns, transfer,
                               RunContext(triggered_by=current_user()), progress=ProgressPrinter(args.progress),
                               require_all=not args.allow_missing)
    except EscrowNotFoundError as exc:
        raise EscrowNotFoundError(f"{exc}. Check the column and that the reverse token is of the project that "
                                  "pseudonymised the file; --allow-missing writes them as empty instead") from None
    _report(summary, started)
    if summary.counts.get("not_found"):
        print(f"warning: {summary.counts['not_found']} pseudonym(s) had no escrow and were written as empty "
              "(--allow-missing)", file=sys.stderr)
    return 0


def _read_values(path: str, what: str) -> list[str]:
    """One value per line of ``path`` (``-``: standard input), UTF-8; blank lines skipped. Never printed."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ErasureError(f"cannot read the {what} file {path!r} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ErasureError(f"the {what} file {path!r} is not UTF-8 text; convert it (one value per line)") from None
    return [line.strip("\r") for line in text.split("\n") if line.strip()]


def cmd_subject_erase(args: argparse.Namespace) -> int:
    from pseudonymise.core.db import make_engine
    from pseudonymise.core.erase import ErasureTarget, erase_by_identifiers, erase_by_pseudonyms
    from pseudonymise.core.use import RunContext, current_user

    if bool(args.identifiers) == bool(args.pseudonyms):
        raise ErasureError("give either --identifiers FILE (with the project's pseudonymisation token) or "
                           "--pseudonyms FILE (with --project)")
    store = existing_store(args)
    target_engine = make_engine(args.target_db) if args.target_db else store.engine
    targets = []
    for spec in args.target:
        table, sep, column = spec.rpartition(".")
        if not sep or not table or not column:
            raise ErasureError(f"--target {spec!r} must be TABLE.COLUMN (the column holding the pseudonyms)")
        schema, _, name = table.rpartition(".")
        targets.append(ErasureTarget(target_engine, name, column, schema or None))
    run = RunContext(triggered_by=current_user())
    if args.identifiers:
        rules = [ColumnRule(args.column, normalise=tuple(_split(args.normalise)), domain=domain)
                 for domain in (args.domain or [""])]
        summary = erase_by_identifiers(store, CliTokens(args), _read_values(args.identifiers, "identifiers"), rules,
                                       targets, run)
    else:
        if not args.project:
            raise ErasureError("--pseudonyms needs --project: the project whose pseudonyms they are")
        summary = erase_by_pseudonyms(store, args.project, _read_values(args.pseudonyms, "pseudonyms"), targets, run)
    print(f"erased {summary.counts['escrow_rows']} escrow row(s) of {summary.counts['values_pseudonymised']} "
          f"pseudonym(s) in project {summary.project!r}; reversal of them is no longer possible")
    for key, value in summary.counts.items():
        if key.startswith("rows_deleted:"):
            print(f"deleted {value} row(s) of {key.split(':', 1)[1]}")
    print(f"audit use {summary.use_id}")
    return 0


def cmd_escrow_purge(args: argparse.Namespace) -> int:
    from pseudonymise.core.pipeline import run_purge
    from pseudonymise.core.use import RunContext, current_user
    summary = run_purge(existing_store(args), RunContext(triggered_by=current_user()), project=args.project)
    print(f"purged {summary.counts['escrow_rows']} escrow row(s) past retention; audit use {summary.use_id}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    store = existing_store(args)
    witnessed = _verify_witness(args, store) if args.witness else None  # the chain's verification included
    result = witnessed.chain if witnessed is not None else store.audit.verify()
    print(witnessed if witnessed is not None else result)
    anchored = witnessed is None or witnessed.ok
    incomplete = store.audit.incomplete_uses()
    if incomplete:
        print(f"{len(incomplete)} use(s) started without finishing (crashed or still running): "
              + ", ".join(incomplete[:10]))
    if getattr(args, "escrow", False):
        return 0 if _verify_escrow(args, store, result.ok) and result.ok and anchored else 1
    return 0 if result.ok and anchored else 1


def _verify_escrow(args: argparse.Namespace, store: Store, chain_ok: bool) -> bool:
    """``audit verify --escrow``: list the escrow rows reversal would refuse (docs/design.md §5.1), by pseudonym.
    With a reverse token (an audited use) every row of its project is opened and checked, never shown."""
    from pseudonymise.core.escrow import unproven_rows
    from pseudonymise.core.use import RunContext, TokenUse, current_user
    if not chain_ok:
        print("escrow not checked: it is proven by the audit chain, which does not verify")
        return False
    with store.engine.connect() as conn:
        listed = store.listed_escrow_batches(conn)
    if args.token_file or args.token_env:
        with TokenUse(store.audit, "verify", CliTokens(args), kind="reverse", source="escrow",
                      run=RunContext(triggered_by=current_user())) as use, store.engine.connect() as conn:
            assert use.token is not None
            rows = unproven_rows(conn, store.escrow, listed, token=use.token)
            use.counts.update(escrow_rows=len(rows))
        checked = f"every escrow row of project {use.token.project!r} opened and checked with the reverse token"
    else:
        with store.engine.connect() as conn:
            rows = unproven_rows(conn, store.escrow, listed, project=args.project)
        checked = "escrow batches checked against the digests the audit lists (add a reverse token to check values)"
    for row in rows:
        print(f"UNPROVEN escrow row: project {row.project!r}, pseudonym {row.pseudonym}, batch {row.batch_id}: "
              f"{row.reason}")
    print(f"escrow: {checked}; {len(rows)} row(s) reversal would refuse")
    return not rows


def cmd_audit_show(args: argparse.Namespace) -> int:
    store = existing_store(args)
    rows = store.audit.recent(args.limit, project=args.project, outcome=args.outcome)
    if args.json:
        _emit(rows)
        return 0
    if not rows:
        print("no audit row matches" if args.project or args.outcome else "the audit is empty")
    for row in reversed(rows):
        shown = {k: "-" if v is None else v for k, v in row.items()}  # a count not recorded is "-", never None
        when = row["recorded_at"].strftime("%Y-%m-%d %H:%M:%S")
        counts = f" in={shown['rows_in']} out={shown['rows_out']} null={shown['rows_null']} " \
            f"escrow={shown['escrow_rows']}" if row["event"] == "finished" else ""
        error = f" {row['error_class']}: {cli_message(str(row['error_message']))}" if row["error_class"] else ""
        print(f"#{row['seq']:<5} {when} UTC {row['operation']:<12} {row['outcome']:<8} project={shown['project']} "
              f"token={shown['token_jti']}{counts}{error}")
    return 0


# --- signed checkpoints (docs/design.md §6.1) ---------------------------------------------------------
def _vault_client(what: str) -> VaultClient:
    client = VaultClient.from_environment()
    if client is None:
        raise CheckpointError(f"{what} needs VAULT_ADDR and VAULT_TOKEN in the environment")
    return client


def _mount_and_name(spec: str, flag: str) -> tuple[str, str]:
    mount, _, name = spec.strip("/").partition("/")
    if not mount or not name:
        raise CheckpointError(f"{flag} takes MOUNT/NAME (for example transit/audit-signing), got {spec!r}")
    return mount, name


def _signer(args: argparse.Namespace) -> CheckpointSigner:
    """The audit signing key: a Transit key, or a private JWK from a file or an environment variable."""
    from pseudonymise.core.checkpoint import LocalSigner, TransitSigner
    if args.transit_key:
        return TransitSigner(_vault_client("--transit-key"), *_mount_and_name(args.transit_key, "--transit-key"))
    if args.signing_key:
        try:
            text = Path(args.signing_key).read_text(encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"cannot read the audit signing key file {args.signing_key!r}: {exc.strerror}") from exc
    else:
        variable = args.signing_key_env or SIGNING_KEY_ENV
        text = os.environ.get(variable, "")
        if not text.strip():
            raise CheckpointError(
                f"no audit signing key: pass --signing-key FILE (written by `pseudonymise audit keygen`), set "
                f"{variable}, or --transit-key MOUNT/NAME with VAULT_ADDR and VAULT_TOKEN")
    return LocalSigner.from_jwk(text)


def _witnesses(specs: Sequence[str]) -> list[Witness]:
    from pseudonymise.core.checkpoint import FileWitness, VaultKVWitness
    out: list[Witness] = []
    for spec in specs:
        if spec.startswith("vault:"):
            mount, path = _mount_and_name(spec[len("vault:"):], "--witness vault:")
            out.append(VaultKVWitness(_vault_client(f"--witness {spec}"), mount, path))
        elif "://" in spec:
            raise CheckpointError(f"--witness {spec!r}: object-storage URIs are not supported; give a local or mounted "
                                  "file path, or vault:MOUNT/PATH")
        else:
            out.append(FileWitness(spec))
    return out


def _public_keys(args: argparse.Namespace) -> PublicKeys:
    from pseudonymise.core.checkpoint import PublicKeys
    spec = args.public_keys or os.environ.get(PUBLIC_KEYS_ENV)
    if spec:
        if spec.lstrip().startswith(("{", "[")):
            return PublicKeys.from_jwks(spec)
        try:
            return PublicKeys.from_jwks(Path(spec).read_text(encoding="utf-8"))
        except OSError as exc:
            raise CheckpointError(f"cannot read the audit public keys from {spec!r}: {exc.strerror}") from exc
    if args.transit_key or args.signing_key or os.environ.get(args.signing_key_env or SIGNING_KEY_ENV):
        return _signer(args).public_keys()
    raise CheckpointError(f"--witness needs the audit public keys: pass --public-keys FILE (the JWKS printed by "
                          f"`pseudonymise audit keygen`), set {PUBLIC_KEYS_ENV}, or name the key with --transit-key")


def _verify_witness(args: argparse.Namespace, store: Store) -> WitnessVerifyResult:
    from pseudonymise.core.checkpoint import verify_against_witness
    return verify_against_witness(store.audit, _witnesses(args.witness), _public_keys(args), audit_id=args.audit_id)


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from pseudonymise.core.checkpoint import Checkpointer
    store = existing_store(args)
    result = Checkpointer(store.audit, _signer(args), _witnesses(args.witness), audit_id=args.audit_id).checkpoint()
    if result is None:
        print("the audit is empty: nothing to checkpoint yet")
        return 0
    print(f"{result}; recorded in {store.audit.table.name}_checkpoint" if result.recorded else str(result))
    return 0


def cmd_audit_keygen(args: argparse.Namespace) -> int:
    from pseudonymise.core.checkpoint import LocalSigner, TransitSigner
    if args.transit_key:
        mount, name = _mount_and_name(args.transit_key, "--transit-key")
        keys = TransitSigner.create(_vault_client("--transit-key"), mount, name).public_keys()
        print(f"Vault Transit key {mount}/{name} (ed25519) is ready; its public keys:", file=sys.stderr)
    else:
        if not args.output:
            raise CheckpointError("say where the private key goes: --output FILE (mode 0600), or create it in Vault "
                                  "with --transit-key MOUNT/NAME")
        signer = LocalSigner.generate()
        try:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise CheckpointError(f"{args.output!r} exists; a signing key is never overwritten: choose another path") from exc
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(signer.private_jwk()) + "\n")
        keys = signer.public_keys()
        print(f"audit signing key {signer.kid} written to {args.output} (mode 0600); keep it away from the audit "
              "database. Its public keys (give them to verifiers):", file=sys.stderr)
    print(json.dumps(keys.to_jwks(), indent=2))
    return 0


def _add_checkpoint_args(p: argparse.ArgumentParser, signing: bool) -> None:
    g = p.add_argument_group("signed checkpoints and witnesses (docs/design.md §6.1)")
    g.add_argument("--witness", action="append", default=[], metavar="FILE|vault:MOUNT/PATH",
                   help="a JSON-lines file, or Vault KV v2 (VAULT_ADDR, VAULT_TOKEN); repeat for several")
    g.add_argument("--audit-id", help="the audit's name in checkpoints (default <dialect>/<database>/<schema>/<table>)")
    g.add_argument("--transit-key", metavar="MOUNT/NAME",
                   help="an ed25519 Vault Transit key (VAULT_ADDR, VAULT_TOKEN): signs, or gives the public keys")
    g.add_argument("--signing-key", metavar="FILE", help="the private JWK from `audit keygen`")
    g.add_argument("--signing-key-env", metavar="VAR", help=f"read the private JWK from VAR (default {SIGNING_KEY_ENV})")
    if not signing:
        g.add_argument("--public-keys", metavar="FILE|JSON",
                       help=f"the signers' public JWKS (default {PUBLIC_KEYS_ENV}, or those of --transit-key/--signing-key)")


# --- parser -----------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_token_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token (never on the command line)")
    g.add_argument("--token-file", metavar="FILE", help="read the token from FILE ('-' for standard input)")
    g.add_argument("--token-env", metavar="VAR", help=f"read the token from environment variable VAR (default {TOKEN_ENV})")
    g.add_argument("--issuer-keys", metavar="FILE",
                   help="trusted issuer public keys (JWKS from `issuer public-key`); default: PSEUDONYMISE_ISSUER_KEYS "
                        "or the local store's issuer")
    g.add_argument("--project", help="refuse tokens of any other project")


#: what --delimiter accepts besides one character, and how a delimiter is written back as an argument
_DELIMITER_WORDS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
_DELIMITER_ARGUMENT = {"\t": "tab", ";": "';'", "|": "'|'", ",": "','"}


def parse_delimiter(text: str) -> str:
    value = _DELIMITER_WORDS.get(text.lower(), text)
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(f"{text!r} is not a CSV delimiter; give one character such as ';' or '|', "
                                         "or tab")
    return value


def _add_db_args(p: argparse.ArgumentParser, what: str = "the audit database") -> None:
    p.add_argument("--db", default=os.environ.get("PSEUDONYMISE_DB", DEFAULT_DB), metavar="URL",
                   help=f"{what}, as an SQLAlchemy URL (default {DEFAULT_DB}, or PSEUDONYMISE_DB)")


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    """--db, --table and --schema of a command that reads or acts on an existing audit database."""
    _add_db_args(p)
    p.add_argument("--table", default="pseudonymise_audit", help="the audit table (default pseudonymise_audit)")
    p.add_argument("--schema", help="the schema holding the audit table (PostgreSQL; default: the search path's)")


def _add_risk_args(p: argparse.ArgumentParser, *, report: bool = False) -> None:
    g = p.add_argument_group("re-identification risk" + ("" if report else " gate (fails the run, writing nothing)"))
    g.add_argument("--risk", metavar="FILE", help='JSON risk settings: {"quasi_identifiers": [...], "k": 5, '
                                                   '"l": {"column": "diagnosis", "min": 2}}')
    g.add_argument("--quasi-identifiers", metavar="A,B,C", help="comma-separated quasi-identifier columns")
    g.add_argument("--risk-k", type=int, metavar="K", help="smallest class size allowed (default 5)")
    g.add_argument("--l-column", metavar="COLUMN", help="sensitive column each class must show several values of")
    g.add_argument("--l-min", type=int, metavar="L", help="distinct sensitive values per class (default 2)")
    g.add_argument("--risk-memory-groups", type=int, default=MEMORY_GROUPS, metavar="N",
                   help=f"classes counted in memory before spilling to disk (default {MEMORY_GROUPS})")


def _add_file_args(p: argparse.ArgumentParser, policy: bool) -> None:
    p.add_argument("input", help="input .csv or .parquet file")
    p.add_argument("output", help="output .csv or .parquet file (written atomically; never the input file)")
    p.add_argument("--input-format", choices=("csv", "parquet"), help="override the input's extension")
    p.add_argument("--output-format", choices=("csv", "parquet"), help="override the output's extension")
    p.add_argument("--delimiter", type=parse_delimiter, default=",", metavar="CHAR",
                   help="the CSV field delimiter: one character, or tab (default ','); a header that looks "
                        "separated by another one is refused, naming it")
    p.add_argument("--output-delimiter", type=parse_delimiter, metavar="CHAR",
                   help="the output CSV's delimiter (default: the input's, --delimiter)")
    if policy:
        p.add_argument("--columns", help="comma-separated columns to pseudonymise")
        p.add_argument("--keep", help="comma-separated columns copied unchanged")
        p.add_argument("--drop", help="comma-separated columns left out of the output")
        p.add_argument("--default", choices=("error", "keep", "drop"), default="error",
                       help="what happens to columns not named (default: error, so nothing leaves unnoticed)")
        p.add_argument("--policy", metavar="FILE", help="a JSON column policy (see include/policies/): pseudonymise, keep, "
                       "drop, date_shift, generalise, mask, suppress")
    p.add_argument("--batch-size", type=int, default=50_000, help="rows per batch (default 50000)")
    _add_db_args(p, "the audit and escrow database (created at the first run)")
    p.add_argument("--progress", action="store_true", default=sys.stderr.isatty(),
                   help="print rows and rate on standard error (default: when it is a terminal)")
    _add_token_args(p)


#: The example of the whole tool: from nothing to a pseudonymised copy of the shipped sample, run from the
#: repository's root (tests/test_cli_help.py runs it, and every other example, on the shipped files).
WALKTHROUGH = """\
pseudonymise issuer init --issuer-id my-org
pseudonymise project create research-a --method reversible --retention 1y
pseudonymise token issue --project research-a --kind pseudonymisation --output research-a.token
pseudonymise file pseudonymise include/sample/patients.csv patients.pseudonymised.csv \\
    --policy include/policies/patients.json --token-file research-a.token
pseudonymise audit show"""


def _add_run_checks(p: argparse.ArgumentParser) -> None:
    _add_risk_args(p)
    g = p.add_argument_group("dry run")
    g.add_argument("--dry-run", action="store_true",
                   help="check the token, policy, types, collisions and risk gate on a sample; write nothing but the "
                        "audited dry_run use, and print what a real run would do")
    g.add_argument("--sample", type=int, metavar="N",
                   help=f"rows a dry run reads: the first N of the input (default {DRY_RUN_SAMPLE})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pseudonymise", formatter_class=_Formatter,
        description="Issue and inspect pseudonymisation tokens, and pseudonymise files without Airflow.",
        epilog="example (from the repository's root):\n" + textwrap.indent(WALKTHROUGH, "  "),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    parser.add_argument("--store", default=os.environ.get("PSEUDONYMISE_STORE", DEFAULT_STORE),
                        help="issuer store: a directory (default ~/.pseudonymise or PSEUDONYMISE_STORE) or "
                             "vault:<mount>/<path> with VAULT_ADDR and VAULT_TOKEN set")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True, help="what to work on")

    def command(group: Any, name: str, help_: str, example: str, func: Any) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help_, description=help_, formatter_class=_Formatter,
                             epilog="example:\n  " + example)
        p.set_defaults(func=func)
        return p

    def group(name: str, help_: str, example: str) -> Any:
        return groups.add_parser(name, help=help_, description=help_, formatter_class=_Formatter,
                                 epilog="example:\n  " + example).add_subparsers(
            dest="cmd", metavar="COMMAND", required=True, help="the command")

    issuer = group("issuer", "the token issuer's own key", "pseudonymise issuer init --issuer-id my-org")
    p = command(issuer, "init", "Create the issuer and its Ed25519 signing key in the store.",
                "pseudonymise --store ./my-org-issuer issuer init --issuer-id my-org", cmd_issuer_init)
    p.add_argument("--issuer-id", required=True, help="the issuer's name, written in every token's 'iss'")
    p = command(issuer, "public-key", "Print the issuer's public keys (JWKS) for consumers to trust.",
                "pseudonymise issuer public-key --output issuer-keys.json", cmd_issuer_public_key)
    p.add_argument("--output", metavar="FILE", help="write to FILE instead of standard output")

    project = group("project", "projects and their settings", "pseudonymise project create research-b --method reversible")
    p = command(project, "create", "Create a project with its own secret key (and escrow key pair if reversible).",
                "pseudonymise project create research-c --method reversible --treatment deterministic --retention 2y",
                cmd_project_create)
    p.add_argument("project", help="project id: lowercase letters, digits, '.', '_', '-'")
    p.add_argument("--method", choices=("reversible", "irreversible"), default="irreversible",
                   help="reversible keeps a sealed escrow so a reverse token can reveal originals (default "
                        "irreversible)")
    p.add_argument("--treatment", choices=("deterministic", "randomised"), default="deterministic",
                   help="deterministic: the same value gives the same pseudonym in every run; randomised: a new "
                        "one each time (default deterministic)")
    p.add_argument("--retention", type=parse_duration, help="retention period from now, e.g. 365d (default 1y)")
    p.add_argument("--retention-until", help="retention end as an ISO 8601 instant, e.g. 2028-01-01T00:00:00Z")
    p.add_argument("--alphabet", choices=tuple(ALPHABETS), default=DEFAULT_ALPHABET,
                   help=f"the pseudonyms' characters (default {DEFAULT_ALPHABET})")
    p.add_argument("--length", type=int, default=DEFAULT_LENGTH, help=f"pseudonym length (default {DEFAULT_LENGTH})")
    p.add_argument("--prefix", default="", help="text put in front of every pseudonym")
    p.add_argument("--custody", choices=("local", "transit"), default="local",
                   help="transit: the key is created in Vault Transit and never leaves it (needs VAULT_ADDR, VAULT_TOKEN)")
    p.add_argument("--transit-mount", default="transit", help="the Transit engine's mount (default transit)")
    command(project, "list", "List projects and their settings (no secrets).", "pseudonymise project list", cmd_project_list)
    p = command(project, "show", "Show one project's settings (no secrets).", "pseudonymise project show research-a",
                cmd_project_show)
    p.add_argument("project", help="the project id")

    token = group("token", "issue and inspect tokens",
                  "pseudonymise token issue --project research-a --kind pseudonymisation --output research-a.token")
    p = command(token, "issue", "Issue a signed token of a project.",
                "pseudonymise token issue --project research-a --kind reverse --expires-in 7d --output reverse.token",
                cmd_token_issue)
    p.add_argument("--project", required=True, help="the project whose token this is")
    p.add_argument("--kind", required=True, choices=("pseudonymisation", "reverse", "secondary"),
                   help="what the token allows: pseudonymise, reveal originals, or re-pseudonymise another "
                        "project's pseudonyms")
    p.add_argument("--expires-in", type=parse_duration, default=timedelta(days=30), help="lifetime, e.g. 30d (default)")
    p.add_argument("--source-project", help="for secondary tokens: the project whose pseudonyms they re-pseudonymise")
    p.add_argument("--output", required=True, help="file to write the token to (mode 0600), or '-' for standard output")
    p.add_argument("--max-uses", type=_non_negative, metavar="N",
                   help="uses the token allows, counted in the audit of whoever uses it (default: 1 for reverse "
                        "tokens, no limit otherwise; 0: no limit)")
    p = command(token, "revoke", "Revoke a token by its id (jti), for ever; audited. Every later use is refused.",
                "pseudonymise token revoke \"$(pseudonymise token inspect --token-file reverse.token --field jti)\" "
                "--reason 'laptop lost'", cmd_token_revoke)
    p.add_argument("jti", help="the token's id (`pseudonymise token inspect --field jti` prints it; the audit shows it)")
    p.add_argument("--reason", required=True, help="why: recorded with the revocation")
    _add_audit_args(p)
    p = command(token, "revocations", "List the revoked tokens of an audit database.",
                "pseudonymise token revocations --db sqlite:///pseudonymise.db", cmd_token_revocations)
    _add_audit_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(token, "inspect", "Verify a token and print its claims, never its secrets (times in UTC).",
                "pseudonymise token inspect --token-file research-a.token --issuer-keys issuer-keys.json", cmd_token_inspect)
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the claims as JSON (times in seconds since 1970)")
    output.add_argument("--field", metavar="CLAIM", help="print one claim's value only, e.g. jti")
    _add_token_args(p)

    files = group("file", "pseudonymise, re-pseudonymise or reverse CSV/Parquet files",
                  "pseudonymise file pseudonymise include/sample/patients.csv out.csv "
                  "--policy include/policies/patients.json --token-file research-a.token")
    p = command(files, "pseudonymise", "Pseudonymise chosen columns of a CSV or Parquet file.",
                "pseudonymise file pseudonymise include/sample/patients.csv out.parquet --columns patient_id "
                "--normalise patient_id=strip,upper --keep birth_year,visit_date,diagnosis_code,ward --drop name "
                "--token-file research-a.token", cmd_file_pseudonymise)
    _add_file_args(p, policy=True)
    p.add_argument("--normalise", action="append", metavar="COLUMN=N1,N2",
                   help="normalisers run before pseudonymising: strip, lower, upper, casefold, remove_whitespace, "
                        "remove:<chars>")
    p.add_argument("--domain", action="append", metavar="COLUMN=DOMAIN", help="per-column domain (default: none)")
    _add_run_checks(p)
    p = command(files, "secondary", "Re-pseudonymise pseudonymised columns with a secondary token.",
                "pseudonymise file secondary patients.pseudonymised.csv vendor.csv --columns patient_id "
                "--default keep --token-file vendor.token", cmd_file_secondary)
    _add_file_args(p, policy=True)
    p.set_defaults(normalise=None, domain=None)
    _add_run_checks(p)
    p = command(files, "reverse", "Reveal the originals of pseudonyms in a file with a reverse token (audited first). "
                "Fails, writing nothing, when a pseudonym has no escrow, unless --allow-missing.",
                "pseudonymise file reverse patients.pseudonymised.csv revealed.csv --columns patient_id "
                "--token-file reverse.token", cmd_file_reverse)
    _add_file_args(p, policy=False)
    p.add_argument("--columns", required=True, help="comma-separated pseudonym columns to reverse")
    missing = p.add_mutually_exclusive_group()
    missing.add_argument("--allow-missing", action="store_true",
                         help="write a pseudonym without escrow (unknown, erased, purged, or of another project) as "
                              "an empty field, with a warning and exit 0, instead of failing")
    missing.add_argument("--require-all", action="store_true",
                         help="fail, writing nothing, if any pseudonym has no escrow (the default; kept for scripts)")

    escrow = group("escrow", "the sealed escrow of reversible projects", "pseudonymise escrow purge --db sqlite:///pseudonymise.db")
    p = command(escrow, "purge", "Delete escrow rows past their retention end (audited).",
                "pseudonymise escrow purge --project research-a", cmd_escrow_purge)
    _add_db_args(p, "the database holding the escrow and the audit")
    p.add_argument("--project", help="only this project")

    subject = group("subject", "erase one person (or a few) on request",
                    "pseudonymise subject erase --pseudonyms pseudonyms.txt --project research-a")
    p = command(subject, "erase",
                "Erase subjects: delete their escrow rows (reversal severed for ever) and, with --target, the rows "
                "of tables that carry their pseudonyms; audited, counts only.",
                "pseudonymise subject erase --identifiers ids.txt --column patient_id --normalise strip,upper "
                "--token-file research-a.token --db sqlite:///pseudonymise.db", cmd_subject_erase)
    p.add_argument("--identifiers", metavar="FILE",
                   help="the subjects' original identifiers, one per line ('-': standard input); needs the "
                        "project's pseudonymisation token")
    p.add_argument("--pseudonyms", metavar="FILE", help="the subjects' pseudonyms, one per line; needs --project")
    p.add_argument("--column", default="id", help="the column name the loads pseudonymised (for the audit; default id)")
    p.add_argument("--domain", action="append", metavar="DOMAIN",
                   help="the domain the loads used (repeat for several; default: none)")
    p.add_argument("--normalise", metavar="N1,N2", help="the normalisers the loads used, e.g. strip,upper")
    p.add_argument("--target", action="append", default=[], metavar="[SCHEMA.]TABLE.COLUMN",
                   help="also delete the rows of this table whose COLUMN holds one of the pseudonyms (repeatable)")
    p.add_argument("--target-db", metavar="URL", help="the database of the targets (default: --db)")
    _add_db_args(p, "the database holding the escrow and the audit")
    _add_token_args(p)

    risk = group("risk", "re-identification risk of a file or table",
                 "pseudonymise risk report include/sample/patients.csv --quasi-identifiers birth_year,ward --risk-k 5")
    p = command(risk, "report", "Describe a file's or table's re-identification risk: class sizes and the rows below "
                "k per combination of quasi-identifiers (counts only; audited as risk_report).",
                "pseudonymise risk report patients.pseudonymised.csv --quasi-identifiers birth_year,ward "
                "--l-column diagnosis_code --l-min 2 --json", cmd_risk_report)
    p.add_argument("input", nargs="?", help="a .csv or .parquet file to describe (or --source-db)")
    p.add_argument("--input-format", choices=("csv", "parquet"), help="override the input's extension")
    p.add_argument("--source-db", metavar="URL", help="the database of the table to describe (SQLAlchemy URL)")
    p.add_argument("--table", help="the table to describe")
    p.add_argument("--schema", help="the table's schema")
    p.add_argument("--query", help="a query whose rows to describe, instead of --table")
    p.add_argument("--batch-size", type=int, default=50_000, help="rows per batch of a file (default 50000)")
    p.add_argument("--max-quasi-identifiers", type=int, default=MAX_REPORT_QIS, metavar="N",
                   help=f"refuse more quasi-identifiers than this: 2^N - 1 combinations (default {MAX_REPORT_QIS})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--db", default=os.environ.get("PSEUDONYMISE_DB", DEFAULT_DB),
                   help="the audit database, where the report is recorded (SQLAlchemy URL)")
    _add_risk_args(p, report=True)

    audit = group("audit", "the tamper-evident audit table", "pseudonymise audit verify --db sqlite:///pseudonymise.db")
    p = command(audit, "verify", "Verify the audit hash chain; name the first broken row.",
                "pseudonymise audit verify --escrow --db sqlite:///pseudonymise.db", cmd_audit_verify)
    _add_audit_args(p)
    _add_checkpoint_args(p, signing=False)
    p.add_argument("--escrow", action="store_true",
                   help="also list escrow rows that reversal would refuse (with a reverse token: every "
                        "row of its project opened and checked, audited)")
    _add_token_args(p)
    p = command(audit, "show", "Show recent audit rows (times in UTC; '-' where a count was not recorded).",
                "pseudonymise audit show --limit 50 --project research-a", cmd_audit_show)
    _add_audit_args(p)
    p.add_argument("--limit", type=int, default=20, help="how many of the latest rows (default 20)")
    p.add_argument("--project", help="only this project's rows")
    p.add_argument("--outcome", choices=("started", "success", "failed", "denied"), help="only rows with this outcome")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(audit, "checkpoint", "Sign a checkpoint of the audit chain's head; record it beside the audit and in "
                "the witnesses.", "pseudonymise audit checkpoint --signing-key audit-signing.jwk "
                "--witness audit-checkpoints.jsonl", cmd_audit_checkpoint)
    _add_audit_args(p)
    _add_checkpoint_args(p, signing=True)
    p = command(audit, "keygen", "Make an audit signing key (a private Ed25519 JWK, or an ed25519 Vault Transit key) "
                "and print its public JWKS.", "pseudonymise audit keygen --output audit-signing-2027.jwk "
                "> audit-public-2027.jwks", cmd_audit_keygen)
    p.add_argument("--output", metavar="FILE", help="write the private JWK here (mode 0600; never overwritten)")
    p.add_argument("--transit-key", metavar="MOUNT/NAME", help="create (or reuse) this ed25519 Transit key instead")
    return parser


def _database_error(exc: Exception) -> str | None:
    """The message for an error of SQLAlchemy (a URL it cannot read, a database it cannot use; its own text is
    not shown, it can quote values), or ``None`` for any other error."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is None:  # SQLAlchemy was never loaded: not its error
        return None
    if isinstance(exc, sa_exc.ArgumentError):
        return (f"error: the database URL is not valid ({redact(str(exc))}); write it like sqlite:///pseudonymise.db "
                "or postgresql://user@host/db")
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return (f"error: the database could not be used ({exc.__class__.__name__}); check --db and that the "
                "server is reachable")
    return None


#: whether main() runs as the process's command (not called by a program): what it loads lives until the exit
_COMMAND = [False]


def _freeze_loaded() -> None:
    """Run as the process's command, what exists now lives until the process exits: the cycle collector need not
    scan it again. After a command's own imports too: else the first full collection once a run's pause of the
    collector ends (pipeline.py) scans all of SQLAlchemy, pyarrow and numpy, on the audit's last row."""
    if _COMMAND[0]:
        gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    """The command. Each command loads what it needs (SQLAlchemy, numpy, cryptography) when it runs, so
    ``--help`` is quick and ``file pseudonymise`` starts reading its input while the engine loads."""
    command = _COMMAND[0] = argv is None
    _freeze_loaded()
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PseudonymiseError as exc:
        print(f"error: {cli_message(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was committed", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _database_error(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    finally:
        if command:
            gc.freeze()  # nor once more at exit (a tenth of a second with SQLAlchemy loaded)
        _COMMAND[0] = False


if __name__ == "__main__":
    sys.exit(main())
