"""What several step kinds share: loading a split tabular table as tensors, a trained model, fields."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import Field

from pipelines import StepContext
from tda.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch


def l2_field(default: float = 1e-2) -> Any:
    return Field(default, ge=0, description="L2 strength per example: λ_sum = n_train · l2 (see the docs).")


def damping_field() -> Any:
    return Field(0.0, ge=0, description="δ added to the mean Hessian (H̄ + δI) before inverting.")


@dataclass(frozen=True)
class Split:
    """The train and target rows of a split tabular table, as float64/int64 tensors."""

    train_ids: np.ndarray  # (n,)
    X_train: torch.Tensor  # (n, d)
    y_train: torch.Tensor  # (n,)
    target_ids: np.ndarray  # (m,)
    X_target: torch.Tensor  # (m, d)
    y_target: torch.Tensor  # (m,)
    train_table: pl.DataFrame

    @property
    def n(self) -> int:
        return len(self.train_ids)


def load_split(ctx: StepContext, data: str) -> Split:
    """The split table of step `data` (tabular layout + `split`) as tensors."""
    from tda.data.tabular import tabular_tensors

    table = ctx.table(data).collect()
    if "split" not in table.columns:
        raise DataError(
            f"step {data!r}: its table has no `split` column; "
            "put a `split` step between the data and this step"
        )
    train = table.filter(pl.col("split") == "train").sort("example_id")
    target = table.filter(pl.col("split") == "target").sort("example_id")
    train_ids, X_train, y_train = tabular_tensors(train)
    target_ids, X_target, y_target = tabular_tensors(target)
    return Split(train_ids.numpy(), X_train, y_train, target_ids.numpy(), X_target, y_target, train)


def load_trained(
    ctx: StepContext, model: str, split: Split | None = None
) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """(family, θ, meta) of a `train_model` step; checks it was trained on this split's train rows."""
    from tda.models import load_model

    family, theta, meta = load_model(ctx.input(model).model_dir)
    if split is not None and meta.get("n_train") != split.n:
        raise ModelError(
            f"step {model!r} was trained on {meta.get('n_train')} rows "
            f"but the data has {split.n} train rows; "
            "give both steps the same `data`"
        )
    return family, theta, meta


def set_threads(num_cpus: float) -> None:
    """Torch threads of a task = the CPUs it reserved (no oversubscription of cores)."""
    import torch

    threads = max(1, int(num_cpus))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def index_members(
    table: pl.DataFrame, key: str, train_ids: np.ndarray, what: str
) -> tuple[list[Any], list[torch.Tensor]]:
    """Values of `key` (sorted) and, per value, the row positions of its `example_id`s in the training
    split: for groups (key group_id) and subsets (key subset_id)."""
    import torch

    positions = pl.DataFrame({"example_id": train_ids.astype(np.int64), "_row": np.arange(len(train_ids))})
    joined = table.select(key, "example_id").join(positions, on="example_id", how="left")
    missing = joined.filter(pl.col("_row").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise DataError(
            f"{what} {first[key]!r}: example_id {first['example_id']} (and {missing.height - 1} more) is not "
            f"in the training split; build the {what}s from the same `data` step"
        )
    members = joined.group_by(key, maintain_order=True).agg(pl.col("_row")).sort(key)
    return members[key].to_list(), [torch.tensor(rows, dtype=torch.long) for rows in members["_row"]]
