"""Cost of second-order group influence relative to first order (goal: ≤ 2.5×).

    python benchmarks/group_influence_cost.py [--groups 200] [--targets 100] [--repeats 5]

Logistic regression on digits (1000 training rows, 64 features + bias, 10 classes: d = 650,
l2 = 1e-2), groups of 1–30% of the training rows (random and nearest-neighbour). Times
`group_influence(orders=(1,))` against `orders=(1, 2)` (no Newton reference) end to end: per-example
gradients, the Hessian factorisation, the inverse-HVPs and the group HVPs. Median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tda.data.split import split_table
from tda.data.tabular import load_tabular, tabular_tensors
from tda.influence import SolverOptions, group_influence
from tda.models import LogisticRegression
from tda.subsets.groups import make_groups

ROOT = Path(__file__).resolve().parents[1]


def setup(n_groups: int, n_targets: int):  # noqa: ANN201
    table = split_table(
        load_tabular("sklearn:digits"), n_targets=n_targets, n_train=1000, stratify_by="label"
    )
    train = table.filter(table["split"] == "train").sort("example_id")
    target = table.filter(table["split"] == "target").sort("example_id")
    ids, X, y = tabular_tensors(train)
    _, Xt, yt = tabular_tensors(target)
    family = LogisticRegression(X.shape[1], 10)
    theta = family.fit(X, y, l2_sum=1000 * 1e-2).theta
    per = max(1, n_groups // 10)
    frames = [
        make_groups(ids.numpy(), X.numpy(), s, [0.01, 0.05, 0.1, 0.2, 0.3], per, seed=1)
        for s in ("random", "neighbors")
    ]
    position = {int(e): i for i, e in enumerate(ids)}
    groups = [
        torch.tensor([position[int(e)] for e in g["example_id"]])
        for f in frames
        for _, g in f.group_by("group_id", maintain_order=True)
    ]
    return family, theta, X, y, Xt, yt, groups


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "group_influence_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    family, theta, X, y, Xt, yt, groups = setup(args.groups, args.targets)
    results = {"groups": len(groups), "targets": len(yt), "d": int(theta.numel()), "n_train": len(y)}
    for solver in ("exact", "cg"):

        def run(orders: tuple[int, ...], solver: str = solver) -> None:
            group_influence(
                family,
                theta,
                X,
                y,
                Xt,
                yt,
                groups,
                l2=1e-2,
                orders=orders,
                newton=False,
                options=SolverOptions(solver),
            )

        first, second = timed(lambda: run((1,)), args.repeats), timed(lambda: run((1, 2)), args.repeats)
        results[solver] = {"first_s": first, "first_and_second_s": second, "ratio": second / first}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    table = Table(
        "solver",
        "first order",
        "first + second order",
        "ratio (goal ≤ 2.5)",
        title=f"group influence, {len(groups)} groups × {len(yt)} targets, d = {theta.numel()}, 1 thread",
    )
    for solver in ("exact", "cg"):
        r = results[solver]
        table.add_row(
            solver, f"{r['first_s']:.3f} s", f"{r['first_and_second_s']:.3f} s", f"{r['ratio']:.2f}×"
        )
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
