"""`removal_check`: remove each target's top-k proponents, retrain, and measure the rise of its loss
against removing k random training examples (the counterfactual test of an attribution)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field, PositiveInt

from pipelines import StepContext, StepKind, StepRef
from tda.errors import DataError
from tda.steps.retrain_sets import Refits, RetrainSetsParams, paired_gain, score_tables


class RemovalCheckParams(RetrainSetsParams):
    """For each of `n_targets` targets and each k: retrain without the target's k highest-scored training
    examples of each method, and without k random ones (`n_random` draws), and measure the rise of the
    target's loss over a fit on every row. The table has one row per method and k: the mean rise with
    its 95% bootstrap interval over targets, and the paired gain over random removal. The per-target
    fits are in `per_target.parquet` beside it and the curves in the step's MLflow artifacts."""

    kind: Literal["removal_check"] = "removal_check"
    scores: list[StepRef] = Field(min_length=1, description="influence_scores steps (every method in them).")
    ks: list[PositiveInt] = Field(
        [10], min_length=1, description="How many examples to remove (each a point)."
    )
    n_targets: int = Field(20, gt=0, description="Targets checked (drawn with the seed; all if fewer).")
    n_random: int = Field(
        3, gt=0, description="Random removals per target and k (their mean is the baseline)."
    )


def removal_check(params: RemovalCheckParams, ctx: StepContext) -> pl.DataFrame:
    refits = Refits.load(ctx, params)
    data = refits.data
    rng = np.random.default_rng([refits.seed, 7])
    chosen = rng.choice(len(data.target_ids), min(params.n_targets, len(data.target_ids)), replace=False)
    targets = np.sort(data.target_ids[chosen])
    top = _top_examples(ctx, params, targets, max(params.ks), data.train_ids)
    plan = _plan(params, targets, top, data.train_ids, rng)
    everything = np.arange(data.n)
    sets = [everything] + [np.setdiff1d(everything, refits.row_of(removed)) for *_, removed in plan]
    losses = refits.losses(ctx, params, sets)
    column = {int(t): j for j, t in enumerate(data.target_ids)}
    full = losses[0]
    per_target = pl.DataFrame(
        {
            "method": [p[0] for p in plan],
            "k": [p[1] for p in plan],
            "target_id": [p[2] for p in plan],
            "draw": [p[3] for p in plan],
            "loss": [losses[i + 1, column[p[2]]] for i, p in enumerate(plan)],
            "full_loss": [full[column[p[2]]] for p in plan],
        },
        schema_overrides={"k": pl.Int32, "target_id": pl.Int64, "draw": pl.Int32},
    ).with_columns(rise=pl.col("loss") - pl.col("full_loss"))
    per_target.write_parquet(ctx.output_dir / "per_target.parquet")
    table = _summary(per_target)
    _figure(table, ctx)
    for row in table.iter_rows(named=True):
        ctx.log_metric(f"rise.{row['method']}.k{row['k']}", row["rise"])
    ctx.log_metrics({"fits": len(sets), "targets": len(targets)})
    return table


def _top_examples(
    ctx: StepContext, params: RemovalCheckParams, targets: np.ndarray, k: int, train_ids: np.ndarray
) -> pl.DataFrame:
    """method, target_id, example_ids (the k highest-scored, best first) per method and target."""
    table = score_tables(ctx, params.scores, targets).filter(pl.col("example_id").is_in(train_ids.tolist()))
    top = (
        table.sort("score", descending=True, nulls_last=True)
        .group_by("method", "target_id", maintain_order=True)
        .agg(pl.col("example_id").head(k))
        .sort("method", "target_id")
        .collect()
    )
    short = top.filter(pl.col("example_id").list.len() < k)
    if short.height:
        row = short.row(0, named=True)
        raise DataError(
            f"removal_check: method {row['method']!r} scores only {len(row['example_id'])} training "
            f"examples for target {row['target_id']}, fewer than k = {k}; score all pairs (no top_k) "
            "or lower ks"
        )
    missing = set(targets.tolist()) - set(top["target_id"].to_list())
    if missing:
        raise DataError(
            f"removal_check: the score tables have no scores for target {min(missing)}; score the "
            "same split's targets"
        )
    return top


def _plan(
    params: RemovalCheckParams,
    targets: np.ndarray,
    top: pl.DataFrame,
    train_ids: np.ndarray,
    rng: np.random.Generator,
) -> list[tuple[str, int, int, int, np.ndarray]]:
    """(method, k, target_id, draw, removed example ids) for every fit; method "random" for draws."""
    plan = []
    for method, target, ranked in top.iter_rows():
        for k in params.ks:
            plan.append((method, k, int(target), 0, np.asarray(ranked[:k], dtype=np.int64)))
    for target in targets:
        for draw in range(params.n_random):
            order = rng.permutation(train_ids)
            plan.extend(("random", k, int(target), draw, order[:k]) for k in params.ks)
    return plan


def _summary(per_target: pl.DataFrame) -> pl.DataFrame:
    """Per method and k: mean rise [95%], and its paired gain over random removal [95%]."""
    random = (
        per_target.filter(pl.col("method") == "random")
        .group_by("k", "target_id")
        .agg(pl.col("rise").mean().alias("random_rise"))
    )
    rows = []
    for (method, k), group in per_target.group_by("method", "k", maintain_order=True):
        joined = (
            group.group_by("target_id")
            .agg(pl.col("rise").mean())
            .join(random.filter(pl.col("k") == k), on="target_id")
        )
        rise, low, high = paired_gain(joined["rise"].to_numpy(), np.zeros(joined.height))
        gain, gain_low, gain_high = paired_gain(joined["rise"].to_numpy(), joined["random_rise"].to_numpy())
        rows.append(
            {
                "method": method,
                "k": k,
                "targets": joined.height,
                "rise": rise,
                "rise_low": low,
                "rise_high": high,
                "random_rise": float(joined["random_rise"].mean()),
                "gain": None if method == "random" else gain,
                "gain_low": None if method == "random" else gain_low,
                "gain_high": None if method == "random" else gain_high,
            }
        )
    return pl.DataFrame(rows, schema_overrides={"k": pl.Int32}).sort("k", "rise", descending=[False, True])


def _figure(table: pl.DataFrame, ctx: StepContext) -> None:
    """Loss rise against k per method, with intervals (removal.png in the step's artifacts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in table.sort("k").group_by("method", maintain_order=True):
        g = group.sort("k")
        ax.errorbar(
            g["k"].to_numpy(),
            g["rise"].to_numpy(),
            yerr=[g["rise"] - g["rise_low"], g["rise_high"] - g["rise"]],
            marker="o",
            capsize=3,
            label=method[0],
            linestyle="--" if method[0] == "random" else "-",
        )
    ax.set(xlabel="examples removed (k)", ylabel="rise of the target's loss", title="removal check")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.artifacts_dir / "removal.png", dpi=120)
    plt.close(fig)


STEP = StepKind("removal_check", RemovalCheckParams, removal_check, version="1")
