#!/usr/bin/env bash
# Set up and run the whole pipeline on the embedded default (digits, CPU, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/dvc repro "$@"
.venv/bin/dvc metrics show
