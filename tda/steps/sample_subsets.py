"""`sample_subsets`: random subsets of the training rows (fit / eval), for effects and the LDS."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from pipelines import StepContext, StepKind, StepParams, StepRef


class SampleSubsetsParams(StepParams):
    """Random training subsets: the last eval_fraction of them are held out for evaluation."""

    kind: Literal["sample_subsets"] = "sample_subsets"
    data: StepRef = Field(description="A split table (or any table with example_id; all rows if no `split`).")
    n_subsets: int = Field(gt=0, description="How many subsets.")
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
        return self


def sample_subsets_step(params: SampleSubsetsParams, ctx: StepContext) -> pl.DataFrame:
    from tda.subsets.sampling import sample_subsets, subset_size

    table = ctx.table(params.data)
    if "split" in table.collect_schema().names():
        table = table.filter(pl.col("split") == "train")
    ids = table.select("example_id").collect()["example_id"].sort().to_numpy()
    size = subset_size(len(ids), params.fraction, params.subset_size)
    subsets = sample_subsets(ids, params.n_subsets, size, params.eval_fraction, params.seed or 0)
    ctx.log_metrics({"subset_size": size, "eval_subsets": round(params.n_subsets * params.eval_fraction)})
    return subsets


STEP = StepKind("sample_subsets", SampleSubsetsParams, sample_subsets_step, version="1")
