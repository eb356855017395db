"""`split`: mark a random (stratified) set of rows as targets, the rest as training rows."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from pipelines import StepContext, StepKind, StepParams, StepRef


class SplitParams(StepParams):
    """Add a `split` column (train | target) to a table with `example_id` (tabular or corpus)."""

    kind: Literal["split"] = "split"
    data: StepRef = Field(description="The table to split.")
    n_targets: int | None = Field(None, gt=0, description="How many target rows.")
    target_ids: list[int] | None = Field(
        None, min_length=1, description="Or: these example ids are the targets."
    )
    target_fraction: float | None = Field(
        None, gt=0, lt=1, description="Or: the fraction of rows that are targets."
    )
    n_train: int | None = Field(
        None, gt=0, description="Keep at most this many training rows (null = all the rest)."
    )
    stratify_by: str | None = Field(
        None, description="A column (label, group) whose proportions both sides keep."
    )
    seed: int | None = Field(None, description="Random seed (null = the spec's seed).")

    @model_validator(mode="after")
    def _one_size(self) -> SplitParams:
        if sum(x is not None for x in (self.n_targets, self.target_fraction, self.target_ids)) != 1:
            raise ValueError("give exactly one of n_targets, target_fraction and target_ids")
        return self


def split(params: SplitParams, ctx: StepContext) -> pl.DataFrame:
    from tda.data.split import split_table

    table = split_table(
        ctx.table(params.data).collect(),
        params.n_targets,
        params.target_fraction,
        params.stratify_by,
        params.n_train,
        params.seed or 0,
        params.target_ids,
    )
    ctx.log_metrics(
        {"train": int((table["split"] == "train").sum()), "targets": int((table["split"] == "target").sum())}
    )
    return table


STEP = StepKind("split", SplitParams, split, version="1")
