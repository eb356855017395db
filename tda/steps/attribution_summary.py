"""`attribution_summary`: one table comparing methods — LDS per aggregation and target role, Type@1,
and scoring cost — from evaluate_lds steps, the score steps they evaluated, and (optionally) the
target roles of a train_airrep step, so held-out targets are reported apart from trained-on ones."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef

SUMMARY_SCHEMA = {
    "method": pl.String,
    "aggregation": pl.String,
    "targets": pl.String,
    "n_targets": pl.Int64,
    "lds": pl.Float64,
    "type_at_1": pl.Float64,
    "seconds": pl.Float64,
    "examples_per_second": pl.Float64,
    "protocol": pl.String,  # of the experiments the LDS was measured on: local | paper (null: cost only)
}


class AttributionSummaryParams(StepParams):
    """Mean LDS (and Type@1, and cost) per method, aggregation and target role, with the protocol of
    the experiments (local or paper) the LDS was measured on."""

    kind: Literal["attribution_summary"] = "attribution_summary"
    lds: list[StepRef] = Field(default_factory=list, description="evaluate_lds steps (none: cost only).")
    scores: list[StepRef] = Field(
        default_factory=list, description="Score steps: their Type@1 and their cost (seconds, examples/s)."
    )
    data: StepRef | None = Field(
        None, description="A table with example_id and group (the corpus split): for Type@1."
    )
    roles: StepRef | None = Field(
        None,
        description="A train_airrep step: its target roles split the rows into heldout / fit (/ val); "
        "without it every target counts as `all`.",
    )


def attribution_summary(params: AttributionSummaryParams, ctx: StepContext) -> pl.DataFrame:
    from tda.evaluation.topk import type_at_1

    lds = pl.concat(
        [
            ctx.table(step)
            .collect()
            .with_columns(pl.lit(_protocol(ctx, step), dtype=pl.String).alias("protocol"))
            for step in params.lds
        ]
        or [
            pl.DataFrame(
                schema={
                    "method": pl.String,
                    "aggregation": pl.String,
                    "target_id": pl.Int64,
                    "spearman": pl.Float64,
                    "protocol": pl.String,
                }
            )
        ]
    )
    roles = _roles(ctx, params, lds)
    lds = lds.join(roles, on="target_id", how="left").with_columns(pl.col("targets").fill_null("other"))
    out = lds.group_by("method", "aggregation", "targets", "protocol").agg(
        pl.len().cast(pl.Int64).alias("n_targets"), pl.col("spearman").drop_nans().mean().alias("lds")
    )
    cost_rows, type_rows = [], []
    groups = ctx.table(params.data).select("example_id", "group").collect() if params.data else None
    for step in params.scores:
        scores = ctx.table(step).collect()
        metrics = ctx.input(step).manifest.get("metrics", {})
        for method in scores["method"].unique().to_list():
            cost_rows.append(
                {
                    "method": method,
                    "seconds": metrics.get("seconds"),
                    "examples_per_second": metrics.get("examples_per_second"),
                }
            )
        if groups is not None:
            hits = type_at_1(scores, groups).join(roles, on="target_id", how="left")
            type_rows.append(
                hits.with_columns(pl.col("targets").fill_null("other"))
                .group_by("method", "targets")
                .agg(pl.col("hit").cast(pl.Float64).mean().alias("type_at_1"))
            )
    cost = pl.DataFrame(
        cost_rows, schema={k: SUMMARY_SCHEMA[k] for k in ("method", "seconds", "examples_per_second")}
    )
    if not params.lds:  # cost only: one row per scored method
        out = cost.select("method").with_columns(
            pl.lit(None, dtype=pl.String).alias("aggregation"),
            pl.lit("all").alias("targets"),
            pl.lit(None, dtype=pl.Int64).alias("n_targets"),
            pl.lit(None, dtype=pl.Float64).alias("lds"),
            pl.lit(None, dtype=pl.String).alias("protocol"),
        )
    out = out.join(cost.unique("method"), on="method", how="left")
    if type_rows:
        out = out.join(pl.concat(type_rows), on=["method", "targets"], how="left")
    else:
        out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias("type_at_1"))
    out = (
        out.select(list(SUMMARY_SCHEMA)).cast(SUMMARY_SCHEMA).sort("targets", "lds", descending=[False, True])
    )
    for row in out.iter_rows(named=True):
        if row["lds"] is not None:
            ctx.log_metric(f"lds.{row['targets']}.{row['method']}.{row['aggregation']}", row["lds"])
    return out


def _protocol(ctx: StepContext, lds_step: str) -> str | None:
    """The protocol of the subset_effects step an evaluate_lds step read (from their manifests)."""
    manifest = ctx.input(lds_step).manifest
    effects = manifest.get("params", {}).get("effects")
    key = manifest.get("inputs", {}).get(effects)
    params = (ctx.store.manifest(key) or {}).get("params", {}) if key else {}
    return params.get("protocol", "local") if params.get("kind") == "subset_effects" else None


def _roles(ctx: StepContext, params: AttributionSummaryParams, lds: pl.DataFrame) -> pl.DataFrame:
    if params.roles is None:
        return lds.select("target_id").unique().with_columns(pl.lit("all").alias("targets"))
    return ctx.table(params.roles).select("target_id", pl.col("role").alias("targets")).collect()


STEP = StepKind("attribution_summary", AttributionSummaryParams, attribution_summary, version="2")
