"""Run the patient-extract example DAG end to end on SQLite and print what it did.

Creates a throwaway world under var/example/: an issuer, a reversible research project and its
token (with the ``pseudonymise`` CLI), a hospital database loaded from include/sample, Airflow's
metadata database, then runs the DAG for one day with ``airflow dags test`` and shows the rows
in and out, a sample of pseudonymised rows and the audit rows written.
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
BIN = Path(sys.executable).parent


def sh(*args: str, env: dict[str, str], quiet: bool = False) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args[:4])} …")
    return proc.stdout


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
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base_env = {**os.environ, "PSEUDONYMISE_STORE": str(work / "issuer")}

    print("1. issuer, project and token, with the pseudonymise CLI")
    cli = str(BIN / "pseudonymise")
    sh(cli, "issuer", "init", "--issuer-id", "example-hospital", env=base_env)
    sh(cli, "project", "create", "research-a", "--method", "reversible", "--retention", "365d", env=base_env)
    sh(cli, "token", "issue", "--project", "research-a", "--kind", "pseudonymisation", "--expires-in", "30d",
       "--output", str(work / "research-a.token"), env=base_env)
    jwks = sh(cli, "issuer", "public-key", env=base_env)
    token = (work / "research-a.token").read_text().strip()
    claims = json.loads(subprocess.run([cli, "token", "inspect", "--json", "--token-file", str(work / "research-a.token")],
                                       env=base_env, capture_output=True, text=True, check=True).stdout)
    print(f"   token {claims['jti']} ({claims['kind']}, project {claims['sub']}, {claims['method']}, "
          f"fingerprint {claims['fingerprint']})")

    print("2. hospital source database (SQLite) from include/sample/patients.csv")
    total = load_hospital(work / "hospital.db")
    print(f"   {total} patient visits loaded")

    env = environment(work, token, jwks)
    print("3. Airflow metadata database (SQLite)")
    sh(str(BIN / "airflow"), "db", "migrate", env=env)

    print(f"4. airflow dags test pseudonymise_patient_extract {args.day}")
    out = sh(str(BIN / "airflow"), "dags", "test", "pseudonymise_patient_extract", args.day, env=env)
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
    verify = subprocess.run([cli, "audit", "verify", "--db", f"sqlite:///{work / 'research.db'}"], env=base_env,
                            capture_output=True, text=True, check=False)
    print("\n" + verify.stdout.strip())
    print(f"\nEverything is under {work}: the task log is dags-test.log; the research table and its audit are in research.db.")
    if verify.returncode != 0 or rows_out != rows_in:
        raise SystemExit("the example run did not produce the expected result")


if __name__ == "__main__":
    main()
