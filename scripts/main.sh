#!/usr/bin/env bash
# The main job: the daily patient-extract example DAG, end to end, on the embedded default
# (SQLite for Airflow's metadata, the hospital source and the research target). It installs the
# runtime requirements only (requirements-runtime.txt when it exists, else requirements.txt) and keeps
# its issuer and token in var/example-state/ between runs, so a second run gives the same pseudonyms.
# Options go to scripts/run_example.py: --fresh (a new issuer: new pseudonyms), --day YYYY-MM-DD,
# --work DIR, --state DIR.
set -euo pipefail
SETUP_REQUIREMENTS=runtime
source "$(dirname "$0")/setup.sh"
"$VENV/bin/python" scripts/run_example.py "$@"

state="var/example-state"
for ((i = 1; i <= $#; i++)); do
    [ "${!i}" = "--state" ] && j=$((i + 1)) && state="${!j}"
    [ "${!i}" = "--work" ] && j=$((i + 1)) && state="${!j}-state"
done
cat <<NEXT

What next:
  the CLI, on the same issuer (its --help has examples for every command):
    export PSEUDONYMISE_STORE=$state/issuer
    $VENV/bin/pseudonymise token inspect --token-file $state/research-a.token
    $VENV/bin/pseudonymise file pseudonymise include/sample/patients.csv /tmp/patients.pseudonymised.csv \\
        --policy include/policies/patients.json --token-file $state/research-a.token --db sqlite:///var/cli-audit.db
    $VENV/bin/pseudonymise audit show --db sqlite:///var/cli-audit.db
  the plugin's pages and HTTP API in the Airflow UI:   bash scripts/ui.sh
  the whole test suite (PostgreSQL, OpenBao, Airflow):  bash scripts/test.sh   (fast loop: bash scripts/test.sh -m "not slow")
  start over with a new issuer (new pseudonyms):       bash scripts/main.sh --fresh
NEXT
