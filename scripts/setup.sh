#!/usr/bin/env bash
# Sourced by the quick-start commands: a virtual environment with the pinned requirements and this
# package; ensure_system_packages installs, with apt and only when absent, what the tests run:
# PostgreSQL's server binaries, Chromium (the UI test's headless browser) and Redis (the Celery broker).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating the virtual environment (.venv)"
    "$PYTHON" -m venv .venv
fi
# The package's C engine (plugins/pseudonymise/core/_native.c) is built by the install below; it
# needs gcc and OpenSSL's headers. Without them the package still installs and runs its pure-Python
# engine (same pseudonyms, slower), and the test suite fails test_the_c_engine_is_built.
if ! command -v gcc >/dev/null 2>&1 || [ ! -f /usr/include/openssl/evp.h ]; then
    echo "==> installing with apt: gcc libssl-dev (to build the C engine)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc libc6-dev libssl-dev \
        >/dev/null || echo "warning: could not install gcc/libssl-dev; the pure-Python engine will be used" >&2
fi
want="$(cat requirements.txt pyproject.toml setup.py plugins/pseudonymise/core/_native.c | sha256sum | cut -d' ' -f1)"
if [ "$(cat .venv/.installed 2>/dev/null || true)" != "$want" ]; then
    echo "==> installing pinned requirements (first run only)"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
    # The editable build leaves an egg-info in plugins/, which is on sys.path: Airflow would see the
    # package twice and report its plugin as "already registered".
    rm -rf plugins/*.egg-info
    .venv/bin/python -c "import pseudonymise, airflow, hvac"
    .venv/bin/python -c "import pseudonymise.core._native" 2>/dev/null \
        || echo "warning: the C engine did not build (gcc, libssl-dev?); running the pure-Python engine" >&2
    echo "$want" > .venv/.installed
fi

ensure_system_packages() {
    local missing=()
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
        missing+=(postgresql postgresql-contrib)
    fi
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    # the Celery executor's broker in the Celery full-stack test and bench (started by scripts/services.py)
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "==> installing with apt: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
