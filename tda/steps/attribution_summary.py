"""`attribution_summary`: one table comparing methods — LDS per aggregation and target role with a 95%
bootstrap interval over targets, Type@1, and scoring cost — from evaluate_lds steps, the score steps
they evaluated, and (optionally) the target roles of a train_airrep step, so held-out targets are
reported apart from trained-on ones.

Intervals. A method's LDS is the mean over targets of a per-target Spearman ρ; its interval is the
percentile bootstrap of that mean over targets (`n_bootstrap` resamples, fixed seed). `compare` names
pairs of methods; each pair adds rows `a − b` (per aggregation and role) whose LDS is the mean of the
per-target differences over the targets both scored, with a paired bootstrap interval (the targets
are resampled together, so what the two share cancels). The eval subsets are fixed: the intervals
speak for other targets of the same experiments, not for another draw of subsets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.errors import DataError

SUMMARY_SCHEMA = {
    "method": pl.String,
    "aggregation": pl.String,
    "targets": pl.String,
    "n_targets": pl.Int64,
    "lds": pl.Float64,
    "lds_low": pl.Float64,  # 95% bootstrap interval over targets
    "lds_high": pl.Float64,
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
    compare: list[tuple[str, str]] = Field(
        default_factory=list,
        description="Pairs [a, b] of methods (the scores' `method` labels): rows `a − b` with the mean "
        "per-target LDS difference and its paired 95% bootstrap interval, per aggregation and role.",
    )
    n_bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of every interval.")


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
    out = _with_intervals(lds, params.n_bootstrap)
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
            pl.lit(None, dtype=pl.Float64).alias("lds_low"),
            pl.lit(None, dtype=pl.Float64).alias("lds_high"),
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
    if params.compare:
        out = pl.concat([out, _differences(lds, params.compare, params.n_bootstrap)])
    for row in out.iter_rows(named=True):
        if row["lds"] is not None:
            name = row["method"].replace(" − ", "-minus-")
            ctx.log_metric(f"lds.{row['targets']}.{name}.{row['aggregation']}", row["lds"])
    _figures(out, lds, ctx.artifacts_dir)
    return out


def _figures(summary: pl.DataFrame, lds: pl.DataFrame, folder: Path) -> None:
    """lds.png, lds_distribution.png and cost.png in the step's MLflow artifacts (those it can draw):
    the figures `tda report` shows, from the same functions."""
    from tda.report import figures

    role, aggregation = figures.headline(summary)
    per_target = lds.filter(pl.col("targets") == role) if role else lds
    drawn = {
        "lds.png": figures.lds_figure(summary),
        "lds_distribution.png": figures.lds_distribution_figure(per_target, aggregation),
        "cost.png": figures.cost_figure(summary),
    }
    for name, fig in drawn.items():
        if fig is not None:
            figures.save_png(fig, folder / name)


def bootstrap_interval(values: np.ndarray, n_resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (NaN, NaN with fewer than 2)."""
    from scipy.stats import bootstrap

    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    if np.ptp(values) == 0:  # every resample has the same mean
        return float(values[0]), float(values[0])
    result = bootstrap(
        (values,), np.mean, n_resamples=n_resamples, method="percentile", random_state=seed, vectorized=True
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


_KEYS = ("method", "aggregation", "targets", "protocol")


def _with_intervals(lds: pl.DataFrame, n_resamples: int) -> pl.DataFrame:
    rows = []
    for key, group in lds.group_by(_KEYS, maintain_order=True):
        values = group["spearman"].cast(pl.Float64).to_numpy()
        low, high = bootstrap_interval(values, n_resamples)
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if len(finite) else None
        rows.append(
            dict(zip(_KEYS, key, strict=True)) | {"n_targets": group.height, "lds": mean} | _ci(low, high)
        )
    schema = {k: SUMMARY_SCHEMA[k] for k in (*_KEYS, "n_targets", "lds", "lds_low", "lds_high")}
    return pl.DataFrame(rows, schema=schema)


def _ci(low: float, high: float) -> dict[str, float | None]:
    return {"lds_low": low if np.isfinite(low) else None, "lds_high": high if np.isfinite(high) else None}


def _differences(lds: pl.DataFrame, pairs: list[tuple[str, str]], n_resamples: int) -> pl.DataFrame:
    """Rows `a − b`: the mean per-target difference of LDS and its paired bootstrap interval."""
    known = set(lds["method"].unique().to_list())
    rows = []
    for a, b in pairs:
        for name in (a, b):
            if name not in known:
                raise DataError(
                    f"compare: no LDS rows of method {name!r}; name methods of the lds steps "
                    f"({', '.join(sorted(known))})"
                )
        left = lds.filter(pl.col("method") == a).drop("method")
        right = lds.filter(pl.col("method") == b).drop("method", "protocol")
        joined = left.join(right, on=["aggregation", "targets", "target_id"], suffix="_b")
        joined = joined.with_columns((pl.col("spearman") - pl.col("spearman_b")).alias("difference"))
        for key, group in joined.group_by(("aggregation", "targets", "protocol"), maintain_order=True):
            values = group["difference"].cast(pl.Float64).to_numpy()
            finite = values[np.isfinite(values)]
            low, high = bootstrap_interval(values, n_resamples)
            rows.append(
                {"method": f"{a} − {b}", "aggregation": key[0], "targets": key[1], "protocol": key[2]}
                | {"n_targets": len(finite), "lds": float(finite.mean()) if len(finite) else None}
                | _ci(low, high)
            )
    out = pl.DataFrame(
        rows, schema={k: SUMMARY_SCHEMA[k] for k in (*_KEYS, "n_targets", "lds", "lds_low", "lds_high")}
    )
    out = out.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("type_at_1"),
        pl.lit(None, dtype=pl.Float64).alias("seconds"),
        pl.lit(None, dtype=pl.Float64).alias("examples_per_second"),
    )
    return out.select(list(SUMMARY_SCHEMA)).cast(SUMMARY_SCHEMA).sort("targets", "method", "aggregation")


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


STEP = StepKind("attribution_summary", AttributionSummaryParams, attribution_summary, version="3")
