"""Gradient features: throughput against full per-example gradients, and the pipeline at scale.

    python benchmarks/gradient_features.py throughput --store DIR        # a store that ran the quickstart
    python benchmarks/gradient_features.py scale [--rows 200000] [--targets 1000] [--workers 1 2]

throughput: the quickstart's scored GPT-2 (533k parameters) on 512 of its training rows, in this
process: full per-example gradients (torch.func vmap(grad), what GradDot used) against LoGra features
(16×16 and 8×8 per linear layer, one batched backward per 32 rows), examples per second with 1 and 2
threads, and the rows per second of a plain batched forward + backward (the floor of any method that
needs one backward per row); the same for a wider GPT-2 (4 × 256, 3.4M parameters).

scale: `specs/benchmark_gradients.yaml` (200,000 synthetic training rows, 1,000 targets, LoGra 8×8 →
K = 512 in float16, EK-FAC, top-100) in a fresh store per worker count (`--num-cpus 1`, then 2: the
featurising and scoring tasks run one or two at a time); prints wall seconds per step, examples/s of
the featurisation, and the peak memory of every process of the run (the driver, Ray's own processes and
its workers by task name; sampled every 0.2 s from /proc: RSS less the shared pages of Ray's object
store, which every process mapping them counts again, reported once apart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def throughput(store: str, rows: int = 512) -> dict:
    """Examples per second: full per-example gradients (vmap(grad), chunks of 16) vs LoGra features
    (one batched backward per 32 rows), on the same rows and threads; for the quickstart's scored model
    and for a wider GPT-2 of the same vocabulary (random weights: speed does not depend on them)."""
    import torch

    import pipelines
    from tda.models import load_model
    from tda.models.causal_lm import CausalLM
    from tda.steps.common import text_encoder

    run = pipelines.open_run(store)
    family, theta, meta = load_model(run.output("model").model_dir)
    data = run.table("data").collect()
    data = data.filter(data["split"] == "train").head(rows)
    X, y = text_encoder(meta["tokenizer"], meta["max_len"])(
        data["prompt"].to_list(), data["response"].to_list()
    )
    wide = CausalLM(
        vocab_size=family.vocab_size,
        pad_id=family.pad_id,
        eos_id=family.eos_id,
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_positions=64,
    )
    out = {}
    for name, model in (("quickstart", family), ("wide", wide)):
        out[name] = {"parameters": model.n_params}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[name][f"{threads}_threads"] = _speeds(model, model.init_params(0), X, y)
    return out


def _speeds(family: object, theta: object, X: object, y: object) -> dict:
    from tda.influence.features import Projection, featurize

    full_rows = 256
    family.per_example_grads(theta, X[:16], y[:16])  # warm, as LoGra is below
    t0 = time.perf_counter()
    family.per_example_grads(theta, X[:full_rows], y[:full_rows])
    speeds = {"full_gradients_per_s": full_rows / (time.perf_counter() - t0)}
    speeds["forward_backward_per_s"] = _forward_backward(family, X, y)
    for k in (8, 16):
        projection = Projection("logra", k_in=k, k_out=k)
        featurize(family, theta, X[:32], y[:32], projection, 32)  # warm
        t0 = time.perf_counter()
        featurize(family, theta, X, y, projection, 32)
        speeds[f"logra{k}_per_s"] = len(X) / (time.perf_counter() - t0)
        speeds[f"logra{k}_speedup"] = speeds[f"logra{k}_per_s"] / speeds["full_gradients_per_s"]
    return speeds


def _forward_backward(family: object, X: object, y: object) -> float:
    """Rows per second of a plain batched forward and backward (32 rows, activations only, no hooks):
    the floor of any method that needs one backward per row, LoGra included."""
    import torch

    from tda.influence.features import batches
    from tda.models.causal_lm import trim_padding

    model = family.model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        t0 = time.perf_counter()
        for s in batches(len(X), 32):
            with torch.enable_grad():
                family.module_losses(*trim_padding(*family.check_examples(X[s], y[s]))).sum().backward()
        return len(X) / (time.perf_counter() - t0)
    finally:
        hook.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)


class PeakRss(threading.Thread):
    """Samples the memory of this process's descendants (the driver and Ray's processes) every 0.2 s.

    Per process, RSS without shared memory (RssAnon + RssFile: its own heap and mapped files) and the
    shared part (RssShmem: pages of Ray's object store it touched, counted in every process that maps
    them), keyed by the process title (Ray names its workers `ray::<task>`)."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.stop = root_pid, threading.Event()
        self.peak: dict[str, int] = {}  # title -> peak RssAnon + RssFile
        self.peak_shared, self.peak_total = 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for pid in _descendants(self.root_pid):
                own, shared = _rss(pid)
                total += own
                name = "driver" if pid == self.root_pid else _title(pid)
                self.peak[name] = max(self.peak.get(name, 0), own)
                self.peak_shared = max(self.peak_shared, shared)
            self.peak_total = max(self.peak_total, total)
            time.sleep(0.2)


def _title(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").split()
    except OSError:
        return "?"
    title = words[0] if words else "?"
    return title if title.startswith("ray::") else Path(title).name


def _descendants(pid: int) -> list[int]:
    children = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss(pid: int) -> tuple[int, int]:
    """(RssAnon + RssFile, RssShmem) of a process in bytes; (0, 0) once it is gone."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return 0, 0
    return fields.get("RssAnon", 0) + fields.get("RssFile", 0), fields.get("RssShmem", 0)


def scale(rows: int, targets: int, workers: list[int]) -> dict:
    import pipelines

    out = {}
    for n in workers:
        store = tempfile.mkdtemp(prefix=f"gradients-scale-{n}-")
        cmd = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "specs" / "benchmark_gradients.yaml")]
        cmd += ["--store", store, "-q", "--num-cpus", str(n)]
        cmd += [
            "--set",
            f"steps.corpus.n_examples={rows + targets}",
            "--set",
            f"steps.data.n_targets={targets}",
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sampler = PeakRss(proc.pid)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.stop.set()
        if proc.returncode != 0:
            sys.exit(f"scale run failed:\n{stderr[-3000:]}")
        run = pipelines.open_run(store)
        steps = {name: info["seconds"] for name, info in run.steps.items()}
        feats = run.output("features").manifest["metrics"]
        out[f"{n}_workers"] = {
            "wall_seconds": time.perf_counter() - t0,
            "step_seconds": steps,
            "featurise_examples_per_s": feats["examples_per_second"],
            "score_gflops": run.output("ekfac").manifest["metrics"].get("gflops"),
            # per process title, the peak of its own memory (RSS less the shared object store)
            "peak_rss_mib": {
                k: round(v / 2**20) for k, v in sorted(sampler.peak.items(), key=lambda kv: -kv[1])
            },
            "peak_rss_largest_process_mib": round(max(sampler.peak.values()) / 2**20),
            "peak_rss_total_mib": round(sampler.peak_total / 2**20),  # all processes at once, Ray's included
            "peak_shared_object_store_mib": round(sampler.peak_shared / 2**20),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--store", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--rows", type=int, default=200_000)
    s.add_argument("--targets", type=int, default=1_000)
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    result = (
        throughput(args.store) if args.what == "throughput" else scale(args.rows, args.targets, args.workers)
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
