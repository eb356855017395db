"""`synthetic_instructions`: a deterministic instruction corpus (12+ task families) for tests and demos."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef


class SyntheticInstructionsParams(StepParams):
    """Instruction/response pairs from task families with overlapping vocabulary; `group` = the task."""

    kind: Literal["synthetic_instructions"] = "synthetic_instructions"
    n_examples: int = Field(gt=0, description="How many examples (spread evenly over the families).")
    families: list[str] | None = Field(None, description="Task families to use (null = all).")
    seed: int | None = Field(None, description="Random seed (null = the spec's seed).")
    exclude: StepRef | None = Field(
        None,
        description="A corpus none of whose (prompt, response) pairs may appear here (e.g. the pool, for "
        "a base model's pretraining corpus); examples are drawn until n_examples are new.",
    )


def synthetic_instructions_step(params: SyntheticInstructionsParams, ctx: StepContext) -> pl.DataFrame:
    from tda.data.synthetic import disjoint_draw, synthetic_instructions

    seed = params.seed or 0
    if params.exclude is None:
        corpus = synthetic_instructions(params.n_examples, seed, params.families)
    else:
        excluded = ctx.table(params.exclude).select("prompt", "response").collect()
        corpus = disjoint_draw(params.n_examples, seed, params.families, excluded)
    ctx.log_metric("families", corpus["group"].n_unique())
    return corpus


STEP = StepKind(
    "synthetic_instructions", SyntheticInstructionsParams, synthetic_instructions_step, version="1"
)
