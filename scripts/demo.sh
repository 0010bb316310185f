#!/usr/bin/env bash
# README's first command: set up, then run the main job on the embedded default (local Ray, the
# real SmolLM2-135M-Instruct). Extra arguments are config overrides, e.g. expand.blocks=3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec llamapro run --config jobs/configs/demo.yaml "$@"
