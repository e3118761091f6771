#!/usr/bin/env bash
# Sourced by the quick-start commands (main.sh, test.sh): a virtual environment with the pinned
# requirements and this package, made so that it cannot fail silently:
# - python3-venv is installed with apt when Python's venv/ensurepip is missing (Debian, as root or with sudo);
# - a broken environment (no bin/python, a python that does not start, no pip, or an install that was
#   interrupted) is named and rebuilt;
# - pip's output goes to a log file whose last lines are printed when a step fails; each step prints what it
#   installs, how many packages, and how long it took (with a line every 15 s while it runs).
# SETUP_REQUIREMENTS=runtime (main.sh) installs the runtime requirements only: requirements-runtime.txt when
# it exists, else requirements.txt. PSEUDONYMISE_VENV puts the environment elsewhere (default .venv).
# ensure_system_packages installs, with apt and only when absent, what the tests run: PostgreSQL's server
# binaries (no system cluster created, no service started), Chromium and Redis.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${PSEUDONYMISE_VENV:-$ROOT/.venv}"
SETUP_LOG="${SETUP_LOG:-$ROOT/var/setup.log}"

# --- running things as root, and apt -----------------------------------------------------------------
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        return 126
    fi
}

can_be_root() { [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }

# Runs "$@" with its output in the log; on failure prints the log's last lines and exits.
logged() {
    local what="$1"
    shift
    mkdir -p "$(dirname "$SETUP_LOG")"
    echo "---- $(date -u +%FT%TZ) $what: $*" >>"$SETUP_LOG"
    if ! "$@" >>"$SETUP_LOG" 2>&1; then
        echo "error: $what failed; the last lines of $SETUP_LOG:" >&2
        tail -n 40 "$SETUP_LOG" >&2
        exit 1
    fi
}

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $* needed, and this is not a Debian-like system (no apt-get): install them, then run this again" >&2
        exit 1
    fi
    if ! can_be_root; then
        echo "error: $* needed: run 'sudo apt-get install -y $*' (this script is neither root nor allowed sudo)" >&2
        exit 1
    fi
    local start=$SECONDS
    echo "==> installing with apt: $* …"
    logged "apt-get update" as_root apt-get update
    logged "apt-get install $*" as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
    echo "    done in $((SECONDS - start)) s"
}

# --- the virtual environment -------------------------------------------------------------------------
ensure_python_venv() {
    if "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
        return 0
    fi
    local version
    version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    local package=python3-venv
    if command -v apt-cache >/dev/null 2>&1 && apt-cache show "python$version-venv" >/dev/null 2>&1; then
        package="python$version-venv"
    fi
    echo "==> $PYTHON ($version) has no venv/ensurepip module"
    apt_install "$package"
}

# Prints why the environment at $1 cannot be used, or nothing (and fails) when it can.
venv_problem() {
    local venv="$1"
    if [ ! -e "$venv" ]; then
        return 1
    elif [ -e "$venv/.installing" ]; then
        echo "an earlier install into it was interrupted"
    elif [ ! -x "$venv/bin/python" ]; then
        echo "it has no bin/python"
    elif ! "$venv/bin/python" -c "import sys" >/dev/null 2>&1; then
        echo "its python does not start (was the Python it was made from removed or upgraded?)"
    elif ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "it has no pip"
    else
        return 1
    fi
}

# The package lines of a requirements file and of the files it includes with -r.
count_requirements() {
    local file="$1" total=0 line
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%#*}"
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in
            "") ;;
            -r\ * | --requirement\ *) total=$((total + $(count_requirements "$(dirname "$file")/${line#* }"))) ;;
            -*) ;;
            *) total=$((total + 1)) ;;
        esac
    done <"$file"
    echo "$total"
}

# pip install with its output in the log: a line every 15 s saying how far it is (packages collected, then
# installing); on failure the log's last lines.
pip_step() {
    local what="$1"
    shift
    mkdir -p "$(dirname "$SETUP_LOG")"
    echo "---- $(date -u +%FT%TZ) $what: pip install $*" >>"$SETUP_LOG"
    local from start=$SECONDS pid rc=0
    from=$(wc -l <"$SETUP_LOG")
    echo "==> $what …"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" >>"$SETUP_LOG" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ $(((SECONDS - start) % 15)) -eq 0 ] && kill -0 "$pid" 2>/dev/null; then
            if tail -n +"$((from + 1))" "$SETUP_LOG" | grep -q "^Installing collected packages"; then
                echo "    … $((SECONDS - start)) s: installing the downloaded packages"
            else
                echo "    … $((SECONDS - start)) s: $(tail -n +"$((from + 1))" "$SETUP_LOG" \
                    | grep -cE '^(Collecting|Requirement already satisfied)' || true) packages collected"
            fi
        fi
    done
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "error: $what failed (pip exit $rc) after $((SECONDS - start)) s; the last lines of $SETUP_LOG:" >&2
        tail -n 40 "$SETUP_LOG" >&2
        exit 1
    fi
    echo "    done in $((SECONDS - start)) s"
}

requirements_file() {
    if [ "${SETUP_REQUIREMENTS:-all}" = runtime ] && [ -f requirements-runtime.txt ]; then
        echo requirements-runtime.txt
    else
        echo requirements.txt
    fi
}

setup_venv() {
    local problem
    if problem="$(venv_problem "$VENV")"; then
        echo "==> $VENV is broken ($problem): removing it and making it again"
        rm -rf "$VENV"
    fi
    if [ ! -e "$VENV" ]; then
        ensure_python_venv
        echo "==> creating the virtual environment ($VENV)"
        logged "creating $VENV" "$PYTHON" -m venv "$VENV"
    fi
    # The package's C engine (plugins/pseudonymise/core/_native.c) is built by the install below; it
    # needs gcc and OpenSSL's headers. Without them the package still installs and runs its pure-Python
    # engine (same pseudonyms, slower), and the test suite fails test_the_c_engine_is_built.
    if ! command -v gcc >/dev/null 2>&1 || [ ! -f /usr/include/openssl/evp.h ]; then
        if can_be_root && command -v apt-get >/dev/null 2>&1; then
            apt_install gcc libc6-dev libssl-dev
        else
            echo "warning: no gcc or OpenSSL headers (libssl-dev); the pure-Python engine will be used" >&2
        fi
    fi
    local requirements want marker
    requirements="$(requirements_file)"
    marker="$VENV/.installed-$(basename "$requirements" .txt)"
    # every requirements file: requirements.txt may include the others with -r
    want="$(cat "$requirements" requirements*.txt pyproject.toml setup.py plugins/pseudonymise/core/_native.c | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$marker" 2>/dev/null || true)" = "$want" ]; then
        return 0
    fi
    # Removed only once everything below succeeded: an install cut short is seen at the next run.
    touch "$VENV/.installing"
    local kind="pinned"
    [ "$requirements" = requirements-runtime.txt ] && kind="runtime"
    pip_step "installing $kind requirements from $requirements ($(count_requirements "$requirements") packages)" \
        -r "$requirements"
    pip_step "installing this package (editable, with its C engine)" --no-deps -e .
    # The editable build leaves an egg-info in plugins/, which is on sys.path: Airflow would see the
    # package twice and report its plugin as "already registered".
    rm -rf plugins/*.egg-info
    logged "checking the install" "$VENV/bin/python" -c "import pseudonymise, airflow, hvac"
    "$VENV/bin/python" -c "import pseudonymise.core._native" 2>/dev/null \
        || echo "warning: the C engine did not build (gcc, libssl-dev?); running the pure-Python engine" >&2
    echo "$want" >"$marker"
    rm -f "$VENV/.installing"
}

# --- what the tests run --------------------------------------------------------------------------------
# Debian's postgresql package creates and starts a "main" cluster on port 5432; the tests start their own
# throwaway clusters from the server binaries (scripts/services.py finds /usr/lib/postgresql/*/bin/initdb).
# So postgresql-common is installed first and told not to create a cluster, and no service is started while
# the packages install (policy-rc.d answers 101, "action forbidden", to every invoke-rc.d).
no_cluster_config() {
    local conf=/etc/postgresql-common/createcluster.conf
    if [ -d /etc/postgresql-common/createcluster.d ] && grep -q "^include_dir.*createcluster.d" "$conf" 2>/dev/null; then
        echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.d/00-no-main-cluster.conf >/dev/null
    elif ! grep -qE "^\s*create_main_cluster" "$conf" 2>/dev/null; then
        echo "create_main_cluster = false" | as_root tee -a "$conf" >/dev/null
    fi
}

ensure_system_packages() {
    local missing=() postgres=0
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
        postgres=1
    fi
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    # the Celery executor's broker in the Celery full-stack test and bench (started by scripts/services.py)
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
    [ "$postgres" -eq 0 ] && [ "${#missing[@]}" -eq 0 ] && return 0
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ] && can_be_root; then
        printf '#!/bin/sh\n# scripts/setup.sh: start no service while it installs packages\nexit 101\n' \
            | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        made_policy=1
    fi
    if [ "$postgres" -eq 1 ]; then
        apt_install postgresql-common
        no_cluster_config
        apt_install postgresql postgresql-contrib
    fi
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
    if [ "$made_policy" -eq 1 ]; then
        as_root rm -f "$policy"
    fi
}

if [ "${SETUP_DEFINE_ONLY:-0}" != 1 ]; then
    setup_venv
fi
