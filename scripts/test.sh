#!/usr/bin/env bash
# README's second command: set up, then run every test tier (unit, integration, e2e).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e"` or `-k expansion`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest tests -q -p no:cacheprovider --durations=25 "$@"
