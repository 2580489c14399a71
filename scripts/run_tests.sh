#!/usr/bin/env bash
# The README's test command: create .venv when missing, install the project into it, run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k metrics`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/venv.sh
ensure_venv
exec "$VENV/bin/python" -m pytest "$@"
