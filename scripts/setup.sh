#!/usr/bin/env bash
# Sourced by the quick-start commands: a virtual environment with the pinned requirements and this
# package, and (with --postgres) PostgreSQL's server binaries from apt when they are absent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating the virtual environment (.venv)"
    "$PYTHON" -m venv .venv
fi
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat .venv/.installed 2>/dev/null || true)" != "$want" ]; then
    echo "==> installing pinned requirements (first run only)"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import pseudonymise, airflow, hvac" 
    echo "$want" > .venv/.installed
fi

ensure_postgres() {
    if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
        return 0
    fi
    echo "==> installing PostgreSQL server binaries with apt"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql postgresql-contrib >/dev/null
}
