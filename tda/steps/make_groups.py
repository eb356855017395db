"""`make_groups`: groups of training examples (random, nearest neighbours, k-means, by column)."""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef


class MakeGroupsParams(StepParams):
    """Groups of training rows whose joint removal is studied (group_id, example_id, strategy, fraction)."""

    kind: Literal["make_groups"] = "make_groups"
    data: StepRef = Field(description="A split table; groups are drawn from its `train` rows.")
    strategy: Literal["column", "random", "kmeans", "neighbors"] = Field(
        description="random: uniform; neighbors: the p·n nearest rows of a random anchor (coherent groups); "
        "kmeans: clusters with k = 1/p; column: one group per value of `column`."
    )
    fractions: list[float] = Field(
        default_factory=list, description="Group sizes as fractions p of the training rows."
    )
    n_per_size: int = Field(10, gt=0, description="Groups per fraction.")
    column: str | None = Field(None, description="strategy column: the column whose values form the groups.")
    features: StepRef | None = Field(
        None,
        description="kmeans/neighbors: cluster the rows' gradient features (a gradient_features step) "
        "instead of the table's x_ columns.",
    )
    seed: int | None = Field(None, description="Random seed (null = the spec's seed).")


def make_groups_step(params: MakeGroupsParams, ctx: StepContext) -> pl.DataFrame:
    from tda.subsets.groups import make_groups

    train = ctx.table(params.data).filter(pl.col("split") == "train").sort("example_id").collect()
    columns = sorted((c for c in train.columns if c.startswith("x_")), key=lambda c: int(c[2:]))
    X = train.select(columns).to_numpy() if columns else None
    if params.features is not None:
        X = _feature_matrix(ctx, params.features, train["example_id"].to_numpy())
    values = train[params.column].cast(pl.String).to_numpy() if params.column else None
    groups = make_groups(
        train["example_id"].to_numpy(),
        X,
        params.strategy,
        params.fractions,
        params.n_per_size,
        values,
        params.seed or 0,
    )
    ctx.log_metric("groups", groups["group_id"].n_unique())
    return groups


def _feature_matrix(ctx: StepContext, features: str, train_ids: Any) -> Any:
    """The training rows' gradient features in `train_ids` order, unit-normalised (for clustering)."""
    import numpy as np

    from tda.errors import DataError
    from tda.influence.feature_store import load_features, read_split

    obj = ctx.input(features)
    ids, Phi = read_split(load_features(obj.data_dir, obj.model_dir).files, "train")
    if not np.array_equal(ids, train_ids):
        raise DataError(
            f"features {features!r} are not of this split's training rows; featurise the same `data`"
        )
    return (Phi / Phi.norm(dim=1, keepdim=True).clamp_min(1e-12)).double().numpy()


STEP = StepKind("make_groups", MakeGroupsParams, make_groups_step, version="1")
