#!/usr/bin/env bash
# README's first command: set up, then run the main job on the embedded default (local Ray, the
# real SmolLM2-135M-Instruct). Extra arguments are config overrides, e.g. expand.blocks=3.
# The screen shows the steps and training progress (stage, step, loss, tokens/s, time left); Ray's
# own logs and the workers' raw output go to runs/demo/logs/ray.log (`llamapro -v run ...` shows
# them on screen too). On a failure the error and that log's path are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec llamapro run --config jobs/configs/demo.yaml "$@"
