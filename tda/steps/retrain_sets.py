"""Retraining on chosen training sets, shared by `removal_check` and `select_and_train`.

Both steps act on attributions the way a user does (drop what a method says helped; train on what it
says helps) and measure the result by retraining with the experiments' own recipe: the scored model's
family and objective, and, in the paper protocol, a fine-tune from `base` as `subset_effects` does.
Every fit of a step uses one data order (the step's seed), so two fits differ only in their rows, and
a fit on every training row is the reference each change is measured from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines import StepContext, StepParams, StepRef
from tda.steps.common import (
    Device,
    Precision,
    Retraining,
    Split,
    batches,
    check_device,
    check_protocol,
    device_field,
    precision_field,
    trained_split,
)


class RetrainSetsParams(StepParams):
    """The retraining recipe of a step that trains on chosen sets of training rows."""

    non_semantic = StepParams.non_semantic | {
        "fits_per_task",
        "task_cpus",
        "task_gpus",
        "device",
        "precision",
    }

    model: StepRef = Field(description="The scored model step: its family, recipe and θ* (local: the start).")
    data: StepRef = Field(description="The split table the model was trained on.")
    protocol: Literal["local", "paper"] = Field(
        "local",
        description="local: every fit warm-starts from `model` (exact retraining for the convex families); "
        "paper: every fit is a fine-tune from `base`, as the experiments' subset_effects.",
    )
    base: StepRef | None = Field(None, description="paper: the model every fine-tune starts from.")
    recipe: dict[str, float | int] = Field(
        default_factory=dict, description="Overrides of the model's training recipe (e.g. {epochs: 2})."
    )
    seed: int | None = Field(
        None, description="The fits' data order and the random draws (null = the spec's)."
    )
    fits_per_task: int = Field(4, gt=0, description="Fits run by one Ray task.")
    task_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each training task.")
    task_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each training task (fractional).")
    device: Device = device_field("a training task")
    precision: Precision = precision_field()

    @model_validator(mode="after")
    def _protocol(self) -> RetrainSetsParams:
        check_protocol(self.protocol, self.base, "fine-tune")
        check_device(self.device, self.precision, self.task_gpus, "task_gpus")
        return self

    def demands(self) -> dict[str, tuple[float, str]]:
        """One training task at least: its task_cpus and task_gpus must fit on the cluster."""
        out = super().demands()
        if self.task_cpus > out["CPU"][0]:
            out["CPU"] = (self.task_cpus, "task_cpus")
        if self.task_gpus > out["GPU"][0]:
            out["GPU"] = (self.task_gpus, "task_gpus")
        return out


@dataclass
class Refits:
    """The split and the recipe; `losses` retrains on each set of rows and measures every target."""

    data: Split
    job: Retraining
    seed: int

    @classmethod
    def load(cls, ctx: StepContext, params: RetrainSetsParams) -> Refits:
        from tda.steps.subset_effects import base_theta, with_recipe

        data, family, theta, meta = trained_split(ctx, params.model, params.data)
        if params.recipe:
            family = with_recipe(family, params.recipe)
        start = base_theta(ctx, params, theta, meta) if params.protocol == "paper" else theta
        seed = params.seed or 0
        return cls(data, Retraining(family, start, data, meta.get("l2_sum", 0.0), []), seed)

    @functools.cached_property
    def _id_order(self) -> np.ndarray:
        return np.argsort(self.data.train_ids)  # once per step, not once per fit

    def row_of(self, example_ids: np.ndarray) -> np.ndarray:
        """Training-row positions of `example_ids` (all must be training rows)."""
        order = self._id_order
        found = np.searchsorted(self.data.train_ids, example_ids, sorter=order)
        return order[np.clip(found, 0, len(order) - 1)]

    def losses(self, ctx: StepContext, params: RetrainSetsParams, sets: list[np.ndarray]) -> np.ndarray:
        """(len(sets), targets): each target's loss after training on each set of row positions."""
        import torch

        from tda.steps.subset_effects import train_batch

        job = Retraining(
            self.job.family,
            self.job.theta,
            self.data,
            self.job.l2_sum,
            [torch.as_tensor(np.sort(rows), dtype=torch.long) for rows in sets],
            [self.seed] * len(sets),
        )
        device = (params.device, params.precision, params.task_gpus)
        work = functools.partial(train_batch, job=job, num_cpus=params.task_cpus, device=device)
        tasks: dict[str, Any] = {"num_cpus": params.task_cpus}
        if params.task_gpus:
            tasks["num_gpus"] = params.task_gpus
        out = np.empty((len(sets), len(self.data.target_ids)))
        done = 0
        ctx.progress(0, len(sets))
        for batch, losses in ctx.imap_unordered(
            work, batches(len(sets), params.fits_per_task), progress=False, **tasks
        ):
            out[batch] = losses
            done += len(batch)
            ctx.progress(done, len(sets))  # fits done / total
        return out


def paired_gain(
    values: np.ndarray, reference: np.ndarray, n_resamples: int = 2000
) -> tuple[float, float, float]:
    """Mean of values − reference over targets (paired), with its 95% bootstrap interval."""
    from tda.steps.attribution_summary import bootstrap_interval

    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    low, high = bootstrap_interval(diff, n_resamples)
    return (float(diff.mean()) if len(diff) else float("nan")), low, high


def score_tables(ctx: StepContext, steps: list[str], targets: np.ndarray | None = None) -> Any:
    """The score tables of `steps`, one LazyFrame (method, target_id, example_id, score)."""
    import polars as pl

    frames = [ctx.table(s).select("method", "target_id", "example_id", "score") for s in steps]
    table = pl.concat(frames)
    if targets is not None:
        table = table.filter(pl.col("target_id").is_in(targets.tolist()))
    return table
