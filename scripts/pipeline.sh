#!/usr/bin/env bash
# Set up and run the whole pipeline on the embedded default (digits, CPU, no download).
# Extra arguments go to `dvc repro` (e.g. a stage name: `bash scripts/pipeline.sh train`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# dvc.yaml runs `python stages/<name>.py`: the project's environment comes first on PATH, whatever python the
# calling shell has (the same as `source .venv/bin/activate`).
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
dvc repro "$@"
dvc metrics show
