"""Start-up time of the CLI, as whole processes: what a user waits for before anything happens.

    .venv/bin/python benchmarks/startup.py [--repeat 5] [--fresh-repeat 3] [--src DIR] [--label NAME]

Each measure is the wall time of a subprocess (median of N), in a store of its own:

- validate:        `tda validate specs/quickstart.yaml` (19 steps; every step kind's Params model)
- query:           `tda query "SELECT * FROM profile"` on a finished engine_demo run
- cached run:      `tda run specs/engine_demo.yaml` again, every step cached
- first step:      launch of a fresh `tda run specs/engine_demo.yaml` → its first step submitted
                   (the step's `started` in the run record), with an embedded Ray, and attached to a
                   warm one (`tda ray up`); the run's total wall time and its `ray_start` beside it

`--src DIR` runs the engine from another copy of the sources (e.g. `git archive HEAD | tar -x -C DIR`
for the numbers before a change): PYTHONPATH=DIR, `python -m pipelines.cli`. Results go to
benchmarks/results/startup.json (under `--label`, default "current"), merged with earlier labels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "startup.json"


class Bench:
    def __init__(self, src: Path, scratch: Path) -> None:
        self.src, self.scratch = src, scratch
        self.env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TDA_RAY_DIR": str(scratch / "warm-ray"),  # no warm Ray unless `ray up` below starts one
        }
        self.env.pop("PIPELINES_PLUGINS", None)
        self.stores = 0
        self.cpu = self.last_wall = 0.0

    def tda(self, *args: str) -> tuple[float, float]:
        """(launch time as time.time(), wall seconds) of one `tda` process; raises if it fails. Its CPU
        seconds (user + system, with the children it waited for) are kept in `self.cpu`."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start, t0 = time.time(), time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=self.src,  # `-m` puts it first on sys.path: these sources, not the installed ones
            env=self.env,
            capture_output=True,
            text=True,
        )
        wall = self.last_wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        if done.returncode != 0:
            raise RuntimeError(f"tda {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return start, wall

    def new_store(self) -> Path:
        self.stores += 1
        return self.scratch / f"store-{self.stores}"

    def mlflow_recorded(self, store: Path, timeout: float = 300.0) -> float:
        """Seconds from the launch of a cached run to its MLflow run being recorded by the process it
        left behind (the record's `mlflow.deferred` gone); 0 where it was recorded in the run itself."""
        start = self.tda("run", "specs/engine_demo.yaml", "--store", str(store), "-q")[0]
        path = max((store / "runs").glob("*.json"))
        while "deferred" in json.loads(path.read_text()).get("mlflow", {}):
            if time.time() - start > timeout:
                return float("nan")
            time.sleep(0.1)
        mtime = path.stat().st_mtime
        return max(mtime - start, 0.0) if mtime > start + self.last_wall else 0.0

    def fresh_run(self) -> dict[str, float]:
        """A run of engine_demo into an empty store: total wall, launch → first step, ray_start."""
        store = self.new_store()
        start, wall = self.tda("run", "specs/engine_demo.yaml", "--store", str(store), "-q")
        record = json.loads(max((store / "runs").glob("*.json")).read_text())
        firsts = [datetime.fromisoformat(s["started"]).timestamp() for s in record["steps"].values()]
        return {
            "wall": wall,
            "first_step": min(firsts) - start,
            "ray_start": record.get("timings", {}).get("ray_start", float("nan")),
        }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def measure(bench: Bench, repeat: int, fresh_repeat: int) -> dict[str, dict[str, float | list[float]]]:
    results: dict[str, dict[str, float | list[float]]] = {}

    def keep(name: str, samples: list[float]) -> None:
        results[name] = {"median_s": median(samples), "samples_s": [round(s, 2) for s in samples]}
        print(f"  {name}: {median(samples):.2f} s  {[round(s, 2) for s in samples]}", flush=True)

    def quick(name: str, *args: str) -> None:
        """Wall and CPU seconds of a command that starts no Ray (CPU is steadier on a busy machine)."""
        walls, cpus = [], []
        for _ in range(repeat):
            walls.append(bench.tda(*args)[1])
            cpus.append(bench.cpu)
        keep(name, walls)
        keep(f"{name} (CPU s)", cpus)

    quick("validate", "validate", "specs/quickstart.yaml")
    embedded = [bench.fresh_run() for _ in range(fresh_repeat)]
    keep("fresh run, embedded Ray: first step", [r["first_step"] for r in embedded])
    keep("fresh run, embedded Ray: ray_start", [r["ray_start"] for r in embedded])
    keep("fresh run, embedded Ray: total", [r["wall"] for r in embedded])
    done = bench.scratch / f"store-{bench.stores}"
    quick("cached run", "run", "specs/engine_demo.yaml", "--store", str(done), "-q")
    keep("cached run: its MLflow run recorded (after launch)", [bench.mlflow_recorded(done)])
    quick("query", "query", "SELECT * FROM profile", "--store", str(done))
    if not (bench.src / "pipelines" / "local_ray.py").exists():
        return results  # sources without a warm Ray
    try:
        keep("tda ray up", [bench.tda("ray", "up")[1]])
        attached = [bench.fresh_run() for _ in range(fresh_repeat)]
        keep("fresh run, warm Ray: first step", [r["first_step"] for r in attached])
        keep("fresh run, warm Ray: ray_start", [r["ray_start"] for r in attached])
        keep("fresh run, warm Ray: total", [r["wall"] for r in attached])
    finally:
        bench.tda("ray", "down")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs of each quick command")
    ap.add_argument("--fresh-repeat", type=int, default=3, help="fresh runs (each starts Ray or attaches)")
    ap.add_argument("--src", type=Path, default=ROOT, help="the sources to measure (default: this checkout)")
    ap.add_argument("--label", default="current", help="the key of these results in startup.json")
    args = ap.parse_args()
    print(
        f"{args.label}: sources {args.src}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="tda-startup-") as scratch:
        results = measure(Bench(args.src.resolve(), Path(scratch)), args.repeat, args.fresh_repeat)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved[args.label] = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 1),
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    labels = list(saved)
    names = list(dict.fromkeys(n for label in labels for n in saved[label]["results"]))
    print(f"\n{'median wall seconds':42}" + "".join(f"{label:>12}" for label in labels))
    for name in names:
        cells = [saved[label]["results"].get(name, {}).get("median_s") for label in labels]
        print(f"{name:42}" + "".join(f"{'-' if c is None else f'{c:.2f}':>12}" for c in cells))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
