"""`evaluate_lds`: the Linear Datamodeling Score of one or more score steps on held-out subsets."""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef

Aggregation = Literal["sum", "mean", "attention"]


class EvaluateLdsParams(StepParams):
    """LDS per method and target: Spearman over eval subsets of Σ_{z∈S} score(t, z) vs −loss_S(t)."""

    kind: Literal["evaluate_lds"] = "evaluate_lds"
    scores: list[StepRef] = Field(min_length=1, description="Steps whose tables are scores.")
    subsets: StepRef = Field(description="A sample_subsets step (its `eval` subsets are used).")
    effects: StepRef = Field(description="A subset_effects step over the same subsets.")
    aggregation: Aggregation | list[Aggregation] = Field(
        "sum",
        description="How a subset's score is formed from its members' (or a list: one LDS per aggregation): "
        "sum, mean, or attention = Σ softmax(|s|)·s, AirRep's pooling (needs all pairs scored).",
    )
    purpose: Literal["eval", "fit"] = Field(
        "eval", description="Which subsets to evaluate on (eval = held out)."
    )

    def check_references(self, steps: Any) -> list[tuple[tuple[str | int, ...], str]]:
        from tda.steps.common import check_effects_ref

        return check_effects_ref(steps, self.effects, self.subsets)


def evaluate_lds(params: EvaluateLdsParams, ctx: StepContext) -> pl.DataFrame:
    from tda.evaluation.lds import lds

    subsets = ctx.table(params.subsets).collect()
    effects = ctx.table(params.effects).collect()
    aggregations = params.aggregation if isinstance(params.aggregation, list) else [params.aggregation]
    frames = []
    for step in params.scores:
        scores = ctx.table(step).collect()
        seconds = ctx.input(step).manifest.get("metrics", {}).get("seconds")
        for aggregation in aggregations:
            table = lds(scores, subsets, effects, aggregation, params.purpose)
            frames.append(table)
            for method, mean in table.group_by("method").agg(pl.col("spearman").mean()).iter_rows():
                ctx.log_metric(f"lds.{method}.{aggregation}", mean)
                if seconds is not None:
                    ctx.log_metric(f"seconds.{method}", seconds)
    return pl.concat(frames)


STEP = StepKind("evaluate_lds", EvaluateLdsParams, evaluate_lds, version="1")
