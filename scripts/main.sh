#!/usr/bin/env bash
# The main job: the daily patient-extract example DAG, end to end, on the embedded default
# (SQLite for Airflow's metadata, the hospital source and the research target).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec .venv/bin/python scripts/run_example.py "$@"
