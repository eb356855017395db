"""`group_influence`: first- and second-order influence of removing each group on each target."""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import damping_field, index_members, set_threads, trained_split

ORDER = {"if-order1": 1, "if-order2": 2, "newton": 0}


class GroupInfluenceParams(StepParams):
    """Predicted change of every target's loss when a group is removed (Koh et al. 2019; Basu et al. 2020)."""

    kind: Literal["group_influence"] = "group_influence"
    model: StepRef = Field(description="A train_model step.")
    data: StepRef = Field(description="The split table the model was trained on.")
    groups: StepRef = Field(description="A make_groups step.")
    orders: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2], description="Orders to compute.")
    newton: bool = Field(
        True, description="Also the one-step Newton estimate (n·H̄ − H_U)⁻¹ g_U, the reference."
    )
    solver: Literal["exact", "cg", "lissa"] = Field("exact", description="Inverse-HVP solver for H̄.")
    damping: float = damping_field()
    hvp: Literal["auto", "dense", "matrix_free"] = Field(
        "auto", description="Products with H̄: dense = Σ∇²ℓ built once (d ≤ 4096 under auto), else the HVP."
    )


def group_influence_step(params: GroupInfluenceParams, ctx: StepContext) -> pl.DataFrame:
    from tda.influence import group_influence

    set_threads(params.resources.num_cpus)
    data, family, theta, meta = trained_split(ctx, params.model, params.data)
    group_ids, index = index_members(ctx.table(params.groups).collect(), "group_id", data.train_ids, "group")
    t0 = time.perf_counter()
    effects = group_influence(
        family,
        theta,
        data.X_train,
        data.y_train,
        data.X_target,
        data.y_target,
        index,
        l2=meta["l2"],
        orders=tuple(params.orders),
        solver=params.solver,
        damping=params.damping,
        newton=params.newton,
        hvp=params.hvp,
    )
    ctx.log_metric("seconds", time.perf_counter() - t0)
    frames = [_long(method, matrix.numpy(), data.target_ids, group_ids) for method, matrix in effects.items()]
    return pl.concat(frames)


def _long(method: str, matrix: np.ndarray, target_ids: np.ndarray, group_ids: list[str]) -> pl.DataFrame:
    m, g = matrix.shape  # (targets, groups)
    return pl.DataFrame(
        {
            "method": [method] * (m * g),
            "order": np.full(m * g, ORDER[method], dtype=np.int8),
            "target_id": np.repeat(target_ids.astype(np.int64), g),
            "group_id": np.tile(np.array(group_ids, dtype=object), m),
            "score": matrix.reshape(-1).astype(np.float64),
        },
        schema_overrides={"group_id": pl.String},
    )


STEP = StepKind("group_influence", GroupInfluenceParams, group_influence_step, version="1")
