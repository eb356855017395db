"""`sample_subsets`: random subsets of the training rows (fit / eval), for effects and the LDS."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from pipelines import StepContext, StepKind, StepParams, StepRef


class SampleSubsetsParams(StepParams):
    """Random training subsets (the last eval_fraction held out); or, with n_splits, the AirRep layout:
    disjoint splits, each with its own targets and training pool, subsets drawn from the pool."""

    kind: Literal["sample_subsets"] = "sample_subsets"
    data: StepRef = Field(description="A split table (or any table with example_id; all rows if no `split`).")
    n_subsets: int | None = Field(None, gt=0, description="How many subsets (plain layout).")
    n_splits: int | None = Field(None, gt=0, description="AirRep layout: disjoint splits (targets + pool).")
    n_subsets_per_split: int | None = Field(None, gt=0, description="AirRep layout: subsets per split.")
    pool_size: int | None = Field(None, gt=0, description="AirRep layout: training rows per split's pool.")
    targets_per_split: int | None = Field(None, gt=0, description="AirRep layout: targets per split.")
    fraction: float | None = Field(
        None, gt=0, le=1, description="Subset size as a fraction of the training rows."
    )
    subset_size: int | None = Field(None, gt=0, description="Or: subset size in rows.")
    eval_fraction: float = Field(0.0, ge=0, le=1, description="Share of subsets marked `eval` (held out).")
    seed: int | None = Field(None, description="Random seed (null = the spec's seed).")

    @model_validator(mode="after")
    def _one_size(self) -> SampleSubsetsParams:
        if (self.fraction is None) == (self.subset_size is None):
            raise ValueError("give exactly one of fraction and subset_size")
        airrep = self.n_splits is not None or self.n_subsets_per_split is not None
        if airrep == (self.n_subsets is not None) or (
            airrep and None in (self.n_splits, self.n_subsets_per_split)
        ):
            raise ValueError("give n_subsets, or n_splits with n_subsets_per_split (the AirRep layout)")
        return self


def sample_subsets_step(params: SampleSubsetsParams, ctx: StepContext) -> pl.DataFrame:
    from tda.subsets.sampling import sample_subsets, subset_size

    if params.n_splits is not None:
        return _split_layout(params, ctx)
    table = ctx.table(params.data)
    if "split" in table.collect_schema().names():
        table = table.filter(pl.col("split") == "train")
    ids = table.select("example_id").collect()["example_id"].sort().to_numpy()
    size = subset_size(len(ids), params.fraction, params.subset_size)
    subsets = sample_subsets(ids, params.n_subsets, size, params.eval_fraction, params.seed or 0)
    ctx.log_metrics({"subset_size": size, "eval_subsets": round(params.n_subsets * params.eval_fraction)})
    return subsets


def _split_layout(params: SampleSubsetsParams, ctx: StepContext) -> pl.DataFrame:
    from tda.subsets.sampling import sample_split_subsets

    table = ctx.table(params.data).select("example_id", "split").collect()
    ids = {s: table.filter(pl.col("split") == s)["example_id"].sort().to_numpy() for s in ("train", "target")}
    pool = params.pool_size or len(ids["train"]) // params.n_splits
    size = params.subset_size or round((params.fraction or 0.0) * pool)
    subsets = sample_split_subsets(
        ids["train"],
        ids["target"],
        params.n_splits,
        params.n_subsets_per_split,
        size,
        params.eval_fraction,
        params.pool_size,
        params.targets_per_split,
        params.seed or 0,
    )
    ctx.log_metrics({"subset_size": size, "splits": params.n_splits, "pool_size": pool})
    return subsets


STEP = StepKind("sample_subsets", SampleSubsetsParams, sample_subsets_step, version="1")
