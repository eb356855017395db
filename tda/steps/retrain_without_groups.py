"""`retrain_without_groups`: the ground truth of group influence, by retraining without each group."""

from __future__ import annotations

import functools
import time
from typing import Literal

import numpy as np
import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import Retraining, batches, index_members, set_threads, trained_split


class RetrainWithoutGroupsParams(StepParams):
    """Retrain without each group (same objective, warm start) and measure every target's loss change."""

    non_semantic = StepParams.non_semantic | {"groups_per_task", "task_cpus"}

    kind: Literal["retrain_without_groups"] = "retrain_without_groups"
    model: StepRef = Field(description="A train_model step (its family, recipe and optimum θ*).")
    data: StepRef = Field(description="The split table the model was trained on.")
    groups: StepRef = Field(description="A make_groups step.")
    control: bool | None = Field(
        None,
        description="Measure against the same recipe run on all rows from θ* (null = yes for causal LMs, "
        "whose fine-tunes move θ* even when nothing is removed; no for converged families).",
    )
    groups_per_task: int = Field(8, gt=0, description="Groups retrained by one Ray task.")
    task_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each retraining task.")

    def demands(self) -> dict[str, tuple[float, str]]:
        out = super().demands()
        if self.task_cpus > out["CPU"][0]:  # one retraining task at least
            out["CPU"] = (self.task_cpus, "task_cpus")
        return out


def _retrain_batch(
    batch: list[int], *, job: Retraining, num_cpus: float, control: bool
) -> tuple[list[int], np.ndarray]:
    from tda.effects.retrain import leave_group_out

    set_threads(num_cpus)
    d = job.data
    effects = leave_group_out(
        job.family,
        job.theta,
        d.X_train,
        d.y_train,
        d.X_target,
        d.y_target,
        job.l2_sum,
        job.rows(batch),
        control,
    )
    return batch, effects.numpy()


def retrain_without_groups(params: RetrainWithoutGroupsParams, ctx: StepContext) -> pl.DataFrame:
    data, family, theta, meta = trained_split(ctx, params.model, params.data)
    group_ids, index = index_members(ctx.table(params.groups).collect(), "group_id", data.train_ids, "group")
    job = Retraining(family, theta, data, meta["l2_sum"], index)
    control = params.control if params.control is not None else family.name == "causal_lm"
    work = functools.partial(_retrain_batch, job=job, num_cpus=params.task_cpus, control=control)
    t0 = time.perf_counter()
    actual = np.empty((len(data.target_ids), len(index)))
    todo = batches(len(index), params.groups_per_task)
    finished = 0
    for batch, effects in ctx.imap_unordered(work, todo, progress=False, num_cpus=params.task_cpus):
        actual[:, batch] = effects
        finished += len(batch)
        ctx.progress(finished, len(index))  # groups retrained / total
    ctx.log_metrics({"seconds": time.perf_counter() - t0, "retrains": len(index)})
    m, g = actual.shape
    return pl.DataFrame(
        {
            "target_id": np.repeat(data.target_ids.astype(np.int64), g),
            "group_id": np.tile(np.array(group_ids, dtype=object), m),
            "actual": actual.reshape(-1),
        },
        schema_overrides={"group_id": pl.String},
    )


STEP = StepKind("retrain_without_groups", RetrainWithoutGroupsParams, retrain_without_groups, version="1")
