#!/usr/bin/env bash
# The Airflow UI with the plugin's pages and HTTP API, on the main job's world: run scripts/main.sh
# first, then this, and open the printed address. Options: --work DIR (default var/example),
# --state DIR (where main.sh keeps the issuer and token; default: the work folder's name with -state),
# --port N (default 8080); anything else goes to `airflow api-server`. PSEUDONYMISE_VENV: the virtual
# environment (default .venv, as scripts/setup.sh makes it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PSEUDONYMISE_VENV:-$ROOT/.venv}"
WORK="$ROOT/var/example"
STATE=""
PORT=8080
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --work) WORK="$(cd "$2" && pwd)"; shift 2 ;;
        --state) STATE="$(cd "$2" && pwd)"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
STATE="${STATE:-$WORK-state}"
if [ ! -f "$WORK/research.db" ] || [ ! -f "$STATE/research-a.token" ] || [ ! -x "$VENV/bin/airflow" ]; then
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
AIRFLOW_CONN_PSEUDONYMISE_RESEARCH="$(PSEUDONYMISE_STORE="$STATE/issuer" "$VENV/bin/python" - "$STATE" <<'PY'
import json, pathlib, subprocess, sys
state = pathlib.Path(sys.argv[1])
jwks = subprocess.run([sys.executable, "-m", "pseudonymise.cli", "issuer", "public-key"],
                      capture_output=True, text=True, check=True).stdout
print(json.dumps({"conn_type": "pseudonymise", "password": (state / "research-a.token").read_text().strip(),
                  "extra": {"issuer_keys": jwks, "project": "research-a"}}))
PY
)"
export AIRFLOW_CONN_PSEUDONYMISE_RESEARCH

echo "==> http://127.0.0.1:$PORT/pseudonymise/audit (Airflow UI: http://127.0.0.1:$PORT, Plugins > Pseudonymisation)"
echo "==> sign in as admin; the password is printed below and kept in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
exec "$VENV/bin/airflow" api-server --host "${HOST:-127.0.0.1}" --port "$PORT" "${EXTRA[@]}"
