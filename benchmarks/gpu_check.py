"""The LM study on CUDA against the CPU: speed and agreement (`benchmarks/gpu_check.sh` runs it).

    python benchmarks/gpu_check.py [--store DIR] [--out FILE.json]

One store, `specs/lm_effects.yaml` (1,500 instructions → BPE → a 533k GPT-2 → 96 subset fine-tunes →
GradDot → LDS):

1. cpu:  the whole study on the CPU (`device: cpu`); its effects and GradDot tables are kept aside.
2. cuda: `--force effects --force graddot` with `device: cuda` (fp32): the same base model, so the
   fine-tunes and the gradients are recomputed on the GPU from the very same θ; 4 fine-tune tasks share
   the GPU (`task_gpus: 0.25`).
3. bf16: the same with `precision: bf16` (autocast of the forward passes).

Printed per run: fine-tunes per minute (subset_effects), GradDot examples per second (per-example
gradients of all 533k parameters, then the dot products), the LDS of GradDot; and the agreement of each
GPU run with the CPU: GradDot scores (largest error relative to the largest |score|, mean Spearman of
each target's ranking), effects (largest |Δ loss|), LDS (difference). The tolerance stated in
docs/lm_experiments.md: fp32 scores within 1e-4 of the largest score; fine-tunes drift more (each step
amplifies rounding), so effects are compared by their LDS, within 0.02. Without a CUDA device, only the
CPU run happens, and the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "lm_effects.yaml"
CUDA = [
    "steps.effects.device=cuda",
    "steps.effects.task_gpus=0.25",
    "steps.graddot.device=cuda",
    "steps.graddot.resources.num_gpus=1",
]


def tda_run(store: Path, overrides: list[str], force: list[str]) -> float:
    """Run the study in a fresh process; its wall seconds."""
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(SPEC), "--store", str(store), "-q"]
    cmd += [arg for o in overrides for arg in ("--set", o)] + [arg for f in force for arg in ("--force", f)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        sys.exit(f"gpu_check: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def snapshot(store: Path, seconds: float) -> dict:
    """The latest run's effects, GradDot scores, LDS and step metrics."""
    import pipelines

    run = pipelines.open_run(store)
    metric = {name: run.output(name).manifest["metrics"] for name in ("effects", "graddot")}
    return {
        "seconds": seconds,
        "effects": run.table("effects").collect().sort("subset_id", "target_id"),
        "scores": run.table("graddot").collect().sort("target_id", "example_id"),
        "lds": float(run.table("lds").collect()["spearman"].mean()),
        "fine_tunes_per_minute": metric["effects"]["subsets_per_minute"],
        "graddot_examples_per_second": metric["graddot"]["examples_per_second"],
    }


def agreement(cpu: dict, gpu: dict) -> dict:
    from scipy.stats import spearmanr

    a, b = cpu["scores"]["score"].to_numpy(), gpu["scores"]["score"].to_numpy()
    targets = cpu["scores"]["target_id"].to_numpy()
    rho = [spearmanr(a[targets == t], b[targets == t])[0] for t in np.unique(targets)]
    return {
        "score_error": float(np.abs(a - b).max() / np.abs(a).max()),
        "score_spearman": float(np.mean(rho)),
        "effects_max_abs_diff": float(np.abs(cpu["effects"]["loss"] - gpu["effects"]["loss"]).max()),
        "lds_diff": gpu["lds"] - cpu["lds"],
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a fresh store folder (default: a temporary one)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    store = Path(args.store or tempfile.mkdtemp(prefix="gpu-check-"))
    runs = {
        "cpu": snapshot(store, tda_run(store, ["steps.effects.device=cpu", "steps.graddot.device=cpu"], []))
    }
    if torch.cuda.is_available():
        force = ["effects", "graddot"]
        runs["cuda"] = snapshot(store, tda_run(store, CUDA, force))
        runs["bf16"] = snapshot(
            store,
            tda_run(store, [*CUDA, "steps.effects.precision=bf16", "steps.graddot.precision=bf16"], force),
        )
    report = {
        name: {k: v for k, v in r.items() if not isinstance(v, pl.DataFrame)} for name, r in runs.items()
    }
    for name in set(runs) - {"cpu"}:
        report[name]["vs_cpu"] = agreement(runs["cpu"], runs[name])
    report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(json.dumps(report, indent=2))
    if report["device"] is None:
        print("gpu_check: no CUDA device here; ran the CPU side only", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
