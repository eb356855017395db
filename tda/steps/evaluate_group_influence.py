"""`evaluate_group_influence`: how well predicted group effects match the retrained truth."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef


class EvaluateGroupInfluenceParams(StepParams):
    """Pearson, Spearman, slope (actual on predicted) per method, strategy and group size; scatter plots."""

    kind: Literal["evaluate_group_influence"] = "evaluate_group_influence"
    predicted: StepRef = Field(description="A group_influence step.")
    truth: StepRef = Field(description="A retrain_without_groups step over the same groups.")
    groups: StepRef = Field(description="The make_groups step(s)' table (strategy, fraction per group).")


def evaluate_group_influence(params: EvaluateGroupInfluenceParams, ctx: StepContext) -> pl.DataFrame:
    from tda.evaluation.groups import group_fidelity

    predicted = ctx.table(params.predicted).collect()
    truth = ctx.table(params.truth).collect()
    meta = ctx.table(params.groups).select("group_id", "strategy", "fraction").unique().collect()
    table = group_fidelity(predicted, truth, meta)
    for row in table.iter_rows(named=True):
        name = f"{row['method']}.{row['strategy']}.p{row['fraction']:g}"
        ctx.log_metrics({f"pearson.{name}": row["pearson"], f"slope.{name}": row["slope"]})
    _scatter(predicted, truth, meta, ctx.artifacts_dir)
    return table


def _scatter(predicted: pl.DataFrame, truth: pl.DataFrame, meta: pl.DataFrame, folder: Path) -> None:
    """One PNG per method: predicted vs actual change of target loss, a panel per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joined = predicted.join(truth, on=["target_id", "group_id"]).join(meta, on="group_id")
    strategies = sorted(joined["strategy"].unique().to_list())
    for method in sorted(joined["method"].unique().to_list()):
        fig, axes = plt.subplots(1, len(strategies), figsize=(5 * len(strategies), 4.5), squeeze=False)
        for ax, strategy in zip(axes[0], strategies, strict=False):
            cell = joined.filter((pl.col("method") == method) & (pl.col("strategy") == strategy))
            points = ax.scatter(
                cell["score"], cell["actual"], c=cell["fraction"], s=6, cmap="viridis", alpha=0.6
            )
            lo = min(cell["score"].min(), cell["actual"].min())
            hi = max(cell["score"].max(), cell["actual"].max())
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
            ax.set(
                title=f"{method} · {strategy}", xlabel="predicted Δ loss", ylabel="actual Δ loss (retrained)"
            )
            fig.colorbar(points, ax=ax, label="group fraction p")
        fig.tight_layout()
        fig.savefig(folder / f"scatter-{method}.png", dpi=110)
        plt.close(fig)


STEP = StepKind(
    "evaluate_group_influence", EvaluateGroupInfluenceParams, evaluate_group_influence, version="1"
)
