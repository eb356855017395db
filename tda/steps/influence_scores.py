"""`influence_scores`: per-example attribution scores of every training row for every target."""

from __future__ import annotations

import time
from typing import Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import damping_field, set_threads, trained_split


class InfluenceScoresParams(StepParams):
    """Scores (method, target_id, example_id, score): higher = the example helped the target."""

    kind: Literal["influence_scores"] = "influence_scores"
    model: StepRef = Field(description="A train_model step.")
    data: StepRef = Field(description="The split table the model was trained on.")
    method: Literal["if-exact", "if-cg", "if-lissa", "graddot", "gradcos"] = Field(
        description="Influence function (1/n)∇ℓ_tᵀH̄⁻¹∇ℓ_z with an exact, CG or LiSSA inverse-HVP; or the "
        "gradient dot product / cosine."
    )
    damping: float = damping_field()
    top_k: int | None = Field(
        None, gt=0, description="Keep the k highest scores per target (null = all pairs)."
    )
    block_size: int = Field(256, gt=0, description="Targets scored per block (memory: block × n_train).")
    hvp: Literal["auto", "dense", "matrix_free"] = Field(
        "auto", description="Products with H̄: dense = Σ∇²ℓ built once (d ≤ 4096 under auto), else the HVP."
    )
    cg_tol: float = Field(1e-10, gt=0, description="if-cg: relative residual tolerance.")
    cg_max_iter: int = Field(1000, gt=0, description="if-cg: most iterations.")
    lissa_depth: int = Field(1000, gt=0, description="if-lissa: recursion depth.")
    lissa_scale: float | None = Field(
        None, gt=0, description="if-lissa: scale (null = 1.05 × λ_max by power iteration)."
    )
    lissa_batch_size: int | None = Field(
        None, gt=0, description="if-lissa: rows per HVP sample (null = full batch)."
    )
    lissa_repeats: int = Field(1, gt=0, description="if-lissa: independent runs averaged.")
    seed: int | None = Field(None, description="if-lissa minibatch seed (null = the spec's seed).")


def _solver_options(params: InfluenceScoresParams) -> dict:
    if params.method == "if-cg":
        return {"tol": params.cg_tol, "max_iter": params.cg_max_iter}
    if params.method == "if-lissa":
        return {
            "depth": params.lissa_depth,
            "scale": params.lissa_scale,
            "batch_size": params.lissa_batch_size,
            "repeats": params.lissa_repeats,
            "seed": params.seed or 0,
        }
    return {}


def influence_scores(params: InfluenceScoresParams, ctx: StepContext) -> pl.DataFrame:
    from tda.influence import example_scores

    set_threads(params.resources.num_cpus)
    data, family, theta, meta = trained_split(ctx, params.model, params.data)
    t0 = time.perf_counter()
    frame, info = example_scores(
        params.method,
        family,
        theta,
        data.X_train,
        data.y_train,
        data.X_target,
        data.y_target,
        l2=meta["l2"],
        train_ids=data.train_ids,
        target_ids=data.target_ids,
        damping=params.damping,
        block_size=params.block_size,
        top_k=params.top_k,
        hvp=params.hvp,
        **_solver_options(params),
    )
    seconds = time.perf_counter() - t0
    ctx.log_metrics(
        {
            "seconds": seconds,
            "targets_per_second": len(data.target_ids) / seconds,
            **{k: float(v) for k, v in info.items() if isinstance(v, int | float)},
        }
    )
    return frame


STEP = StepKind("influence_scores", InfluenceScoresParams, influence_scores, version="1")
