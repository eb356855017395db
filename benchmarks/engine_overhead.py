"""Engine overhead on a chain of trivial steps, and the wall time of a fully cached re-run.

    python benchmarks/engine_overhead.py [--steps 50] [--out benchmarks/results/engine_overhead.json]

A chain `s0 → s1 → … → s{n-1}`: `s0` reads a 10-row CSV, each next step is a `sql` step adding 1.
Every step has to wait for the one before, so nothing overlaps and the run's wall time is
Σ(step compute) + n × (engine overhead). Measured in fresh processes through the `tda` CLI:

1. cold run (new store): Ray start, then 50 steps executed; overhead per step =
   (execute wall − Σ step seconds) / n, from the run record's timings.
2. fully cached re-run: the whole `tda run` process, Python start to exit (nothing executes, so
   the runner never starts Ray).
3. a re-run with `--force s0`: the whole chain executes again in a new process, Ray start included.
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

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def chain_spec(n: int, folder: Path) -> Path:
    (folder / "seed.csv").write_text("x\n" + "\n".join(str(i) for i in range(10)) + "\n")
    lines = ["version: 1", "name: bench_chain", "steps:", "  s0:", "    kind: read", "    path: seed.csv"]
    for i in range(1, n):
        lines += [
            f"  s{i}:",
            "    kind: sql",
            f"    inputs: [s{i - 1}]",
            f"    query: SELECT x + 1 AS x FROM s{i - 1}",
        ]
    path = folder / "chain.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tda(*args: str) -> float:
    """Run the CLI in a fresh process; return its wall time."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def latest_record(store: Path) -> dict:
    runs = sorted((store / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def overhead(record: dict, n: int) -> float:
    compute = sum(s["seconds"] or 0.0 for s in record["steps"].values() if s["status"] == "done")
    return (record["timings"]["execute"] - compute) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_overhead.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tda-bench-") as tmp:
        folder = Path(tmp)
        spec, store = chain_spec(args.steps, folder), folder / "store"
        common = ["-q", "--store", str(store), "--num-cpus", "2"]
        cold_wall = tda("run", str(spec), *common)
        cold = latest_record(store)
        cached_wall = tda("run", str(spec), *common)
        cached = latest_record(store)
        forced_wall = tda("run", str(spec), *common, "--force", "s0")
        forced = latest_record(store)
    assert all(s["status"] == "cached" for s in cached["steps"].values())
    result = {
        "steps": args.steps,
        "cold_process_wall_s": cold_wall,
        "cold_ray_start_s": cold["timings"]["ray_start"],
        "cold_execute_s": cold["timings"]["execute"],
        "cold_overhead_per_step_ms": 1000 * overhead(cold, args.steps),
        "forced_process_wall_s": forced_wall,
        "forced_overhead_per_step_ms": 1000 * overhead(forced, args.steps),
        "cached_process_wall_s": cached_wall,
        "cached_ray_started": "ray_start" in cached["timings"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table("measure", "value", "goal", title=f"engine overhead, {args.steps}-step chain")
    table.add_row("overhead per step (cold run)", f"{result['cold_overhead_per_step_ms']:.1f} ms", "< 100 ms")
    table.add_row(
        "overhead per step (--force re-run)", f"{result['forced_overhead_per_step_ms']:.1f} ms", "< 100 ms"
    )
    table.add_row("fully cached re-run, whole process", f"{cached_wall:.2f} s", "< 10 s")
    table.add_row("cold run, whole process", f"{cold_wall:.2f} s", "")
    table.add_row("  of which Ray start", f"{result['cold_ray_start_s']:.2f} s", "")
    table.add_row("  of which executing 50 steps", f"{result['cold_execute_s']:.2f} s", "")
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
