"""Run the patient-extract example DAG end to end on SQLite and print what it did.

The issuer, its reversible research project and the project's token (made with the ``pseudonymise``
CLI) are kept between runs in a state folder (var/example-state/, git-ignored), so a second run gives
the same pseudonyms; ``--fresh`` starts over with a new issuer. The rest is a throwaway world under
var/example/, made again each run: a hospital database loaded from include/sample, Airflow's metadata
database; then the DAG runs for one day with ``airflow dags test`` and the rows in and out, a sample
of pseudonymised rows and the audit rows written are shown.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pseudonymise.cli"]
AIRFLOW = [sys.executable, "-m", "airflow"]


def sh(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args[:6])} …")
    return proc


def keep_issuer(state: Path, fresh: bool) -> tuple[dict[str, str], Path, dict[str, object]]:
    """The issuer, project research-a and its token in ``state``: made on the first run (or with ``fresh``),
    kept afterwards; the token is issued again only when it no longer verifies (expired, say)."""
    if fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    env = {**os.environ, "PSEUDONYMISE_STORE": str(state / "issuer")}
    token_file = state / "research-a.token"
    if not (state / "issuer").exists():
        print(f"1. issuer, project and token, with the pseudonymise CLI (kept in {state})")
        sh(*CLI, "issuer", "init", "--issuer-id", "example-hospital", env=env)
        sh(*CLI, "project", "create", "research-a", "--method", "reversible", "--retention", "365d", env=env)
    else:
        print(f"1. issuer and project kept from an earlier run in {state} (--fresh starts over)")
    inspected = sh(*CLI, "token", "inspect", "--json", "--token-file", str(token_file), env=env, check=False)
    if inspected.returncode != 0:
        sh(*CLI, "token", "issue", "--project", "research-a", "--kind", "pseudonymisation", "--expires-in", "30d",
           "--output", str(token_file), env=env)
        inspected = sh(*CLI, "token", "inspect", "--json", "--token-file", str(token_file), env=env)
    return env, token_file, json.loads(inspected.stdout)


def load_hospital(db: Path) -> int:
    with sqlite3.connect(db) as conn, open(ROOT / "include/sample/patients.csv", encoding="utf-8", newline="") as fh:
        conn.execute("CREATE TABLE patient_visits (patient_id TEXT, name TEXT, birth_year INTEGER, visit_date TEXT,"
                     " diagnosis_code TEXT, ward TEXT)")
        rows = [tuple(v or None for v in r) for r in list(csv.reader(fh))[1:]]
        conn.executemany("INSERT INTO patient_visits VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)


def environment(work: Path, token: str, jwks: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_PSEUDONYMISE_RESEARCH": json.dumps({
            "conn_type": "pseudonymise", "password": token, "extra": {"issuer_keys": jwks, "project": "research-a"}}),
        "AIRFLOW_CONN_HOSPITAL_DB": json.dumps({"conn_type": "sqlite", "host": str(work / "hospital.db")}),
        "AIRFLOW_CONN_RESEARCH_DB": json.dumps({"conn_type": "sqlite", "host": str(work / "research.db")}),
    })
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--day", default="2026-11-03", help="the data interval's first day (default 2026-11-03)")
    parser.add_argument("--work", default=str(ROOT / "var/example"), help="scratch folder, recreated")
    parser.add_argument("--state", help="where the issuer and the token are kept between runs "
                                        "(default: the work folder's name with -state, var/example-state)")
    parser.add_argument("--fresh", action="store_true", help="forget the kept issuer and token: new pseudonyms")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    state = Path(args.state).resolve() if args.state else work.with_name(work.name + "-state")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base_env, token_file, claims = keep_issuer(state, args.fresh)
    jwks = sh(*CLI, "issuer", "public-key", env=base_env).stdout
    token = token_file.read_text().strip()
    print(f"   token {claims['jti']} ({claims['kind']}, project {claims['sub']}, {claims['method']}, "
          f"fingerprint {claims['fingerprint']})")

    print("2. hospital source database (SQLite) from include/sample/patients.csv")
    total = load_hospital(work / "hospital.db")
    print(f"   {total} patient visits loaded")

    env = environment(work, token, jwks)
    print("3. Airflow metadata database (SQLite)")
    sh(*AIRFLOW, "db", "migrate", env=env)

    print(f"4. airflow dags test pseudonymise_patient_extract {args.day}")
    out = sh(*AIRFLOW, "dags", "test", "pseudonymise_patient_extract", args.day, env=env).stdout
    (work / "dags-test.log").write_text(out)
    if token in out or claims["jti"] not in (work / "research.db").read_bytes().decode("latin1"):
        raise SystemExit("unexpected: the token appeared in the task log, or no audit row names the token")

    with sqlite3.connect(work / "hospital.db") as src, sqlite3.connect(work / "research.db") as dst:
        start, end = dst.execute("SELECT substr(data_interval_start, 1, 10), substr(data_interval_end, 1, 10)"
                                 " FROM pseudonymise_audit WHERE outcome = 'success'").fetchone()
        rows_in = src.execute("SELECT count(*) FROM patient_visits WHERE visit_date >= ? AND visit_date < ?",
                              (start, end)).fetchone()[0]
        rows_out = dst.execute("SELECT count(*) FROM patient_visits_pseudonymised").fetchone()[0]
        print(f"\ndata interval [{start}, {end}): rows in (hospital source) {rows_in}, "
              f"rows out (research table) {rows_out}")
        cur = dst.execute("SELECT * FROM patient_visits_pseudonymised LIMIT 5")
        names = [d[0] for d in cur.description]
        print("\nsample of pseudonymised rows:")
        print("   " + " | ".join(names))
        for row in cur:
            print("   " + " | ".join("NULL" if v is None else str(v) for v in row))
        print("\naudit rows written:")
        for row in dst.execute("SELECT seq, recorded_at, operation, outcome, project, token_jti, dag_id, task_id,"
                               " rows_in, rows_out, rows_null, escrow_rows, substr(row_hash, 1, 12)"
                               " FROM pseudonymise_audit ORDER BY seq"):
            seq, when, op, outcome, project, jti, dag, task, rin, rout, nulls, escrow, h = row
            counts = f" in={rin} out={rout} null={nulls} escrow={escrow}" if outcome != "started" else ""
            print(f"   #{seq} {when} {op} {outcome} project={project} token={jti} {dag}.{task}{counts} hash={h}…")
    verify = sh(*CLI, "audit", "verify", "--db", f"sqlite:///{work / 'research.db'}", env=base_env, check=False)
    print("\n" + verify.stdout.strip())
    print(f"\nEverything is under {work}: the task log is dags-test.log; the research table and its audit are in "
          f"research.db. The issuer and the token are kept in {state}: the next run gives the same pseudonyms.")
    if verify.returncode != 0 or rows_out != rows_in:
        raise SystemExit("the example run did not produce the expected result")


if __name__ == "__main__":
    main()
