"""Blocked top-k scoring against plain fp32 matmul on this machine, both measured in the same run.

    python benchmarks/scoring_speed.py [--train 200000] [--targets 1000] [--top-k 100]
                                       [--dims 256,384,1024] [--threads 1,2] [--reps 3] [--out FILE.json]

For each torch thread count and feature dimension d:

- matmul: `torch.mm` of a (target_block, d) by (d, rows_per_block) float32 pair, the very shape the
  kernel multiplies, warm, `--mm-reps` repetitions per round; GFLOP/s = 2 · block · rows · d / median.
- scoring: `tda.influence.topk.stream_topk` of `--targets` float32 targets against `--train` float16
  feature rows (stored as the feature tables store them, in shards of `--shard` rows), top `--top-k`;
  GFLOP/s = 2 · m · n · d / median seconds of the whole call (cast, matmul, filter, merge).
- ratio = scoring / matmul GFLOP/s (goal ≥ 0.5). The two alternate in `--reps` rounds, so that load from
  other processes on a shared machine falls on both alike; the load average is recorded too.

For AirRep's d = 384 it also times, once per thread count, `score_frame` top-k over float32 embeddings
as the steps call it (block_size 256) and `score_frame_before`, the code it replaced (commit 5cc2df1:
a (256, n) score matrix per block of targets and `torch.topk` over it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tda.airrep.score import score_frame
from tda.influence.topk import BLOCK_BYTES, GROUP, TARGET_BLOCK, stream_topk

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.5


def score_frame_before(target_emb: torch.Tensor, train_emb: torch.Tensor, top_k: int, block_size: int = 256):
    """The top-k path of `tda.airrep.score.score_frame` before the kernel (ids and frame left out)."""
    train = train_emb.float()
    values, indices = [], []
    for start in range(0, len(target_emb), block_size):
        scores = target_emb[start : start + block_size].float() @ train.T  # (b, n)
        top = torch.topk(scores, top_k, dim=1)
        values.append(top.values.numpy().ravel())
        indices.append(top.indices.numpy().ravel())
        del scores
    return np.concatenate(values), np.concatenate(indices)


def block_shape(m: int, d: int) -> tuple[int, int]:
    """(target_block, rows_per_block) as `stream_topk` picks them by default."""
    block = min(TARGET_BLOCK, m)
    rows = BLOCK_BYTES // 4 // (block + d)
    return block, max(GROUP, rows // GROUP * GROUP)


def matmul_seconds(block: int, rows: int, d: int, reps: int) -> list[float]:
    """Seconds of `reps` warm (block, d) @ (d, rows) float32 products into a reused output."""
    a, b = torch.randn(block, d), torch.randn(rows, d)
    out = torch.empty(block, rows)
    torch.mm(a, b.T, out=out)
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=out)
        seconds.append(time.perf_counter() - t0)
    return seconds


def measure(args: argparse.Namespace, d: int, gen: torch.Generator) -> dict:
    """Matmul and scoring rates for one d at the current thread count."""
    m, n = args.targets, args.train
    feats = torch.randn(n, d, generator=gen).half()  # (n, d) as stored
    targets = torch.randn(m, d, generator=gen)  # (m, d)
    ids = np.arange(n, dtype=np.int64)
    shards = [(ids[lo : lo + args.shard], feats[lo : lo + args.shard]) for lo in range(0, n, args.shard)]
    block, rows = block_shape(m, d)
    mm, runs = [], []
    for _ in range(args.reps):
        mm += matmul_seconds(block, rows, d, args.mm_reps)
        t0 = time.perf_counter()
        top = stream_topk(targets, shards, args.top_k)
        runs.append((time.perf_counter() - t0, top.seconds))
    seconds, phases = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    mm_gflops = 2 * block * rows * d / statistics.median(mm) / 1e9
    gflops = 2 * m * n * d / seconds / 1e9
    return {
        "d": d,
        "block": [block, rows],
        "matmul_gflops": mm_gflops,
        "scoring_gflops": gflops,
        "ratio": gflops / mm_gflops,
        "scoring_seconds": seconds,
        "pairs_per_second": m * n / seconds,
        "phases_seconds": {**phases, "other": seconds - sum(phases.values())},
    }


def airrep_before_after(args: argparse.Namespace, gen: torch.Generator) -> dict:
    """`score_frame` top-k at d = 384 through the kernel, and the code it replaced, once each."""
    m, n = args.targets, args.train
    train, targets = torch.randn(n, 384, generator=gen), torch.randn(m, 384, generator=gen)
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    score_frame("airrep", ids[:m] + n, targets, ids, train, top_k=args.top_k, block_size=256)
    after = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_frame_before(targets, train, args.top_k)
    before = time.perf_counter() - t0
    flops = 2 * m * n * 384 / 1e9
    return {
        "before_seconds": before,
        "after_seconds": after,
        "before_gflops": flops / before,
        "after_gflops": flops / after,
        "before_pairs_per_second": m * n / before,
        "after_pairs_per_second": m * n / after,
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    info["torch"], info["cpu_capability"] = torch.__version__, torch.backends.cpu.get_cpu_capability()
    return info


def report(results: dict) -> None:
    table = Table(
        "threads",
        "d",
        "matmul GFLOP/s",
        "scoring GFLOP/s",
        "ratio",
        "pairs/s",
        "cast / matmul / filter / merge / other (s)",
        title=(
            f"top-{results['top_k']} of {results['train']:,} fp16 rows for {results['targets']:,} targets "
            f"(goal: ratio ≥ {GOAL})"
        ),
    )
    for run in results["runs"]:
        p = run["phases_seconds"]
        split = " / ".join(f"{p.get(k, 0.0):.2f}" for k in ("cast", "matmul", "filter", "merge", "other"))
        table.add_row(
            str(run["threads"]),
            str(run["d"]),
            f"{run['matmul_gflops']:.0f}",
            f"{run['scoring_gflops']:.0f}",
            f"{run['ratio']:.2f}",
            f"{run['pairs_per_second'] / 1e6:.0f}M",
            split,
        )
    Console().print(table)
    airrep = Table("threads", "before (s)", "after (s)", "before pairs/s", "after pairs/s", "speed-up")
    airrep.title = "AirRep score_frame top-k, d = 384, float32 embeddings: before and after the kernel"
    for threads, row in results["airrep"].items():
        airrep.add_row(
            threads,
            f"{row['before_seconds']:.2f}",
            f"{row['after_seconds']:.2f}",
            f"{row['before_pairs_per_second'] / 1e6:.1f}M",
            f"{row['after_pairs_per_second'] / 1e6:.1f}M",
            f"{row['before_seconds'] / row['after_seconds']:.1f}×",
        )
    Console().print(airrep)
    print(f"load average before/after: {results['load_before']} / {results['load_after']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=200_000)
    ap.add_argument("--targets", type=int, default=1_000)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--dims", default="256,384,1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds of matmul and scoring")
    ap.add_argument("--mm-reps", type=int, default=5, help="matmul repetitions per round")
    ap.add_argument("--shard", type=int, default=50_000, help="rows per feature chunk")
    ap.add_argument("--skip-before", action="store_true", help="skip the slow pre-kernel AirRep timing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scoring_speed.json"))
    args = ap.parse_args()
    results = {"train": args.train, "targets": args.targets, "top_k": args.top_k, "runs": [], "airrep": {}}
    results["load_before"] = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(0)
        for d in (int(x) for x in args.dims.split(",")):
            results["runs"].append({"threads": threads, **measure(args, d, gen)})
        if not args.skip_before:
            results["airrep"][str(threads)] = airrep_before_after(args, gen)
    results["seconds"] = time.perf_counter() - start
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"{results['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
