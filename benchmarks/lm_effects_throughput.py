"""Subset fine-tunes per minute with 1 and 2 Ray workers, and per-example gradient throughput.

    python benchmarks/lm_effects_throughput.py [--subsets 32] [--out FILE.json]

The LM of `specs/lm_effects.yaml` (synthetic corpus of 1500, 1k BPE vocab, 4-layer GPT-2 of ~0.5M
parameters, 3 base epochs); `subset_effects` fine-tunes it on `--subsets` random subsets of 100 (2
epochs, batch 16) and measures 200 targets. It runs in fresh `tda run` processes with
`--num-cpus 1` and `--num-cpus 2` (`--force effects`, so only the fine-tunes are redone), and reads
`subsets_per_minute` from the step's metrics. Per-example gradients (all parameters, vmap over
`torch.func.grad`) are timed in-process on the same model with one thread.
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

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def spec(folder: Path, subsets: int) -> Path:
    data = yaml.safe_load((ROOT / "specs" / "lm_effects.yaml").read_text())
    data["run"] = {}
    data["steps"]["subsets"].update(n_subsets=subsets, eval_fraction=0.0)
    data["steps"] = {k: v for k, v in data["steps"].items() if k not in ("graddot", "lds")}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tda_run(path: Path, store: Path, cpus: int, *extra: str) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "run",
            str(path),
            "-q",
            "--store",
            str(store),
            "--num-cpus",
            str(cpus),
            *extra,
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    record = json.loads(sorted((store / "runs").glob("*.json"))[-1].read_text())
    key = record["steps"]["effects"]["key"]
    return json.loads((store / "objects" / key / "manifest.json").read_text())["metrics"]


def in_process_rate(store: Path, subsets: int, threads: int) -> float:
    """The same fine-tunes and target losses in one plain Python loop (no Ray, no engine), with
    `threads` torch threads: the prototype-style baseline the pipeline's overhead is measured against."""
    import polars as pl
    import torch

    from tda.effects.retrain import subset_losses
    from tda.models import load_model
    from tda.models.tokenizer import encode_examples, load_tokenizer

    torch.set_num_threads(threads)
    record = json.loads(sorted((store / "runs").glob("*.json"))[-1].read_text())
    objects = store / "objects"
    folder = objects / record["steps"]["base"]["key"] / "model"
    family, theta, meta = load_model(folder)
    family = type(family).from_config({**family.config(), "epochs": 2})
    tokenizer = load_tokenizer(folder / meta["tokenizer"])
    data = pl.read_parquet(objects / record["steps"]["data"]["key"] / "data" / "*.parquet").sort("example_id")
    train, target = data.filter(pl.col("split") == "train"), data.filter(pl.col("split") == "target")
    X, y = encode_examples(tokenizer, train["prompt"].to_list(), train["response"].to_list(), meta["max_len"])
    Xt, yt = encode_examples(
        tokenizer, target["prompt"].to_list(), target["response"].to_list(), meta["max_len"]
    )
    generator = torch.Generator().manual_seed(0)
    index = [torch.randperm(len(X), generator=generator)[:100] for _ in range(subsets)]
    t0 = time.perf_counter()
    subset_losses(family, theta, X, y, Xt, yt, 0.0, index)
    return 60 * subsets / (time.perf_counter() - t0)


def gradient_throughput(store: Path) -> float:
    import torch

    from tda.models import load_model
    from tda.models.tokenizer import encode_examples, load_tokenizer

    torch.set_num_threads(1)
    record = json.loads(sorted((store / "runs").glob("*.json"))[-1].read_text())
    folder = store / "objects" / record["steps"]["base"]["key"] / "model"
    family, theta, meta = load_model(folder)
    tokenizer = load_tokenizer(folder / meta["tokenizer"])
    prompts = [f"What is the sum of the numbers {i} and {i + 3}?" for i in range(128)]
    X, y = encode_examples(tokenizer, prompts, [str(2 * i + 3) for i in range(128)], meta["max_len"])
    family.per_example_grads(theta, X[:8], y[:8])  # warm-up (torch.func compiles its first call)
    t0 = time.perf_counter()
    family.per_example_grads(theta, X, y)
    return len(X) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_effects_throughput.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tda-lm-bench-") as tmp:
        folder = Path(tmp)
        path, store = spec(folder, args.subsets), folder / "store"
        tda_run(path, store, 2)  # builds corpus, tokenizer, base model and a first round of effects
        one = tda_run(path, store, 1, "--force", "effects")
        two = tda_run(path, store, 2, "--force", "effects")
        grads = gradient_throughput(store)
        baseline = in_process_rate(store, args.subsets, threads=2)
    result = {
        "subsets": args.subsets,
        "fine_tunes_per_minute_1_worker": one["subsets_per_minute"],
        "fine_tunes_per_minute_2_workers": two["subsets_per_minute"],
        "scaling_ratio": two["subsets_per_minute"] / one["subsets_per_minute"],
        "fine_tunes_per_minute_in_process_2_threads": baseline,
        "pipeline_time_over_in_process": baseline / two["subsets_per_minute"],
        "per_example_gradients_per_second": grads,
        "same_group_signal": two.get("same_group_signal"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(
        "measure", "value", title="LM subset fine-tunes (≈0.5M-parameter GPT-2, 100 examples, 2 epochs)"
    )
    table.add_row("fine-tunes / minute, 1 worker", f"{result['fine_tunes_per_minute_1_worker']:.1f}")
    table.add_row("fine-tunes / minute, 2 workers", f"{result['fine_tunes_per_minute_2_workers']:.1f}")
    table.add_row("scaling 2 vs 1 workers", f"{result['scaling_ratio']:.2f}×")
    table.add_row("fine-tunes / minute, plain loop, 2 torch threads", f"{baseline:.1f}")
    table.add_row(
        "pipeline time ÷ plain loop (goal ≤ 1.5)", f"{result['pipeline_time_over_in_process']:.2f}×"
    )
    table.add_row("per-example gradients / second (1 thread)", f"{grads:.1f}")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
