#!/usr/bin/env bash
# The Airflow UI with the plugin's pages and HTTP API, on the main job's world: run scripts/main.sh
# first, then this, and open the printed address. Options: --work DIR (default var/example),
# --port N (default 8080); anything else goes to `airflow api-server`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$ROOT/var/example"
PORT=8080
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK="$(cd "$2" && pwd)"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
if [ ! -f "$WORK/research.db" ] || [ ! -x "$ROOT/.venv/bin/airflow" ]; then
    echo "error: no $WORK/research.db: run 'bash scripts/main.sh' first" >&2
    exit 1
fi

export AIRFLOW_HOME="$WORK/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin,viewer:viewer}"
# The plugin reads (and the HTTP API writes) the audit in the research database the DAG loaded.
export AIRFLOW_CONN_RESEARCH_DB="{\"conn_type\": \"sqlite\", \"host\": \"$WORK/research.db\"}"
export AIRFLOW__PSEUDONYMISE__AUDIT_CONN_ID=research_db
# The research project's token connection, as the example DAG has it, so the HTTP API can use it.
AIRFLOW_CONN_PSEUDONYMISE_RESEARCH="$(PSEUDONYMISE_STORE="$WORK/issuer" "$ROOT/.venv/bin/python" - "$WORK" <<'PY'
import json, pathlib, subprocess, sys
work = pathlib.Path(sys.argv[1])
jwks = subprocess.run([str(pathlib.Path(sys.executable).parent / "pseudonymise"), "issuer", "public-key"],
                      capture_output=True, text=True, check=True).stdout
print(json.dumps({"conn_type": "pseudonymise", "password": (work / "research-a.token").read_text().strip(),
                  "extra": {"issuer_keys": jwks, "project": "research-a"}}))
PY
)"
export AIRFLOW_CONN_PSEUDONYMISE_RESEARCH

echo "==> http://127.0.0.1:$PORT/pseudonymise/audit (Airflow UI: http://127.0.0.1:$PORT, Plugins > Pseudonymisation)"
echo "==> sign in as admin; the password is printed below and kept in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
exec "$ROOT/.venv/bin/airflow" api-server --host "${HOST:-127.0.0.1}" --port "$PORT" "${EXTRA[@]}"
