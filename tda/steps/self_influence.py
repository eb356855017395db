"""`self_influence`: every training example's score on itself, ⟨P φ_z, φ_z⟩, from gradient features.

It is what data cleaning ranks by: an example the model finds hard to fit on its own (large
self-influence) is often mislabelled or an outlier. The table is `self_influence`: example_id int64,
method str, score float64, in example-id order.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef


class SelfInfluenceParams(StepParams):
    """Self-influence of every training row under one feature method's preconditioner."""

    kind: Literal["self_influence"] = "self_influence"
    features: StepRef = Field(description="A gradient_features step.")
    method: Literal["graddot", "logra", "trak", "kfac", "ekfac"] = Field(
        "logra",
        description="The preconditioner: graddot = ‖φ_z‖²; logra, trak, kfac, ekfac as in influence_scores.",
    )
    relative_damping: float = Field(
        0.1, ge=0, description="Damping × the mean eigenvalue of each curvature block."
    )
    label: str | None = Field(None, description="The `method` column (null = the method).")

    def check_references(self, steps: Any) -> list[tuple[tuple[str | int, ...], str]]:
        from tda.steps.common import check_features_ref

        return check_features_ref(steps, self.features, None, None, self.method)


def self_influence_step(params: SelfInfluenceParams, ctx: StepContext) -> pl.DataFrame:
    from tda.influence import feature_scores as fs
    from tda.influence.feature_store import load_features

    obj = ctx.input(params.features)
    features = load_features(obj.data_dir, obj.model_dir)
    fs.check_method(params.method, features, params.features)
    P, fit_seconds = fs.timed(fs.fit, params.method, features, params.relative_damping)
    table, seconds = fs.timed(fs.self_influence_table, params.method, features, P)
    ctx.log_metrics(
        {"fit_seconds": fit_seconds, "seconds": fit_seconds + seconds, "rows": len(table["score"])}
    )
    order = np.argsort(table["example_id"], kind="stable")
    return pl.DataFrame(
        {
            "example_id": table["example_id"][order].astype(np.int64),
            "method": pl.repeat(params.label or params.method, len(order), dtype=pl.String, eager=True),
            "score": table["score"][order].astype(np.float64),
        }
    )


STEP = StepKind("self_influence", SelfInfluenceParams, self_influence_step, version="1")
