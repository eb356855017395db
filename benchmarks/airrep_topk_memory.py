"""Peak memory and time of top-k AirRep scoring (requirement: peak RSS < 4 GiB).

    python benchmarks/airrep_topk_memory.py [--train 200000] [--targets 2000] [--dim 384]
                                            [--top-k 100] [--block-size 256]

`tda.airrep.score.score_frame` on random float32 embeddings (n_train × d training, n_target × d
targets), keeping the top k per target, in blocks of targets. The workload runs in a fresh Python
process, so `ru_maxrss` is the peak of that process alone: the interpreter and imports (torch, polars),
the embeddings (n_train × d × 4 bytes) and the scoring (≈ block_size × n_train floats + the output).
The worker also reports its peak before scoring (imports + embeddings) to separate the two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
LIMIT_GIB = 4.0


def max_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def worker(args: argparse.Namespace) -> dict:
    """Build the embeddings, score them, return the measurements (runs in the fresh process)."""
    import numpy as np
    import torch

    from tda.airrep.score import score_frame

    gen = torch.Generator().manual_seed(0)
    train = torch.randn(args.train, args.dim, generator=gen)
    targets = torch.randn(args.targets, args.dim, generator=gen)
    train_ids = np.arange(args.train, dtype=np.int64)
    target_ids = np.arange(args.targets, dtype=np.int64) + args.train
    before = max_rss_bytes()
    t0 = time.perf_counter()
    frame = score_frame(
        "airrep", target_ids, targets, train_ids, train, top_k=args.top_k, block_size=args.block_size
    )
    seconds = time.perf_counter() - t0
    return {
        "n_train": args.train,
        "n_target": args.targets,
        "dim": args.dim,
        "top_k": args.top_k,
        "block_size": args.block_size,
        "rows": frame.height,
        "seconds": seconds,
        "rows_per_second": frame.height / seconds,
        "pairs_scored_per_second": args.train * args.targets / seconds,
        "peak_rss_before_scoring_gib": before / 2**30,
        "peak_rss_gib": max_rss_bytes() / 2**30,
        "embeddings_gib": (args.train + args.targets) * args.dim * 4 / 2**30,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    with contextlib.suppress(ValueError, OSError, AttributeError):  # sysconf is POSIX only
        info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=200_000)
    ap.add_argument("--targets", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "airrep_topk_memory.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    command = [sys.executable, __file__, "--worker", *sys.argv[1:]]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    results["limit_gib"] = LIMIT_GIB
    results["passes"] = results["peak_rss_gib"] < LIMIT_GIB
    results["machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    table = Table(
        "measure",
        "value",
        title=(
            f"score_frame top-{results['top_k']}: {results['n_target']} targets × {results['n_train']} "
            f"training examples, d = {results['dim']}, block {results['block_size']}, "
            f"{results['torch_threads']} threads"
        ),
    )
    table.add_row("peak RSS (goal < 4 GiB)", f"{results['peak_rss_gib']:.2f} GiB")
    table.add_row("peak RSS before scoring", f"{results['peak_rss_before_scoring_gib']:.2f} GiB")
    table.add_row("embeddings", f"{results['embeddings_gib']:.2f} GiB")
    table.add_row("time", f"{results['seconds']:.2f} s")
    table.add_row("output rows / s", f"{results['rows_per_second']:,.0f}")
    table.add_row("pairs scored / s", f"{results['pairs_scored_per_second']:,.0f}")
    table.add_row("passes", str(results["passes"]))
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
