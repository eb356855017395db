"""`group_influence`: first- and second-order influence of removing each group on each target."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from pipelines import InputPath, StepContext, StepKind, StepRef
from tda.steps.common import damping_field, index_members, set_threads, trained_split
from tda.steps.embedding import EmbeddingStepParams

if TYPE_CHECKING:
    from tda.influence.solvers import SolverOptions

ORDER = {"if-order1": 1, "if-order2": 2, "newton": 0}


class GroupInfluenceParams(EmbeddingStepParams):
    """Predicted change of every target's loss when a group is removed (Koh et al. 2019; Basu et al. 2020)."""

    embedding_methods = ("airrep",)

    kind: Literal["group_influence"] = "group_influence"
    method: Literal["influence", "airrep"] = Field(
        "influence",
        description="influence = first/second-order influence functions and Newton (needs `model`); "
        "airrep = AirRep group scores, attention-pooled (method airrep-attention) and summed (airrep-sum).",
    )
    model: StepRef | None = Field(None, description="influence: a train_model step (or give `features`).")
    features: StepRef | None = Field(
        None,
        description="influence in a feature space: a gradient_features step; H̄ and H_U are the projected "
        "Gauss–Newton (φφᵀ per example), damped by relative_damping.",
    )
    relative_damping: float = Field(
        0.1, ge=0, description="features: λ = relative_damping × the mean eigenvalue of ΦᵀΦ/n."
    )
    data: StepRef = Field(description="The split table the model (or the experiments) used.")
    groups: StepRef = Field(description="A make_groups step.")
    encoder: StepRef | None = Field(None, description="airrep: a train_airrep step.")
    encoder_path: InputPath | None = Field(None, description="airrep: a saved AirRep folder.")
    mlflow_run: str | None = Field(None, description="airrep: the MLflow run id of a train_airrep step.")
    embed_workers: int = Field(1, gt=0, description="airrep: Ray Data actors that embed.")
    embed_batch_size: int = Field(128, gt=0, description="airrep: examples per encoder forward.")
    orders: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2], description="Orders to compute.")
    newton: bool = Field(
        True, description="Also the one-step Newton estimate (n·H̄ − H_U)⁻¹ g_U, the reference."
    )
    solver: Literal["exact", "cg", "lissa"] = Field("exact", description="Inverse-HVP solver for H̄.")
    damping: float = damping_field()
    hvp: Literal["auto", "dense", "matrix_free"] = Field(
        "auto", description="Products with H̄: dense = Σ∇²ℓ built once (d ≤ 4096 under auto), else the HVP."
    )

    @model_validator(mode="after")
    def _sources(self) -> GroupInfluenceParams:
        given = [f for f in ("encoder", "encoder_path", "mlflow_run") if getattr(self, f) is not None]
        if self.method == "influence" and ((self.model is None and self.features is None) or given):
            raise ValueError(
                "method influence needs `model` (a train_model step) or `features` (a gradient_features "
                "step), and no encoder"
            )
        if self.method == "airrep" and len(given) != 1:
            raise ValueError("method airrep needs exactly one of encoder, encoder_path and mlflow_run")
        return self

    def check_references(self, steps: Any) -> list[tuple[tuple[str | int, ...], str]]:
        from tda.steps.common import check_features_ref

        return check_features_ref(steps, self.features, self.model, self.data)

    def solver_options(self) -> SolverOptions:
        """method influence: the solver for H̄⁻¹, its damping and products (the solver's defaults)."""
        from tda.influence.solvers import SolverOptions

        return SolverOptions(self.solver, damping=self.damping, hvp=self.hvp)


def airrep_groups(params: GroupInfluenceParams, ctx: StepContext) -> pl.DataFrame:
    """AirRep group scores: member scores e(t)·e(z) pooled with attention and with a sum."""
    from tda.airrep.score import group_score_frame
    from tda.steps.embedding import embed_split
    from tda.steps.influence_scores import encoder_source

    set_threads(max(1.0, params.resources.num_cpus))
    emb = embed_split(
        ctx,
        params.data,
        encoder_source(params, ctx),
        batch_size=params.embed_batch_size,
        workers=params.embed_workers,
    )
    group_ids, members = index_members(ctx.table(params.groups).collect(), "group_id", emb.train_ids, "group")
    t0 = time.perf_counter()
    frames = [
        group_score_frame(
            f"airrep-{aggregation}",
            emb.target_ids,
            emb.targets,
            emb.train_ids,
            emb.train,
            group_ids,
            members,
            aggregation,
        )
        for aggregation in ("attention", "sum")
    ]
    ctx.log_metrics({"seconds": emb.seconds + time.perf_counter() - t0, "embed_seconds": emb.seconds})
    return pl.concat(frames)


def group_influence_step(params: GroupInfluenceParams, ctx: StepContext) -> pl.DataFrame:
    from tda.influence import group_influence

    if params.method == "airrep":
        return airrep_groups(params, ctx)
    set_threads(params.resources.num_cpus)
    if params.features is not None:
        return feature_groups(params, ctx)
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
        newton=params.newton,
        options=params.solver_options(),
    )
    ctx.log_metric("seconds", time.perf_counter() - t0)
    frames = [_long(method, matrix.numpy(), data.target_ids, group_ids) for method, matrix in effects.items()]
    return pl.concat(frames)


def feature_groups(params: GroupInfluenceParams, ctx: StepContext) -> pl.DataFrame:
    """Group influence in the features' space (the projected Gauss–Newton curvature)."""
    from tda.influence.feature_store import read_split
    from tda.influence.group import feature_group_influence
    from tda.steps.influence_scores import features_of

    features = features_of(ctx, params.features, params.model, params.data)
    train_ids, Phi = read_split(features.files, "train")
    target_ids, T = read_split(features.files, "target")
    group_ids, index = index_members(ctx.table(params.groups).collect(), "group_id", train_ids, "group")
    t0 = time.perf_counter()
    effects = feature_group_influence(
        Phi, T, index, tuple(params.orders), params.newton, params.relative_damping
    )
    ctx.log_metrics({"seconds": time.perf_counter() - t0, "dim": Phi.shape[1]})
    return pl.concat([_long(method, m.numpy(), target_ids, group_ids) for method, m in effects.items()])


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
