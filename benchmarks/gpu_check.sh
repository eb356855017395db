#!/usr/bin/env bash
# The LM study on CUDA against the CPU (benchmarks/gpu_check.py): fine-tunes/min, per-example
# gradients/s, and the agreement of GPU scores, effects and LDS with the CPU's. On a GPU machine:
#   benchmarks/gpu_check.sh [OUT.json]
# Creates .venv with the CPU torch as `make` does unless one exists; on a CUDA machine give a venv whose
# torch has CUDA (e.g. PYTHON=/path/to/python with torch+CUDA and the project installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || make .venv/.installed >/dev/null
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$PY" benchmarks/gpu_check.py --out "${1:-${OUT:-.}/gpu_check.json}"
