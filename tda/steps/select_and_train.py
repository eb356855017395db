"""`select_and_train`: choose training data by attribution, train on it, and measure held-out targets
against random choices of the same size (data selection, and pruning, for every method)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field, PositiveInt

from pipelines import StepContext, StepKind, StepRef
from tda.errors import DataError
from tda.steps.retrain_sets import Refits, RetrainSetsParams, paired_gain, score_tables


class SelectAndTrainParams(RetrainSetsParams):
    """Data selection by attribution, judged by retraining.

    The targets are split (with the seed) into *selection* targets, whose scores choose the data, and
    *evaluation* targets, whose loss judges it, so the choice never sees what it is judged on. Each
    training example's scores over the selection targets are aggregated (sum, mean or max); `top` trains
    on the `budget` highest, `prune` drops the `budget` lowest and trains on the rest. Each choice is
    trained with the experiments' recipe and compared with `n_random` random choices of the same size
    (the same draws for every method). Self-influence tables enter as methods whose aggregated score is
    minus the self-influence (prune drops the most self-influential). The table: per method, strategy
    and budget, the mean evaluation-target loss, the random choices' mean loss, and the gain (random
    loss − loss, higher is better) with a paired 95% bootstrap interval over evaluation targets.
    """

    kind: Literal["select_and_train"] = "select_and_train"
    scores: list[StepRef] = Field(
        default_factory=list, description="influence_scores steps (all their methods)."
    )
    self_influence: list[StepRef] = Field(
        default_factory=list, description="self_influence steps (prune the most self-influential)."
    )
    budgets: list[PositiveInt] = Field(min_length=1, description="Examples chosen (top) or dropped (prune).")
    strategy: Literal["top", "prune"] = Field(
        "top", description="top: train on the best; prune: drop the worst."
    )
    aggregate: Literal["sum", "mean", "max", "round_robin"] = Field(
        "mean",
        description="How an example's scores over the selection targets combine: sum, mean, max, or "
        "round_robin (every target's best first, then every target's second best, …: the choice covers "
        "what each target needs rather than what most of them share).",
    )
    eval_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of the targets kept out of the selection to judge it."
    )
    roles: StepRef | None = Field(
        None,
        description="A train_airrep step: judge on its held-out targets and select with the others (so "
        "no method, AirRep included, is judged on targets it was trained on); replaces eval_fraction.",
    )
    n_random: int = Field(3, gt=0, description="Random choices per budget (their mean loss is the baseline).")


def select_and_train(params: SelectAndTrainParams, ctx: StepContext) -> pl.DataFrame:
    if not params.scores and not params.self_influence:
        raise DataError("select_and_train: give `scores` or `self_influence` (the methods to select with)")
    refits = Refits.load(ctx, params)
    data = refits.data
    rng = np.random.default_rng([refits.seed, 11])
    is_eval = _eval_targets(ctx, params, data.target_ids, rng)
    ranked = _rankings(ctx, params, data.target_ids[~is_eval], data.train_ids)
    plan = _plan(params, ranked, data.train_ids, rng)
    losses = refits.losses(ctx, params, [refits.row_of(ids) for *_, ids in plan])[:, is_eval]
    per_target = pl.DataFrame(
        {
            "method": np.repeat([p[0] for p in plan], is_eval.sum()),
            "budget": np.repeat([p[1] for p in plan], is_eval.sum()).astype(np.int32),
            "draw": np.repeat([p[2] for p in plan], is_eval.sum()).astype(np.int32),
            "kept": np.repeat([len(p[3]) for p in plan], is_eval.sum()).astype(np.int32),
            "target_id": np.tile(data.target_ids[is_eval].astype(np.int64), len(plan)),
            "loss": losses.reshape(-1),
        }
    ).with_columns(strategy=pl.lit(params.strategy))
    per_target.write_parquet(ctx.output_dir / "per_target.parquet")
    table = _summary(per_target, params.strategy)
    _figure(table, ctx)
    for row in table.filter(pl.col("method") != "random").iter_rows(named=True):
        ctx.log_metric(f"gain.{row['method']}.{params.strategy}{row['budget']}", row["gain"])
    ctx.log_metrics(
        {"fits": len(plan), "selection_targets": int((~is_eval).sum()), "eval_targets": int(is_eval.sum())}
    )
    return table


def _eval_targets(
    ctx: StepContext, params: SelectAndTrainParams, target_ids: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Which targets judge the selection (the others choose it)."""
    if params.roles is None:
        n_eval = max(1, round(params.eval_fraction * len(target_ids)))
        return np.isin(np.arange(len(target_ids)), rng.permutation(len(target_ids))[:n_eval])
    roles = ctx.table(params.roles).select("target_id", "role").collect()
    held = roles.filter(pl.col("role") == "heldout")["target_id"].to_numpy()
    is_eval = np.isin(target_ids, held)
    if not is_eval.any() or is_eval.all():
        raise DataError(
            f"select_and_train: roles {params.roles!r} leave {int(is_eval.sum())} held-out targets of "
            f"{len(target_ids)}; give the train_airrep step of this split's targets"
        )
    return is_eval


def _rankings(
    ctx: StepContext, params: SelectAndTrainParams, targets: np.ndarray, train_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Per method, the training example ids from best to worst by the aggregated score."""
    frames = []
    if params.scores:
        frames.append(_aggregate(score_tables(ctx, params.scores, targets), params.aggregate))
    for step in params.self_influence:
        table = ctx.table(step).select("method", "example_id", (-pl.col("score")).alias("value"))
        frames.append(table.with_columns(pl.col("method") + "-self-influence"))
    values = pl.concat(frames).filter(pl.col("example_id").is_in(train_ids.tolist())).collect()
    out = {}
    for (method,), group in values.group_by("method", maintain_order=True):
        if group.height < len(train_ids):
            raise DataError(
                f"select_and_train: method {method!r} scores {group.height} of the {len(train_ids)} training "
                "examples; score all pairs (no top_k) so every example can be ranked"
            )
        out[method] = group.sort("value", "example_id", descending=[True, False])["example_id"].to_numpy()
    return dict(sorted(out.items()))


def _aggregate(scores: pl.LazyFrame, how: str) -> pl.LazyFrame:
    """method, example_id, value: higher is chosen first."""
    if how != "round_robin":
        value = {"sum": pl.col("score").sum(), "mean": pl.col("score").mean(), "max": pl.col("score").max()}
        return scores.group_by("method", "example_id").agg(value[how].alias("value"))
    rank = pl.col("score").rank("ordinal", descending=True).over("method", "target_id")
    best = scores.with_columns(rank=rank).group_by("method", "example_id")
    # its best rank for any target first, then its highest score, as one sortable value
    ranked = best.agg(pl.col("rank").min(), pl.col("score").max())
    order = pl.struct(-pl.col("rank").cast(pl.Int64), pl.col("score")).rank("ordinal").over("method")
    return ranked.select("method", "example_id", order.cast(pl.Float64).alias("value"))


def _plan(
    params: SelectAndTrainParams,
    ranked: dict[str, np.ndarray],
    train_ids: np.ndarray,
    rng: np.random.Generator,
) -> list[tuple[str, int, int, np.ndarray]]:
    """(method, budget, draw, example ids trained on) for every fit; method "random" for the draws."""
    n = len(train_ids)
    plan = []
    for budget in params.budgets:
        if budget >= n:
            raise DataError(f"select_and_train: budget {budget} is not below the {n} training examples")
        keep = budget if params.strategy == "top" else n - budget
        plan.extend((method, budget, 0, order[:keep]) for method, order in ranked.items())
        plan.extend(
            ("random", budget, draw, rng.permutation(train_ids)[:keep]) for draw in range(params.n_random)
        )
    return plan


def _summary(per_target: pl.DataFrame, strategy: str) -> pl.DataFrame:
    """Per method and budget: mean loss, the random draws' mean loss, and the paired gain [95%]."""
    per = per_target.group_by("method", "budget", "target_id").agg(
        pl.col("loss").mean(), pl.col("kept").first()
    )
    random = per.filter(pl.col("method") == "random").select(
        "budget", "target_id", pl.col("loss").alias("random_loss")
    )
    rows = []
    for (method, budget), group in per.join(random, on=["budget", "target_id"]).group_by(
        "method", "budget", maintain_order=True
    ):
        gain, low, high = paired_gain(group["random_loss"].to_numpy(), group["loss"].to_numpy())
        rows.append(
            {
                "method": method,
                "strategy": strategy,
                "budget": budget,
                "kept": int(group["kept"][0]),
                "targets": group.height,
                "loss": float(group["loss"].mean()),
                "random_loss": float(group["random_loss"].mean()),
                "gain": None if method == "random" else gain,
                "gain_low": None if method == "random" else low,
                "gain_high": None if method == "random" else high,
            }
        )
    return pl.DataFrame(rows, schema_overrides={"budget": pl.Int32}).sort(
        "budget", "gain", descending=[False, True], nulls_last=True
    )


def _figure(table: pl.DataFrame, ctx: StepContext) -> None:
    """Gain over random against the budget per method, with intervals (selection.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method,), group in table.filter(pl.col("method") != "random").group_by(
        "method", maintain_order=True
    ):
        g = group.sort("budget")
        ax.errorbar(
            g["budget"].to_numpy(),
            g["gain"].to_numpy(),
            yerr=[g["gain"] - g["gain_low"], g["gain_high"] - g["gain"]],
            marker="o",
            capsize=3,
            label=method,
        )
    strategy = table["strategy"][0]
    xlabel = "examples trained on" if strategy == "top" else "examples dropped"
    ax.set(xlabel=xlabel, ylabel="loss gain over random", title=f"data selection ({strategy})")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.artifacts_dir / "selection.png", dpi=120)
    plt.close(fig)


STEP = StepKind("select_and_train", SelectAndTrainParams, select_and_train, version="1")
