"""The ``pseudonymise`` command, run as a real subprocess against a store, files and a SQLite database.

Every run is checked for leaks: no token string and no project key ever appears in its output.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pseudonymise.cli import build_parser
from pseudonymise.core.escrow import EscrowWriter
from pseudonymise.core.issuer import DirectoryStore, Issuer
from pseudonymise.core.pipeline import Store
from pseudonymise.core.policy import ColumnPolicy
from pseudonymise.core.pseudonymiser import Pseudonymiser
from pseudonymise.core.tokens import b64url_decode, b64url_encode, secret_parts, verify_token

from tests import reference

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "include" / "sample" / "patients.csv"
POLICY = REPO / "include" / "policies" / "patients.json"


@dataclass
class Cli:
    """A working folder with its issuer store, tokens and audit database; runs the CLI there."""

    home: Path
    secrets: set[str] = field(default_factory=set)
    tokens: dict[str, Path] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def db(self) -> str:
        return f"sqlite:///{self.home / 'pseudonymise.db'}"

    def run(self, *args: str | Path, stdin: str | None = None, env: dict[str, str] | None = None,
            expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PSEUDONYMISE_", "VAULT_"))}
        full_env.update({"PSEUDONYMISE_STORE": str(self.store), **(env or {})})
        proc = subprocess.run(
            [sys.executable, "-m", "pseudonymise.cli", *map(str, args)],
            input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True, text=True, env=full_env, cwd=self.home, timeout=120,
        )
        for secret in self.secrets:
            assert secret not in proc.stdout, f"a secret leaked to stdout of {args[:2]}"
            assert secret not in proc.stderr, f"a secret leaked to stderr of {args[:2]}"
        if expect is not None:
            assert proc.returncode == expect, proc.stderr
        return proc

    def issue(self, name: str, project: str, kind: str, *extra: str) -> Path:
        path = self.home / f"{name}.token"
        proc = self.run("token", "issue", "--project", project, "--kind", kind, "--output", path, *extra)
        raw = path.read_text().strip()
        self.secrets.update({raw, raw.split(".")[1], raw.split(".")[2], *secret_parts(raw)})
        assert str(path) in proc.stderr
        self.tokens[name] = path
        return path

    def token(self, name: str) -> str:
        return self.tokens[name].read_text().strip()

    def audit_rows(self, db: str | None = None) -> list[dict[str, Any]]:
        with sqlite3.connect((db or self.db).removeprefix("sqlite:///")) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM pseudonymise_audit ORDER BY seq")]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def mac_base32(key: bytes, message: bytes, length: int = 26) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower().rstrip("=")[:length]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("cli"))
    init = cli.run("issuer", "init", "--issuer-id", "cli-org")
    assert "cli-org" in init.stdout
    created = cli.run("project", "create", "research-a", "--method", "reversible", "--retention", "30d")
    assert json.loads(created.stdout)["method"] == "reversible"
    cli.run("project", "create", "research-b")
    cli.run("project", "create", "vendor-x", "--alphabet", "hex", "--length", "32", "--prefix", "V-")
    issuer = Issuer(DirectoryStore(cli.store))
    for project in issuer.projects():
        cli.secrets.add(b64url_encode(project.key))
        if project.escrow_private_key:
            cli.secrets.add(b64url_encode(project.escrow_private_key))
    cli.issue("research-a", "research-a", "pseudonymisation")
    # the tests below reverse with it many times: no use limit (a CLI reverse token is single-use by default)
    cli.issue("reverse-a", "research-a", "reverse", "--expires-in", "7d", "--max-uses", "0")
    cli.issue("research-b", "research-b", "pseudonymisation")
    cli.issue("vendor-x", "vendor-x", "secondary", "--source-project", "research-a")
    return cli


@pytest.fixture(scope="module")
def pseudonymised(cli: Cli) -> Path:
    """The sample pseudonymised for research-a with the shipped policy (CSV to CSV)."""
    out = cli.home / "patients.pseudonymised.csv"
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", cli.db,
                   "--token-file", cli.tokens["research-a"])
    assert "240 rows in, 240 out" in proc.stderr
    return out


def project_key(cli: Cli, project: str) -> bytes:
    return Issuer(DirectoryStore(cli.store)).project(project).key


# --- issuer, projects, tokens ---------------------------------------------------------------
def test_store_and_token_files_are_private(cli: Cli) -> None:
    assert stat.S_IMODE(cli.store.stat().st_mode) == 0o700
    for file in cli.store.rglob("*.json"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    for path in cli.tokens.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        raw = path.read_text()
        assert raw.endswith("\n") and raw.count(".") == 2


def test_issuer_init_refuses_overwrite(cli: Cli) -> None:
    proc = cli.run("issuer", "init", "--issuer-id", "again", expect=1)
    assert proc.stderr.startswith("error:") and "refusing to overwrite" in proc.stderr


def test_project_create_validation_and_listing(cli: Cli) -> None:
    proc = cli.run("project", "create", "Bad_Id", expect=1)
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli.run("project", "create", "short", "--alphabet", "hex", "--length", "8", expect=1)
    assert "64 bits" in proc.stderr
    listed = json.loads(cli.run("project", "list").stdout)
    assert [p["id"] for p in listed] == ["research-a", "research-b", "vendor-x"]
    assert all("key" not in p and "escrow_private_key" not in p for p in listed)
    shown = json.loads(cli.run("project", "show", "vendor-x").stdout)
    assert shown["format"] == {"alphabet": "hex", "length": 32, "prefix": "V-"}


def test_token_inspect_shows_claims_not_secrets(cli: Cli) -> None:
    keys = cli.home / "issuer-keys.json"
    cli.run("issuer", "public-key", "--output", keys)
    for args in (("--token-file", cli.tokens["research-a"]), ("--token-file", cli.tokens["research-a"],
                                                              "--issuer-keys", keys)):
        proc = cli.run("token", "inspect", "--json", *args)
        claims = json.loads(proc.stdout)
        assert claims["valid"] is True
        assert (claims["sub"], claims["kind"], claims["method"]) == ("research-a", "pseudonymisation", "reversible")
        assert "key" not in claims and "escrow_public_key" not in claims
        assert claims["fingerprint"] == hashlib.sha256(cli.token("research-a").encode()).hexdigest()[:16]
    reverse = json.loads(cli.run("token", "inspect", "--json", "--token-file", cli.tokens["reverse-a"]).stdout)
    assert reverse["kind"] == "reverse" and "escrow_private_key" not in reverse
    assert reverse["verify_key_versions"] == [1] and "verify_keys" not in reverse
    secondary = json.loads(cli.run("token", "inspect", "--json", "--token-file", cli.tokens["vendor-x"]).stdout)
    assert (secondary["source_project"], secondary["source_format"]) == \
        ("research-a", {"alphabet": "base32", "length": 26, "prefix": ""})
    assert "key" not in secondary


def test_token_inspect_of_a_tampered_token(cli: Cli) -> None:
    header, payload, sig = cli.token("research-b").split(".")
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = "research-a"
    forged = f"{header}.{b64url_encode(json.dumps(claims).encode())}.{sig}"
    cli.secrets.add(forged)
    proc = cli.run("token", "inspect", "--json", stdin=forged + "\n", expect=1)
    result = json.loads(proc.stdout)
    assert result == {"valid": False, "error": "TokenSignatureError", "reason": result["reason"]}


# --- file pseudonymise ----------------------------------------------------------------------
def test_file_pseudonymise_csv_with_the_policy(cli: Cli, pseudonymised: Path) -> None:
    source, out = read_csv(SAMPLE), read_csv(pseudonymised)
    assert list(out[0]) == ["patient_id", "birth_year", "visit_date", "diagnosis_code", "ward"]
    key = project_key(cli, "research-a")
    for before, after in zip(source, out, strict=True):
        canonical = before["patient_id"].strip().upper().encode()
        assert after["patient_id"] == mac_base32(key, b"pseudonymise/v1\x00\x00" + canonical)
        for column in ("birth_year", "visit_date", "diagnosis_code", "ward"):
            assert after[column] == before[column]
    assert source[0]["patient_id"] == " p100000 " and source[0]["diagnosis_code"] == ""
    names = {row["name"] for row in source}
    assert not any(name in pseudonymised.read_text() for name in names)


def test_file_pseudonymise_is_audited(cli: Cli, pseudonymised: Path) -> None:
    rows = [r for r in cli.audit_rows() if r["target"] == f"file:{pseudonymised}"]
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "success")]
    done = rows[1]
    assert (done["rows_in"], done["rows_out"], done["rows_null"], done["values_pseudonymised"]) == (240, 240, 0, 240)
    assert done["escrow_rows"] == 240
    assert done["project"] == "research-a" and json.loads(done["columns"]) == ["patient_id"]
    token = verify_token(cli.token("research-a"), Issuer(DirectoryStore(cli.store)).public_keys())
    assert done["token_jti"] == token.jti and done["token_fingerprint"] == token.fingerprint


def test_file_pseudonymise_csv_to_parquet(cli: Cli, pseudonymised: Path) -> None:
    out = cli.home / "patients.parquet"
    cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", cli.db,
            "--token-file", cli.tokens["research-a"])
    table = pq.read_table(out)
    assert table.column_names == ["patient_id", "birth_year", "visit_date", "diagnosis_code", "ward"]
    expected = read_csv(pseudonymised)
    assert table.column("patient_id").to_pylist() == [r["patient_id"] for r in expected]
    assert table.column("diagnosis_code").to_pylist()[0] is None  # an empty CSV field is NULL


def test_file_pseudonymise_with_column_flags(cli: Cli, pseudonymised: Path) -> None:
    out = cli.home / "flags.csv"
    cli.run("file", "pseudonymise", SAMPLE, out, "--columns", "patient_id", "--normalise", "patient_id=strip,upper",
            "--keep", "birth_year,visit_date,diagnosis_code,ward", "--drop", "name", "--db", cli.db,
            "--token-file", cli.tokens["research-a"])
    assert out.read_bytes() == pseudonymised.read_bytes()


def test_unlisted_column_is_an_error_before_anything_is_written(cli: Cli) -> None:
    out = cli.home / "unlisted.csv"
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--columns", "patient_id", "--db", cli.db,
                   "--token-file", cli.tokens["research-a"], expect=1)
    assert proc.stderr.startswith("error:") and "'name'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("how", ["token-file", "env", "token-env", "stdin", "token-file-dash"])
def test_token_sources(cli: Cli, pseudonymised: Path, how: str) -> None:
    out = cli.home / f"via-{how}.csv"
    raw = cli.token("research-a")
    base = ("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", cli.db)
    if how == "token-file":
        cli.run(*base, "--token-file", cli.tokens["research-a"])
    elif how == "env":
        cli.run(*base, env={"PSEUDONYMISE_TOKEN": raw})
    elif how == "token-env":
        cli.run(*base, "--token-env", "MY_PROJECT_TOKEN", env={"MY_PROJECT_TOKEN": raw})
    elif how == "stdin":
        cli.run(*base, stdin=raw + "\n")
    else:
        cli.run(*base, "--token-file", "-", stdin=raw)
    assert out.read_bytes() == pseudonymised.read_bytes()


def test_no_token_at_all(cli: Cli) -> None:
    proc = cli.run("file", "pseudonymise", SAMPLE, cli.home / "none.csv", "--policy", POLICY, "--db", cli.db, expect=1)
    assert proc.stderr.startswith("error:") and "empty" in proc.stderr
    proc = cli.run("file", "pseudonymise", SAMPLE, cli.home / "none.csv", "--policy", POLICY, "--db", cli.db,
                   "--token-env", "UNSET_VARIABLE", expect=1)
    assert "UNSET_VARIABLE" in proc.stderr


# --- secondary and reverse --------------------------------------------------------------------
def test_file_secondary(cli: Cli, pseudonymised: Path) -> None:
    out = cli.home / "vendor.csv"
    cli.run("file", "secondary", pseudonymised, out, "--columns", "patient_id", "--default", "keep", "--db", cli.db,
            "--token-file", cli.tokens["vendor-x"])
    first, second = read_csv(pseudonymised), read_csv(out)
    # v1.1: the secondary key is HKDF-SHA256 (RFC 5869, empty salt) of vendor-x's key, not that key
    prk = hmac.new(b"", project_key(cli, "vendor-x"), hashlib.sha256).digest()
    key = hmac.new(prk, b"pseudonymise/v1/secondary-key\x00research-a\x01", hashlib.sha256).digest()
    for before, after in zip(first, second, strict=True):
        digest = hmac.new(key, b"pseudonymise/v1/secondary\x00" + before["patient_id"].encode(), hashlib.sha256).digest()
        assert after["patient_id"] == "V-" + digest.hex()[:32]
        assert after["ward"] == before["ward"]
    assert not {r["patient_id"] for r in first} & {r["patient_id"] for r in second}


def test_file_secondary_refuses_raw_identifiers(cli: Cli) -> None:
    """Issue 11 item 5: the secondary token applied to the raw sample pseudonymised it; now the run fails
    before writing anything, naming the column and how many values are not research-a pseudonyms."""
    out = cli.home / "vendor-raw.csv"
    proc = cli.run("file", "secondary", SAMPLE, out, "--columns", "patient_id", "--default", "keep", "--db", cli.db,
                   "--token-file", cli.tokens["vendor-x"], expect=1)
    assert "'patient_id'" in proc.stderr and "240 of 240 values" in proc.stderr and "'research-a'" in proc.stderr
    for row in read_csv(SAMPLE)[:20]:
        assert row["patient_id"].strip() not in proc.stderr
    assert not out.exists()
    assert cli.audit_rows()[-1]["outcome"] == "failed"


def test_file_reverse_gives_back_the_normalised_originals(cli: Cli, pseudonymised: Path) -> None:
    out = cli.home / "revealed.csv"
    proc = cli.run("file", "reverse", pseudonymised, out, "--columns", "patient_id", "--db", cli.db,
                   "--token-file", cli.tokens["reverse-a"], "--project", "research-a", "--require-all")
    assert "warning" not in proc.stderr
    source, revealed, pseudo = read_csv(SAMPLE), read_csv(out), read_csv(pseudonymised)
    assert [r["patient_id"] for r in revealed] == [r["patient_id"].strip().upper() for r in source]
    assert revealed[0]["patient_id"] == "P100000"
    for after, before in zip(revealed, pseudo, strict=True):
        assert {k: v for k, v in after.items() if k != "patient_id"} == {k: v for k, v in before.items()
                                                                         if k != "patient_id"}
    rows = [r for r in cli.audit_rows() if r["operation"] == "reverse"]
    assert [r["outcome"] for r in rows] == ["started", "success"]
    assert rows[0]["triggered_by"]  # the user who asked for the reversal


def test_file_reverse_that_matches_nothing_fails_unless_allowed(cli: Cli) -> None:
    """Issue 16: a reversal whose pseudonyms have no escrow wrote a blank column and exited 0; now it fails,
    writing nothing, with counts (never a value), and --allow-missing writes the blanks with a warning."""
    source = cli.home / "unknown.csv"
    source.write_text("patient_id\nnotaknownpseudonym0000000a\n\nnotaknownpseudonym0000000b\n", encoding="utf-8")
    out = cli.home / "unknown.out.csv"
    proc = cli.run("file", "reverse", source, out, "--columns", "patient_id", "--db", cli.db,
                   "--token-file", cli.tokens["reverse-a"], expect=1)
    assert "none of the 2 distinct pseudonym(s) in the first 2 rows read have no escrow" in proc.stderr
    assert "--allow-missing" in proc.stderr and "notaknown" not in proc.stderr and not out.exists()
    assert cli.audit_rows()[-1]["error_class"] == "EscrowNotFoundError"
    proc = cli.run("file", "reverse", source, out, "--columns", "patient_id", "--db", cli.db,
                   "--token-file", cli.tokens["reverse-a"], "--allow-missing")
    assert "2 pseudonym(s) had no escrow and were written as empty (--allow-missing)" in proc.stderr
    assert read_csv(out) == [{"patient_id": ""}, {"patient_id": ""}]
    proc = cli.run("file", "reverse", source, cli.home / "strict.csv", "--columns", "patient_id", "--db", cli.db,
                   "--token-file", cli.tokens["reverse-a"], "--require-all", expect=1)
    assert "no escrow" in proc.stderr and not (cli.home / "strict.csv").exists()
    both = cli.run("file", "reverse", source, out, "--columns", "patient_id", "--allow-missing", "--require-all",
                   expect=2)
    assert "not allowed with argument" in both.stderr


def test_file_reverse_that_matches_part_of_the_input_fails_unless_allowed(cli: Cli, pseudonymised: Path) -> None:
    """Two pseudonyms of the 240 replaced by unknown ones: the count names 2 of 240, nothing is written; with
    --allow-missing the 238 others are revealed."""
    rows = read_csv(pseudonymised)
    rows[5]["patient_id"], rows[7]["patient_id"] = "unknownunknownunknown00005", "unknownunknownunknown00007"
    mixed = cli.home / "mixed.csv"
    with mixed.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = cli.home / "mixed.out.csv"
    proc = cli.run("file", "reverse", mixed, out, "--columns", "patient_id", "--db", cli.db,
                   "--token-file", cli.tokens["reverse-a"], expect=1)
    distinct = len({r["patient_id"] for r in rows})
    assert f"2 of the {distinct} distinct pseudonym(s) in the first 240 rows read have no escrow" in proc.stderr
    assert "unknownunknown" not in proc.stderr and not out.exists()
    cli.run("file", "reverse", mixed, out, "--columns", "patient_id", "--db", cli.db,
            "--token-file", cli.tokens["reverse-a"], "--allow-missing")
    revealed, source = read_csv(out), read_csv(SAMPLE)
    assert [r["patient_id"] for r in revealed] == [
        "" if i in (5, 7) else s["patient_id"].strip().upper() for i, s in enumerate(source)]


def test_file_pseudonymise_and_reverse_parquet_with_integers(cli: Cli) -> None:
    import pyarrow as pa

    source = cli.home / "ints.parquet"
    pq.write_table(pa.table({"id": pa.array([10, -7, None, 10**12], pa.int64()), "n": [1, 2, 3, 4]}), source)
    out, back = cli.home / "ints.p.parquet", cli.home / "ints.back.parquet"
    cli.run("file", "pseudonymise", source, out, "--columns", "id", "--keep", "n", "--db", cli.db,
            "--token-file", cli.tokens["research-a"])
    pseudonyms = pq.read_table(out)
    assert pseudonyms.schema.field("id").type == pa.string() and pseudonyms.schema.field("n").type == pa.int64()
    assert pseudonyms.column("id").to_pylist()[2] is None
    cli.run("file", "reverse", out, back, "--columns", "id", "--db", cli.db, "--token-file", cli.tokens["reverse-a"])
    assert pq.read_table(back).column("id").to_pylist() == [10, -7, None, 10**12]


def test_file_runs_with_and_without_the_c_engine_write_the_same_files(cli: Cli, tmp_path: Path) -> None:
    """The Arrow path (C engine on the record batches) and the pure-Python engine write the same bytes, CSV and
    Parquet (text, large text, integers and dates pseudonymised), equal to docs/design.md §4 in the standard library;
    the escrow of both reveals the typed originals."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.csv as pa_csv

    from tests import reference

    rows = 3000
    data = {"pid": [None if i % 17 == 0 else ["e\u0301", " p1 ", "Zoë", "q\"x,y", "\u212b"][i % 5] + str(i % 700)
                    for i in range(rows)],
            "big": pa.array([f"M{i % 900}" for i in range(rows)], pa.large_string()),
            "n": pa.array([None if i % 23 == 0 else (i % 400) - 200 for i in range(rows)], pa.int32()),
            "day": pa.array([dt.date(1990, 1, 1) + dt.timedelta(days=i % 500) for i in range(rows)], pa.date32()),
            "ward": [f"w{i % 3}" for i in range(rows)]}
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table(data), parquet, row_group_size=1000)
    csv_in = tmp_path / "in.csv"
    pa_csv.write_csv(pa.table({k: pa.array(data[k]).cast(pa.string()) for k in ("pid", "ward")}), csv_in)
    outputs: dict[str, dict[str, bytes]] = {}
    for mode, env in (("c", {}), ("pure", {"PSEUDONYMISE_PURE_PYTHON": "1"})):
        outputs[mode] = {}
        for source, columns, keep in ((parquet, "pid,big,n,day", "ward"), (csv_in, "pid", "ward")):
            out = tmp_path / f"{mode}.{source.name}"
            proc = cli.run("file", "pseudonymise", source, out, "--columns", columns, "--keep", keep, "--db", cli.db,
                           "--token-file", cli.tokens["research-a"], "--batch-size", "700", env=env)
            assert f"{rows:,} rows in" in proc.stderr
            outputs[mode][source.name] = out.read_bytes()
    assert outputs["c"] == outputs["pure"]
    token = cli.token("research-a")
    table = pq.read_table(tmp_path / "c.in.parquet")
    assert table.schema.field("ward").type == pa.string() and table.schema.field("n").type == pa.string()
    for column in ("pid", "big", "n", "day"):
        assert table.column(column).to_pylist() == reference.token_pseudonyms(token, pa.array(data[column]).to_pylist())
    assert read_csv(tmp_path / "c.in.csv") == [{"pid": p or "", "ward": w} for p, w in zip(
        reference.token_pseudonyms(token, data["pid"]), data["ward"], strict=True)]
    back = tmp_path / "back.parquet"
    cli.run("file", "reverse", tmp_path / "c.in.parquet", back, "--columns", "pid,n,day", "--db", cli.db,
            "--token-file", cli.tokens["reverse-a"], "--require-all")
    revealed = pq.read_table(back)
    assert revealed.column("n").to_pylist() == pa.array(data["n"]).to_pylist()
    assert revealed.column("day").to_pylist() == pa.array(data["day"]).to_pylist()
    assert revealed.column("pid").to_pylist() == [None if v is None else unicodedata.normalize("NFC", v)
                                                  for v in data["pid"]]


def test_a_command_freezes_what_it_loaded_before_its_run_and_a_program_nothing(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as the process's command (``main()`` with no arguments), the CLI hands what it loaded to the cycle
    collector's ``gc.freeze`` before the command, after ``file pseudonymise``'s own imports but before its run (no
    audit database yet) and at the end; called by a program (``main(argv)``) it freezes nothing."""
    import gc

    from pseudonymise import cli as cli_module

    db = tmp_path / "audit.db"
    frozen: list[bool] = []  # whether the run's audit database existed at each freeze
    real_freeze = gc.freeze

    def freeze() -> None:  # the real freeze, recorded (unfrozen again below: this test process goes on)
        frozen.append(db.exists())
        real_freeze()

    monkeypatch.setattr(gc, "freeze", freeze)
    monkeypatch.setenv("PSEUDONYMISE_STORE", str(cli.store))
    args = ["file", "pseudonymise", str(SAMPLE), str(tmp_path / "out.csv"), "--policy", str(POLICY),
            "--db", f"sqlite:///{db}", "--token-file", str(cli.tokens["research-a"])]
    monkeypatch.setattr(sys, "argv", ["pseudonymise", *args])
    try:
        assert cli_module.main() == 0
    finally:
        gc.unfreeze()
    assert frozen == [False, False, True]
    frozen.clear()
    assert cli_module.main([*args[:3], str(tmp_path / "again.csv"), *args[4:]]) == 0
    assert frozen == []


# --- escrow purge ------------------------------------------------------------------------------
# --- risk gate, risk report, dry run (issue 15) -----------------------------------------------------
def _sample_frame(rows: int | None = None) -> Any:
    """The sample as the plugin reads a CSV: every column text, an empty field NULL (pandas, independently)."""
    import pandas as pd

    frame = pd.read_csv(SAMPLE, dtype=str, keep_default_na=False).replace("", None)
    return frame if rows is None else frame.head(rows)


def _risk_expected(frame: Any, qis: list[str], k: int) -> dict[str, int]:
    sizes = frame.groupby(qis, dropna=False).size()
    return {"rows": len(frame), "classes": len(sizes), "smallest_class": int(sizes.min()),
            "classes_below_k": int((sizes < k).sum()), "rows_below_k": int(sizes[sizes < k].sum())}


def _audit_outcomes(db: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        return [tuple(r) for r in conn.execute("SELECT operation, outcome FROM pseudonymise_audit ORDER BY seq")]


def test_file_dry_run_writes_nothing_and_prints_what_a_run_would_do(cli: Cli, tmp_path: Path) -> None:
    db, out = f"sqlite:///{tmp_path / 'dry.db'}", tmp_path / "out.csv"
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", db, "--token-file",
                   cli.tokens["research-a"], "--dry-run", "--sample", "60", "--quasi-identifiers", "birth_year,ward",
                   "--risk-k", "2")
    report = json.loads(proc.stdout)
    assert report["operation"] == "dry_run" and report["rows_in"] == 60 and report["rows_out"] == 0
    dry = report["dry_run"]
    assert dry["sample_rows"] == 60 and dry["actions"]["name"] == "drop" and dry["target"] == f"file:{out}"
    expected = _risk_expected(_sample_frame(60), ["birth_year", "ward"], 2)
    assert {key: dry["risk"][key] for key in expected} == expected
    assert "dry run: nothing was written; 60 rows sampled" in proc.stderr and "patient_id: pseudonymise" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry.db"]
    with sqlite3.connect(tmp_path / "dry.db") as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    assert counts.pop("pseudonymise_audit") == 2 and counts.pop("pseudonymise_audit_head") == 1
    assert counts.pop("pseudonymise_admitted") == 1  # the token's use, as max_uses counts it
    assert set(counts.values()) == {0}  # escrow, checkpoints, revocations: nothing
    assert _audit_outcomes(db) == [("dry_run", "started"), ("dry_run", "success")]
    assert "audit chain verified: 2 rows" in cli.run("audit", "verify", "--db", db).stdout
    for row in _sample_frame(60).itertuples():
        assert row.patient_id.strip() not in proc.stdout + proc.stderr


def test_file_secondary_dry_run_checks_the_secondary_token(cli: Cli, pseudonymised: Path, tmp_path: Path) -> None:
    db, out = f"sqlite:///{tmp_path / 'secondary.db'}", tmp_path / "vendor.csv"
    proc = cli.run("file", "secondary", pseudonymised, out, "--columns", "patient_id", "--default", "keep", "--db", db,
                   "--token-file", cli.tokens["vendor-x"], "--dry-run", "--sample", "10")
    report = json.loads(proc.stdout)
    assert report["operation"] == "dry_run" and report["dry_run"]["sample_rows"] == 10 and not out.exists()
    with sqlite3.connect(tmp_path / "secondary.db") as conn:
        assert conn.execute("SELECT DISTINCT token_kind FROM pseudonymise_audit").fetchall() == [("secondary",)]
    refused = cli.run("file", "secondary", SAMPLE, out, "--columns", "patient_id", "--default", "keep", "--db", db,
                      "--token-file", cli.tokens["vendor-x"], "--dry-run", "--sample", "10", expect=1)
    assert "patient_id" in refused.stderr and not out.exists()  # raw identifiers refused, as a real run would


def test_file_risk_gate_fails_the_run_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    db, out = f"sqlite:///{tmp_path / 'gate.db'}", tmp_path / "out.csv"
    qis = ["birth_year", "ward", "diagnosis_code"]
    risk = tmp_path / "risk.json"
    risk.write_text(json.dumps({"quasi_identifiers": qis, "k": 5}))
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", db, "--token-file",
                   cli.tokens["research-a"], "--risk", risk, expect=1)
    expected = _risk_expected(_sample_frame(), qis, 5)
    assert "re-identification risk gate failed" in proc.stderr
    assert f"{expected['classes_below_k']} of {expected['classes']} classes" in proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _audit_outcomes(db) == [("pseudonymise", "started"), ("pseudonymise", "failed")]
    with sqlite3.connect(tmp_path / "gate.db") as conn:
        assert conn.execute("SELECT count(*) FROM pseudonymise_escrow").fetchone()[0] == 0
        details = json.loads(conn.execute("SELECT details FROM pseudonymise_audit WHERE seq = 2").fetchone()[0])
    assert {key: details["risk"][key] for key in expected} == expected and details["risk"]["passed"] is False
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", db, "--token-file",
                   cli.tokens["research-a"], "--quasi-identifiers", "ward", "--risk-k", "2")
    assert "risk gate passed" in proc.stderr and out.exists()


@pytest.mark.parametrize(("flags", "error"), [
    (["--risk-k", "1", "--quasi-identifiers", "ward"], "k must be an integer of at least 2"),
    (["--risk-k", "3"], "need --quasi-identifiers"),
    (["--quasi-identifiers", "name"], "'name' is dropped by the column policy"),
    (["--quasi-identifiers", "postcode"], "'postcode' is not in the source"),
    (["--sample", "5"], "--sample applies to a dry run only"),
])
def test_bad_risk_and_dry_run_flags_are_refused(cli: Cli, tmp_path: Path, flags: list[str], error: str) -> None:
    proc = cli.run("file", "pseudonymise", SAMPLE, tmp_path / "out.csv", "--policy", POLICY, "--db",
                   f"sqlite:///{tmp_path / 'bad.db'}", "--token-file", cli.tokens["research-a"], *flags, expect=1)
    assert error in proc.stderr and not (tmp_path / "out.csv").exists()


def test_risk_report_of_a_file_and_of_a_table(cli: Cli, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'report.db'}"
    qis = ["birth_year", "ward"]
    frame = _sample_frame()
    proc = cli.run("risk", "report", SAMPLE, "--quasi-identifiers", ",".join(qis), "--risk-k", "3", "--db", db,
                   "--json")
    report = json.loads(proc.stdout)
    expected = _risk_expected(frame, qis, 3)
    assert {key: report[key] for key in expected} == expected
    combos = {tuple(c["quasi_identifiers"]): c for c in report["combinations"]}
    assert set(combos) == {("birth_year",), ("ward",), ("birth_year", "ward")}
    assert combos[("ward",)]["rows_below_k"] == _risk_expected(frame, ["ward"], 3)["rows_below_k"]
    assert sum(b["rows"] for b in report["distribution"]) == len(frame)
    frame.to_sql("extract", f"sqlite:///{tmp_path / 'data.db'}", index=False)
    text = cli.run("risk", "report", "--source-db", f"sqlite:///{tmp_path / 'data.db'}", "--table", "extract",
                   "--quasi-identifiers", ",".join(qis), "--risk-k", "3", "--db", db).stdout
    assert f"{expected['rows']} rows, {expected['classes']} classes" in text and "class size" in text
    assert _audit_outcomes(db) == [("risk_report", "started"), ("risk_report", "success")] * 2
    for value in frame["ward"].dropna().unique():
        assert value not in proc.stdout and value not in text


def test_escrow_purge(cli: Cli) -> None:
    db = f"sqlite:///{cli.home / 'purge.db'}"
    store = Store(db)
    store.create()
    keys = Issuer(DirectoryStore(cli.store)).public_keys()
    token = verify_token(cli.token("research-a"), keys)
    past = replace(token, retention_until=datetime.now(UTC) - timedelta(seconds=1))
    with store.engine.begin() as conn:
        for tok, values in ((past, ["old-1", "old-2", "old-3"]), (token, ["kept-1"])):
            batch = Pseudonymiser(tok, ColumnPolicy.pseudonymise("id")).pseudonymise_batch({"id": values})
            EscrowWriter(tok, store.escrow).write(conn, batch.escrow)
    proc = cli.run("escrow", "purge", "--db", db)
    assert proc.stdout.startswith("purged 3 escrow row(s)")
    with sqlite3.connect(cli.home / "purge.db") as conn:
        assert conn.execute("SELECT count(*) FROM pseudonymise_escrow").fetchone() == (1,)
    assert "purged 0 escrow row(s)" in cli.run("escrow", "purge", "--db", db, "--project", "research-a").stdout
    purges = [r for r in cli.audit_rows(db) if r["operation"] == "purge"]
    assert [(r["outcome"], r["escrow_rows"]) for r in purges] == [("started", None), ("success", 3),
                                                                  ("started", None), ("success", 0)]


# --- audit ----------------------------------------------------------------------------------
def test_audit_verify_and_tampering(cli: Cli, pseudonymised: Path) -> None:
    copy = cli.home / "tampered.db"
    shutil.copy(cli.home / "pseudonymise.db", copy)
    db = f"sqlite:///{copy}"
    proc = cli.run("audit", "verify", "--db", db)
    assert proc.stdout.startswith("audit chain verified:")
    with sqlite3.connect(copy) as conn:
        conn.execute("UPDATE pseudonymise_audit SET rows_out = 1 WHERE seq = 2")
    proc = cli.run("audit", "verify", "--db", db, expect=1)
    assert "BROKEN at row 2" in proc.stdout


def test_audit_show(cli: Cli, pseudonymised: Path) -> None:
    text = cli.run("audit", "show", "--db", cli.db, "--limit", "500").stdout
    assert "pseudonymise success  project=research-a" in text
    rows = json.loads(cli.run("audit", "show", "--db", cli.db, "--project", "research-a", "--outcome", "success",
                              "--json").stdout)
    assert rows and all(r["project"] == "research-a" and r["outcome"] == "success" for r in rows)


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "error"),
    [("other-project", "TokenProjectError"), ("wrong-kind", "TokenKindError"), ("tampered", "TokenSignatureError"),
     ("garbage", "MalformedTokenError")],
)
def test_wrong_token_is_denied_and_audited(cli: Cli, tmp_path: Path, case: str, error: str) -> None:
    db = f"sqlite:///{tmp_path / 'denied.db'}"
    out = tmp_path / "out.csv"
    if case == "other-project":
        raw, extra = cli.token("research-b"), ["--project", "research-a"]
    elif case == "wrong-kind":
        raw, extra = cli.token("reverse-a"), []
    elif case == "tampered":
        header, payload, sig = cli.token("research-b").split(".")
        claims = json.loads(b64url_decode(payload))
        claims["exp"] += 3600
        raw, extra = f"{header}.{b64url_encode(json.dumps(claims).encode())}.{sig}", []
        cli.secrets.add(raw)
    else:
        raw, extra = "this is not a token", []
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", db, *extra, stdin=raw, expect=1)
    assert proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1  # one clear line
    assert not out.exists()
    rows = cli.audit_rows(db)
    assert [(r["event"], r["outcome"]) for r in rows] == [("started", "started"), ("finished", "denied")]
    assert rows[1]["error_class"] == error
    for row in rows:
        for value in row.values():
            assert raw not in str(value)
    assert cli.run("audit", "verify", "--db", db).returncode == 0


def test_unreachable_audit_database_refuses_the_token(cli: Cli, tmp_path: Path) -> None:
    from scripts.services import free_port

    out = tmp_path / "out.csv"
    proc = cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY,
                   "--db", f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                   "--token-file", cli.tokens["research-a"], expect=1)
    assert proc.stderr.startswith("error:") and "audit" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# --- help -----------------------------------------------------------------------------------
def _subcommands() -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
                return
        found.append(path)

    walk(build_parser(), ())
    return found


def test_every_subcommand_is_listed() -> None:
    assert len(_subcommands()) == 19
    assert ("risk", "report") in _subcommands()
    assert ("subject", "erase") in _subcommands()
    assert ("token", "revoke") in _subcommands() and ("token", "revocations") in _subcommands()
    assert ("file", "reverse") in _subcommands() and ("audit", "verify") in _subcommands()
    assert ("audit", "checkpoint") in _subcommands() and ("audit", "keygen") in _subcommands()


@pytest.mark.parametrize("command", [(), *_subcommands()], ids=lambda c: " ".join(c) or "top")
def test_help_has_an_example(cli: Cli, command: tuple[str, ...]) -> None:
    proc = cli.run(*command, "--help")
    assert "example" in proc.stdout
    assert "pseudonymise" in proc.stdout.split("example", 1)[1]


# --- audit verify --escrow ------------------------------------------------------------------------
def test_audit_verify_escrow_names_rows_reversal_would_refuse(cli: Cli, tmp_path: Path) -> None:
    """An escrow row written outside any audited use (here by whoever can write the SQLite file) is named
    by pseudonym, without a value; with a reverse token every row is also opened and recomputed."""
    db_path = tmp_path / "escrow.db"
    db = f"sqlite:///{db_path}"
    cli.run("file", "pseudonymise", SAMPLE, tmp_path / "out.csv", "--policy", POLICY, "--db", db,
            "--token-file", cli.tokens["research-a"])
    clean = cli.run("audit", "verify", "--escrow", "--db", db)
    assert "0 row(s) reversal would refuse" in clean.stdout
    checked = cli.run("audit", "verify", "--escrow", "--db", db, "--token-file", cli.tokens["reverse-a"])
    assert "opened and checked with the reverse token" in checked.stdout and "0 row(s)" in checked.stdout
    with sqlite3.connect(db_path) as conn:
        batch, ciphertext, retention = conn.execute(
            "SELECT batch_id, ciphertext, retention_until FROM pseudonymise_escrow LIMIT 1").fetchone()
        conn.execute("INSERT INTO pseudonymise_escrow VALUES ('research-a', 'forgedforgedforgedforged00', ?, ?, ?, ?)",
                     (batch, (4242).to_bytes(12, "big"), ciphertext, retention))
    forged = cli.run("audit", "verify", "--escrow", "--db", db, expect=1)
    assert "UNPROVEN escrow row" in forged.stdout and "differ from the digest" in forged.stdout
    with_token = cli.run("audit", "verify", "--escrow", "--db", db, "--token-file", cli.tokens["reverse-a"], expect=1)
    assert "forgedforgedforgedforged00" in with_token.stdout
    for line in SAMPLE.read_text().splitlines()[1:]:
        assert line.split(",")[1] not in forged.stdout + with_token.stdout  # no original value
    rows = sqlite3.connect(db_path).execute(
        "SELECT operation, outcome FROM pseudonymise_audit WHERE event = 'finished' ORDER BY seq").fetchall()
    assert rows[-2:] == [("verify", "success"), ("verify", "success")]  # each token use is audited


# --- single-use and revoked tokens (docs/design.md §3, v1.1) ------------------------------------------------
def test_a_reverse_token_is_single_use_by_default(cli: Cli, pseudonymised: Path) -> None:
    """`token issue --kind reverse` gives max_uses 1: the first reversal works, the second is refused and
    audited 'denied', and nothing is written; `--max-uses 3` and `--max-uses 0` (no limit) as asked."""
    path = cli.issue("reverse-once", "research-a", "reverse")
    claims = reference.claims(cli.token("reverse-once"))
    assert claims["max_uses"] == 1
    assert json.loads(cli.run("token", "inspect", "--json", "--token-file", path).stdout)["max_uses"] == 1
    first = cli.home / "once-1.csv"
    cli.run("file", "reverse", pseudonymised, first, "--columns", "patient_id", "--db", cli.db, "--token-file", path)
    second = cli.home / "once-2.csv"
    refused = cli.run("file", "reverse", pseudonymised, second, "--columns", "patient_id", "--db", cli.db,
                      "--token-file", path, expect=1)
    assert f"token {claims['jti']} allows 1 use (max_uses) and has had them" in refused.stderr
    assert first.exists() and not second.exists()
    uses = [r for r in cli.audit_rows() if r["token_jti"] == claims["jti"] and r["event"] == "finished"]
    assert [(r["outcome"], r["error_class"]) for r in uses] == [("success", None), ("denied", "TokenUsedUpError")]
    assert {r["token_max_uses"] for r in uses} == {1}
    three = cli.issue("reverse-3", "research-a", "reverse", "--max-uses", "3")
    assert reference.claims(three.read_text().strip())["max_uses"] == 3
    assert "max_uses" not in reference.claims(cli.token("reverse-a"))  # --max-uses 0: no limit
    assert "max_uses" not in reference.claims(cli.token("research-a"))  # other kinds: no limit by default
    bad = cli.run("token", "issue", "--project", "research-a", "--kind", "reverse", "--max-uses", "-1",
                  "--output", cli.home / "never.token", expect=2)
    assert "--max-uses: must be 0 (no limit) or more" in bad.stderr and not (cli.home / "never.token").exists()


def test_token_revoke_refuses_every_later_use(cli: Cli, pseudonymised: Path) -> None:
    """`token revoke JTI --reason`: audited (operation revoke, who and why in the revocation table), every
    later use refused and audited 'denied'; revoking twice or without a reason is an error that changes
    nothing; `token revocations` lists it."""
    path = cli.issue("research-a-2", "research-a", "pseudonymisation")
    jti = reference.claims(cli.token("research-a-2"))["jti"]
    out = cli.home / "before-revoke.csv"
    cli.run("file", "pseudonymise", SAMPLE, out, "--policy", POLICY, "--db", cli.db, "--token-file", path)
    no_reason = cli.run("token", "revoke", jti, "--reason", " ", "--db", cli.db, expect=1)
    assert "needs a reason" in no_reason.stderr
    done = cli.run("token", "revoke", jti, "--reason", "laptop lost", "--db", cli.db)
    assert f"token {jti} revoked" in done.stdout
    again = cli.run("token", "revoke", jti, "--reason", "twice", "--db", cli.db, expect=1)
    assert "already revoked" in again.stderr
    refused = cli.run("file", "pseudonymise", SAMPLE, cli.home / "after-revoke.csv", "--policy", POLICY,
                      "--db", cli.db, "--token-file", path, expect=1)
    assert f"token {jti} has been revoked" in refused.stderr and not (cli.home / "after-revoke.csv").exists()
    rows = [r for r in cli.audit_rows() if r["token_jti"] == jti and r["event"] == "finished"]
    assert [(r["operation"], r["outcome"], r["error_class"]) for r in rows] == [
        ("pseudonymise", "success", None), ("revoke", "success", None), ("revoke", "failed", "AuditError"),
        ("pseudonymise", "denied", "TokenRevokedError")]
    listed = json.loads(cli.run("token", "revocations", "--db", cli.db, "--json").stdout)
    assert [(r["jti"], r["reason"]) for r in listed] == [(jti, "laptop lost")]
    assert listed[0]["revoked_by"] and listed[0]["use_id"] == rows[1]["use_id"]
    assert cli.run("audit", "verify", "--db", cli.db).returncode == 0


# --- subject erasure ------------------------------------------------------------------------------
def test_subject_erase_by_identifier_then_reversal_is_severed(cli: Cli, tmp_path: Path) -> None:
    """`subject erase --identifiers` with the pseudonymisation token: the subject's escrow row and the
    rows of a table carrying the pseudonym go; the other patients stay revealable; the identifier is
    never printed; a randomised-style misuse (both or neither input) is a clear error."""
    db = f"sqlite:///{tmp_path / 'erase.db'}"
    pseudonymised = tmp_path / "p.csv"
    cli.run("file", "pseudonymise", SAMPLE, pseudonymised, "--policy", POLICY, "--db", db,
            "--token-file", cli.tokens["research-a"])
    rows = read_csv(pseudonymised)
    originals = read_csv(SAMPLE)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        conn.execute("CREATE TABLE shared (patient_id text, ward text)")
        conn.executemany("INSERT INTO shared VALUES (?, ?)", [(r["patient_id"], r["ward"]) for r in rows])
    subject = originals[1]["patient_id"]  # P770839
    erased_pseudonym = rows[1]["patient_id"]
    carrying = sum(r["patient_id"] == erased_pseudonym for r in rows)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"  {subject.lower()}\n\n", encoding="utf-8")  # normalised as the load did: strip, upper
    done = cli.run("subject", "erase", "--identifiers", ids, "--column", "patient_id", "--normalise", "strip,upper",
                   "--token-file", cli.tokens["research-a"], "--target", "shared.patient_id", "--db", db)
    assert "erased 1 escrow row(s) of 1 pseudonym(s) in project 'research-a'" in done.stdout
    assert f"deleted {carrying} row(s) of shared" in done.stdout
    assert subject not in done.stdout + done.stderr and erased_pseudonym not in done.stdout + done.stderr
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT count(*) FROM shared WHERE patient_id = ?", (erased_pseudonym,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM shared").fetchone() == (len(rows) - carrying,)
    back = tmp_path / "back.csv"
    severed = cli.run("file", "reverse", pseudonymised, back, "--columns", "patient_id", "--db", db,
                      "--token-file", cli.tokens["reverse-a"], expect=1)
    distinct = len({r["patient_id"] for r in rows})
    assert f"1 of the {distinct} distinct pseudonym(s) in the first 240 rows read have no escrow" in severed.stderr
    cli.run("file", "reverse", pseudonymised, back, "--columns", "patient_id", "--db", db,
            "--token-file", cli.tokens["reverse-a"], "--allow-missing")
    revealed = read_csv(back)
    assert revealed[1]["patient_id"] == ""  # severed for ever
    assert revealed[2]["patient_id"] == originals[2]["patient_id"].strip().upper()  # the others still revealable
    assert cli.run("audit", "verify", "--db", db).returncode == 0
    both = cli.run("subject", "erase", "--identifiers", ids, "--pseudonyms", ids, "--db", db, expect=1)
    assert "give either --identifiers FILE" in both.stderr
    no_project = cli.run("subject", "erase", "--pseudonyms", ids, "--db", db, expect=1)
    assert "--pseudonyms needs --project" in no_project.stderr
    bad_target = cli.run("subject", "erase", "--pseudonyms", ids, "--project", "research-a", "--target", "shared",
                         "--db", db, expect=1)
    assert "must be TABLE.COLUMN" in bad_target.stderr


# --- answers that cannot mislead (issue 16) ---------------------------------------------------------
AUDIT_DB_COMMANDS = [
    ("audit", "verify"), ("audit", "show"), ("token", "revocations"), ("token", "revoke", "some-jti", "--reason", "r"),
    ("escrow", "purge"), ("audit", "checkpoint", "--signing-key", "unused.jwk"),
    ("subject", "erase", "--pseudonyms", "unused.txt", "--project", "research-a"),
]


@pytest.mark.parametrize("command", AUDIT_DB_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_missing_audit_database_is_an_error_and_nothing_is_created(cli: Cli, tmp_path: Path,
                                                                    command: tuple[str, ...]) -> None:
    """`audit verify` on a path with no database created an empty one and answered "verified: 0 rows"; every
    command that reads or acts on an existing audit now refuses, naming the path, and creates nothing."""
    missing = tmp_path / "typo.db"
    proc = cli.run(*command, "--db", f"sqlite:///{missing}", expect=1)
    assert proc.stderr.startswith(f"error: no audit database at '{missing}'") and "--db" in proc.stderr
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    if command[:2] != ("audit", "verify"):  # the rest once: every command goes through the same check
        return
    default = cli.run(*command, env={"PSEUDONYMISE_DB": f"sqlite:///{missing}"}, expect=1)
    assert "no audit database" in default.stderr and not missing.exists()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE unrelated (x integer)")
    proc = cli.run(*command, "--db", f"sqlite:///{other}", expect=1)
    assert "has no audit table 'pseudonymise_audit'" in proc.stderr and "--schema" in proc.stderr
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["unrelated"]


@pytest.mark.postgres
def test_audit_verify_with_schema(cli: Cli, pg_url: str) -> None:
    """`audit verify --schema`: the audit in a schema of its own is found there, and only there."""
    from pseudonymise.core.audit import AuditLog

    from tests.tampering import make_uses

    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA research_audit"))
    audit = AuditLog(engine, schema="research_audit")
    make_uses(audit, Issuer(DirectoryStore(cli.store)), ["pseudonymise", "pseudonymise"], None)
    engine.dispose()
    proc = cli.run("audit", "verify", "--db", pg_url, "--schema", "research_audit")
    assert proc.stdout.startswith("audit chain verified: 4 rows")
    shown = cli.run("audit", "show", "--db", pg_url, "--schema", "research_audit").stdout
    assert shown.count("pseudonymise") == 4 and "None" not in shown
    proc = cli.run("audit", "verify", "--db", pg_url, expect=1)
    assert "has no audit table 'pseudonymise_audit'" in proc.stderr
    proc = cli.run("audit", "verify", "--db", pg_url, "--schema", "elsewhere", expect=1)
    assert "has no audit table 'elsewhere.pseudonymise_audit'" in proc.stderr


def _sample_rows(delimiter: str) -> str:
    return "".join(delimiter.join(row) + "\n" for row in csv.reader(SAMPLE.open(encoding="utf-8", newline="")))


@pytest.mark.parametrize(("delimiter", "argument", "named"), [(";", ";", "';'"), ("\t", "tab", "tab"),
                                                               ("|", "|", "'|'")])
def test_delimiter(cli: Cli, tmp_path: Path, delimiter: str, argument: str, named: str) -> None:
    """A file separated by another delimiter fails naming the delimiter it saw and the option; with
    --delimiter it is read, and written back with the same delimiter (or --output-delimiter)."""
    source = tmp_path / "visits.csv"
    source.write_text(_sample_rows(delimiter), encoding="utf-8")
    out = tmp_path / "out.csv"
    base = ("file", "pseudonymise", source, out, "--policy", POLICY, "--db", cli.db,
            "--token-file", cli.tokens["research-a"])
    proc = cli.run(*base, expect=1)
    assert f"looks {named}-separated" in proc.stderr and f"(--delimiter {named})" in proc.stderr
    assert not out.exists()
    cli.run(*base, "--delimiter", argument)
    written = list(csv.reader(out.open(encoding="utf-8", newline=""), delimiter=delimiter))
    source_rows = read_csv(SAMPLE)
    assert written[0] == ["patient_id", "birth_year", "visit_date", "diagnosis_code", "ward"]
    assert [r[0] for r in written[1:]] == reference.token_pseudonyms(
        cli.token("research-a"), [r["patient_id"].strip().upper() for r in source_rows])
    assert [r[4] for r in written[1:]] == [r["ward"] for r in source_rows]
    comma = tmp_path / "comma.csv"
    cli.run(*base[:3], comma, *base[4:], "--delimiter", argument, "--output-delimiter", ",")
    assert read_csv(comma) == [dict(zip(written[0], r, strict=True)) for r in written[1:]]


def test_bad_delimiter_argument(cli: Cli) -> None:
    proc = cli.run("file", "pseudonymise", SAMPLE, "x.csv", "--delimiter", ";;", expect=2)
    assert "';;' is not a CSV delimiter" in proc.stderr


def test_output_that_is_the_input_is_refused(cli: Cli, tmp_path: Path) -> None:
    """The same file as input and output (written another way: relative, through a symbolic link or a hard
    link) silently replaced the source; now it is refused before anything runs, and the source is intact."""
    source = tmp_path / "data" / "visits.csv"
    source.parent.mkdir()
    source.write_bytes(SAMPLE.read_bytes())
    (tmp_path / "link.csv").symlink_to(source)
    os.link(source, tmp_path / "hard.csv")
    rows_before = len(cli.audit_rows())
    for output in (source, tmp_path / "data" / ".." / "data" / "visits.csv", tmp_path / "link.csv",
                   tmp_path / "hard.csv"):
        for command in (("file", "pseudonymise", source, output, "--policy", POLICY),
                        ("file", "reverse", source, output, "--columns", "patient_id")):
            proc = cli.run(*command, "--db", cli.db, "--token-file", cli.tokens["reverse-a"], expect=1)
            assert "is the input file: it would be overwritten" in proc.stderr
    relative = subprocess.run(
        [sys.executable, "-m", "pseudonymise.cli", "file", "pseudonymise", "visits.csv", "./visits.csv", "--policy",
         str(POLICY), "--db", cli.db, "--token-file", str(cli.tokens["research-a"])],
        cwd=source.parent, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
        env={**os.environ, "PSEUDONYMISE_STORE": str(cli.store)})
    assert relative.returncode == 1 and "is the input file" in relative.stderr
    assert source.read_bytes() == SAMPLE.read_bytes()
    assert len(cli.audit_rows()) == rows_before  # refused before any token use


def test_a_token_pasted_as_an_argument_is_never_echoed(cli: Cli, pseudonymised: Path, tmp_path: Path) -> None:
    """argparse's own messages quote the argument ("invalid choice: '…'", "unrecognized arguments: …"), and
    so do the CLI's (a path, a project id, a database URL): a real token put in each of those places is
    answered with an error that names the problem, never the token (Cli.run fails on any secret in output)."""
    raw = cli.token("research-a")
    payload = raw.split(".")[1]
    cases = [
        (("token", "inspect", raw), 2, "unrecognized arguments: <redacted>"),
        (("token", "inspect", "--token-file", cli.tokens["research-a"], raw), 2, "unrecognized arguments"),
        (("token", "issue", "--project", "research-a", "--kind", raw, "--output", "-"), 2, "invalid choice: '<redacted>'"),
        (("token", "issue", "--project", "research-a", "--kind", "reverse", "--expires-in", raw, "--output", "-"), 2,
         "'<redacted>' is not a duration"),
        (("audit", "show", "--db", cli.db, "--limit", raw), 2, "invalid int value: '<redacted>'"),
        ((f"--token={raw}", "token", "inspect"), 2, "unrecognized arguments: --token=<redacted>"),
        (("project", "show", raw), 1, "<redacted>"),
        (("project", "create", payload), 1, "'<redacted>' is invalid"),
        (("token", "inspect", "--token-file", raw), 1, "cannot read the token file '<redacted>'"),
        (("file", "pseudonymise", raw, tmp_path / "o.csv", "--policy", POLICY, "--token-file",
          cli.tokens["research-a"]), 1, "<redacted>"),
        (("audit", "verify", "--db", raw), 1, "the database URL is not valid"),
        (("token", "revoke", raw, "--reason", "r", "--db", cli.db), 1, "at most 64 characters"),
    ]
    for case, (args, code, said) in enumerate(cases):
        proc = cli.run(*args, expect=code)
        said_to_user = proc.stdout + proc.stderr  # not proc itself: a failure report would print its arguments
        assert said in said_to_user, f"case {case}"
        assert payload not in said_to_user and raw[-40:] not in said_to_user
    assert [r["token_jti"] for r in cli.audit_rows()].count(raw) == 0


def test_cli_redact_keeps_paths_and_names() -> None:
    """Only a JWS, or a whole command-line word that looks like a key, is replaced: paths, ids and names in
    a message stay readable."""
    from pseudonymise import cli as cli_module

    key = "Q2hhbmdlIHRoaXMga2V5IGZvciBhIHJlYWwgb25lIQ"  # 42 base64url characters
    cli_module._ARGV[:] = ["file", "pseudonymise", "/data/patients-pseudonymised-for-research_a.csv", key]
    try:
        text = cli_module.redact(f"cannot open '/data/patients-pseudonymised-for-research_a.csv' (key {key}), "
                                 "project research-a, use 0b6fa3c4-1c1f-4d7e-9b6f-2f6a3c4d5e6f")
    finally:
        cli_module._ARGV[:] = []
    assert text == ("cannot open '/data/patients-pseudonymised-for-research_a.csv' (key <redacted>), "
                    "project research-a, use 0b6fa3c4-1c1f-4d7e-9b6f-2f6a3c4d5e6f")


def test_token_inspect_prints_utc_times_people_read(cli: Cli) -> None:
    """`token inspect` printed seconds since 1970; now each instant in UTC to the minute with how far it is,
    computed here from the token's own claims; --json keeps the claims as numbers, --field prints one."""
    path = cli.issue("inspect-times", "research-b", "pseudonymisation", "--expires-in", "31d")
    claims = reference.claims(cli.token("inspect-times"))
    text = cli.run("token", "inspect", "--token-file", path).stdout
    lines = dict(line.split(":", 1) for line in text.splitlines())
    expires = datetime.fromtimestamp(claims["exp"], UTC).strftime("%Y-%m-%d %H:%M")
    issued = datetime.fromtimestamp(claims["iat"], UTC).strftime("%Y-%m-%d %H:%M")
    assert lines["exp"].strip() == f"{expires} UTC (in 31 days)  [expires]"
    assert lines["iat"].strip() == f"{issued} UTC (now)  [issued]"
    assert lines["jti"].strip() == claims["jti"] and lines["valid"].strip() == "true"
    assert lines["retention_until"].strip().endswith(" UTC (in 1 year)")
    assert json.loads(cli.run("token", "inspect", "--json", "--token-file", path).stdout)["exp"] == claims["exp"]
    assert cli.run("token", "inspect", "--field", "jti", "--token-file", path).stdout == claims["jti"] + "\n"
    unknown = cli.run("token", "inspect", "--field", "nope", "--token-file", path, expect=1)
    assert "has no claim 'nope'" in unknown.stderr


def test_human_time() -> None:
    from pseudonymise.cli import human_time

    now = datetime(2026, 11, 30, 0, 0, tzinfo=UTC)
    assert human_time(datetime(2026, 12, 31, tzinfo=UTC), now) == "2026-12-31 00:00 UTC (in 31 days)"
    assert human_time(int(datetime(2026, 11, 29, 21, 0, tzinfo=UTC).timestamp()), now) == \
        "2026-11-29 21:00 UTC (3 hours ago)"
    assert human_time(now + timedelta(seconds=59), now) == "2026-11-30 00:00 UTC (now)"
    assert human_time(now + timedelta(days=730), now) == "2028-11-29 00:00 UTC (in 2 years)"
    assert human_time(now - timedelta(minutes=1), now) == "2026-11-29 23:59 UTC (1 minute ago)"


def test_audit_show_prints_no_none(cli: Cli, tmp_path: Path) -> None:
    """A purge of every project has no project and a started row no counts: `audit show` printed
    `project=None in=None`; now "-"."""
    db = f"sqlite:///{tmp_path / 'show.db'}"
    cli.run("file", "pseudonymise", SAMPLE, tmp_path / "o.csv", "--policy", POLICY, "--db", db,
            "--token-file", cli.tokens["research-a"])
    cli.run("escrow", "purge", "--db", db)
    text = cli.run("audit", "show", "--db", db).stdout
    assert "None" not in text
    lines = text.splitlines()
    assert len(lines) == 4 and "purge        success  project=- token=- in=- out=- null=- escrow=0" in lines[3]
    assert "no audit row matches" in cli.run("audit", "show", "--db", db, "--outcome", "denied").stdout


def test_messages_speak_of_token_files_and_databases_not_connections(cli: Cli, tmp_path: Path) -> None:
    """The core's advice is written for Airflow connections; the CLI names its own things."""
    empty = tmp_path / "blank-token.txt"
    empty.write_text("\n", encoding="utf-8")
    other = tmp_path / "other-issuer"
    subprocess.run([sys.executable, "-m", "pseudonymise.cli", "--store", str(other), "issuer", "init", "--issuer-id",
                    "other"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    other_keys = tmp_path / "other-keys.json"
    other_keys.write_text(subprocess.run(
        [sys.executable, "-m", "pseudonymise.cli", "--store", str(other), "issuer", "public-key"], check=True,
        capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout, encoding="utf-8")
    base = ("file", "pseudonymise", SAMPLE, tmp_path / "o.csv", "--policy", POLICY, "--db", cli.db)
    cases = [
        ((*base, "--token-file", empty), "check the token file or variable"),
        ((*base, "--token-file", cli.tokens["reverse-a"]), "use a token file of the right kind"),
        ((*base, "--token-file", cli.tokens["research-a"], "--issuer-keys", other_keys), "to --issuer-keys"),
    ]
    for args, said in cases:
        proc = cli.run(*args, expect=1)
        assert said in proc.stderr and "connection" not in proc.stderr, proc.stderr
    from pseudonymise.cli import cli_message

    assert cli_message("the database does not exist: check the connection") == \
        "the database does not exist: check the database URL (--db)"
    assert "connection" not in cli_message("token t expired at 2026-01-01T00:00:00Z; ask the issuer for a new token "
                                           "and update the connection")


def test_every_option_has_help() -> None:
    """Every argument of every command (the subcommand choosers too) says what it is in --help."""
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "pseudonymise")
    assert missing == []


# --- de-identifying actions ----------------------------------------------------------------------
RESEARCH_POLICY = REPO / "include" / "policies" / "research_extract.json"


def _research_csv(path: Path, extra: str = "") -> list[dict[str, str]]:
    """The sample patients with a synthetic postcode, as the research extract policy expects."""
    rows = read_csv(SAMPLE)[:40]
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, [*rows[0], "postcode"])
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({**row, "postcode": f"{1011 + i * 37 % 8000}{'ABCD'[i % 4]}{'XYZ'[i % 3]}"})
        if extra:
            fh.write(extra)
    return read_csv(path)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_file_pseudonymise_with_the_research_extract_policy(cli: Cli, tmp_path: Path, suffix: str) -> None:
    source = _research_csv(tmp_path / "research.csv")
    out = tmp_path / f"research.out.{suffix}"
    proc = cli.run("file", "pseudonymise", tmp_path / "research.csv", out, "--policy", RESEARCH_POLICY, "--db", cli.db,
                   "--token-file", cli.tokens["research-b"])
    assert "40 rows in, 40 out" in proc.stderr
    got = read_csv(out) if suffix == "csv" else [{k: ("" if v is None else v) for k, v in r.items()}
                                                 for r in pq.read_table(out).to_pylist()]
    assert list(got[0]) == ["patient_id", "birth_year", "visit_date", "diagnosis_code", "ward", "postcode"]
    key = project_key(cli, "research-b")
    for before, after in zip(source, got, strict=True):
        subject = before["patient_id"].strip().upper()  # the subject's normalisers, as its pseudonym's
        assert after["patient_id"] == reference.pseudonym(key, subject)
        assert after["visit_date"] == reference.shift(before["visit_date"],
                                                      reference.date_shift_offset(key, subject, 30))
        assert after["birth_year"] == reference.integer_band(before["birth_year"], 5)
        assert after["postcode"] == before["postcode"][:3]
        assert (after["diagnosis_code"], after["ward"]) == (before["diagnosis_code"], before["ward"])
    done = [r for r in cli.audit_rows() if r["target"] == f"file:{out}"][-1]
    assert done["outcome"] == "success" and json.loads(done["columns"]) == [
        "patient_id", "birth_year:generalise", "visit_date:date_shift", "postcode:generalise"]


def test_file_pseudonymise_refuses_an_unparsable_date_naming_row_not_value(cli: Cli, tmp_path: Path) -> None:
    _research_csv(tmp_path / "bad.csv", extra="P999,Someone,1950,03/04/2026 x9q,,icu,1234AB\n")
    out = tmp_path / "bad.out.csv"
    proc = cli.run("file", "pseudonymise", tmp_path / "bad.csv", out, "--policy", RESEARCH_POLICY, "--db", cli.db,
                   "--token-file", cli.tokens["research-b"], expect=1)
    assert "column 'visit_date', row 41" in proc.stderr and "ISO 8601" in proc.stderr
    assert "x9q" not in proc.stderr and "03/04" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_the_command_loads_the_engine_only_for_a_command_that_needs_it() -> None:
    """The parser and ``--help`` load none of SQLAlchemy, numpy, pyarrow and cryptography (their import was a third
    of a file run's time); ``file pseudonymise`` loads them while its input is already being read."""
    code = ("import sys; import pseudonymise.cli as cli; cli.build_parser(); "
            "print(','.join(m for m in ('sqlalchemy', 'numpy', 'pyarrow', 'cryptography') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == ""
