"""`subset_effects`: retrain on each subset and measure every target's loss (the datamodel experiments)."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import (
    Device,
    Precision,
    Retraining,
    batches,
    check_device,
    check_protocol,
    device_field,
    index_members,
    on_device,
    precision_field,
    set_threads,
    trained_split,
)


class SubsetEffectsParams(StepParams):
    """Train the model's family (same recipe and objective) on each subset; record each target's loss.

    Two protocols. *local*: every fine-tune warm-starts from the scored model θ* with one data order,
    the regime where first-order gradient methods are nearly exact by construction. *paper* (AirRep's):
    every fine-tune starts afresh from `base`, a model that never saw the pool, with its own data order
    (seeded by the spec's seed and the subset id); the scored `model` is then the base fine-tuned on the
    whole pool. Finished batches are kept in the step's scratch folder, so a re-run after a crash
    retrains only the subsets that had not finished.
    """

    non_semantic = StepParams.non_semantic | {
        "subsets_per_task",
        "task_cpus",
        "task_gpus",
        "device",
        "precision",
    }

    kind: Literal["subset_effects"] = "subset_effects"
    model: StepRef = Field(
        description="The scored model step: its family and recipe, θ* (local: the warm start), base losses."
    )
    data: StepRef = Field(description="The split table the model was trained on.")
    subsets: StepRef = Field(description="A sample_subsets step.")
    protocol: Literal["local", "paper"] = Field(
        "local",
        description="local: warm start from `model`, one data order; paper: start from `base`, a data "
        "order per subset.",
    )
    base: StepRef | None = Field(
        None,
        description="paper: the model every fine-tune starts from (a `checkpoint`, or a train_model on a "
        "corpus disjoint from the pool); same architecture and tokenizer as `model`.",
    )
    warm_start: bool = Field(
        True, description="local: start each retraining from θ* (else from the family's init)."
    )
    seed: int | None = Field(None, description="paper: seeds the subsets' data orders (null = the spec's).")
    recipe: dict[str, float | int] = Field(
        default_factory=dict,
        description="Overrides of the model's training recipe for these runs (e.g. {epochs: 2}).",
    )
    subsets_per_task: int = Field(8, gt=0, description="Subsets trained by one Ray task.")
    task_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each training task.")
    task_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved by each training task (fractional: tasks share a GPU)."
    )
    device: Device = device_field("a training task")
    precision: Precision = precision_field()

    @model_validator(mode="after")
    def _protocol(self) -> SubsetEffectsParams:
        check_protocol(self.protocol, self.base, "subset's fine-tune")
        if self.protocol == "paper" and "warm_start" in self.model_fields_set:
            raise ValueError("warm_start is for protocol local; the paper protocol starts from `base`")
        check_device(self.device, self.precision, self.task_gpus, "task_gpus")
        return self

    def demands(self) -> dict[str, tuple[float, str]]:
        out = super().demands()
        if self.task_cpus > out["CPU"][0]:  # one training task at least
            out["CPU"] = (self.task_cpus, "task_cpus")
        if self.task_gpus > out["GPU"][0]:
            out["GPU"] = (self.task_gpus, "task_gpus")
        return out


def train_batch(
    batch: list[int], *, job: Retraining, num_cpus: float, device: tuple[str, str, float]
) -> tuple[list[int], np.ndarray]:
    from tda.effects.retrain import subset_losses

    set_threads(num_cpus)
    on_device(job.family, *device)
    d = job.data
    losses = subset_losses(
        job.family,
        job.theta,
        d.X_train,
        d.y_train,
        d.X_target,
        d.y_target,
        job.l2_sum,
        job.rows(batch),
        warm_start=job.theta is not None,
        seeds=job.batch_seeds(batch),
    )
    return batch, losses.numpy()


def subset_effects(params: SubsetEffectsParams, ctx: StepContext) -> pl.DataFrame:
    data, family, theta, meta = trained_split(ctx, params.model, params.data)
    if params.recipe:
        family = with_recipe(family, params.recipe)
    subsets = ctx.table(params.subsets).filter(pl.col("purpose") != "target").collect()  # AirRep targets
    ids, index = index_members(subsets, "subset_id", data.train_ids, "subset")
    subset_ids = np.array(ids, dtype=np.int32)
    done = _finished_subsets(ctx.scratch_dir)
    remaining = [j for j, sid in enumerate(subset_ids) if int(sid) not in done]
    if params.protocol == "paper":
        start, seeds = base_theta(ctx, params, theta, meta), subset_seeds(params.seed or 0, subset_ids)
    else:
        start, seeds = (theta if params.warm_start else None), None
    job = Retraining(family, start, data, meta.get("l2_sum", 0.0), index, seeds)
    device = (params.device, params.precision, params.task_gpus)
    work = functools.partial(train_batch, job=job, num_cpus=params.task_cpus, device=device)
    todo = [[remaining[i] for i in chunk] for chunk in batches(len(remaining), params.subsets_per_task)]
    t0 = time.perf_counter()
    tasks = {"num_cpus": params.task_cpus} | ({"num_gpus": params.task_gpus} if params.task_gpus else {})
    finished = len(subset_ids) - len(remaining)
    ctx.progress(finished, len(subset_ids))
    for batch, losses in ctx.imap_unordered(work, todo, progress=False, **tasks):
        _save_batch(ctx.scratch_dir, subset_ids[batch], data.target_ids, losses)
        finished += len(batch)
        ctx.progress(finished, len(subset_ids))  # fine-tunes done / total
    seconds = time.perf_counter() - t0
    effects = pl.read_parquet(sorted(ctx.scratch_dir.glob("batch-*.parquet"))).sort(
        ["subset_id", "target_id"]
    )
    from tda.effects import check_finite_losses

    check_finite_losses(
        effects,
        f"step {ctx.name!r}",
        "the fine-tunes diverged; lower the learning rate or the epochs (recipe: {lr: …, epochs: …})",
    )
    _save_base_losses(family, theta, data, ctx.output_dir / "base_losses.parquet")
    ctx.log_metrics(
        {
            "seconds": seconds,
            "subsets_trained": len(remaining),
            "subsets_resumed": len(index) - len(remaining),
            "subsets_per_minute": 60 * len(remaining) / seconds if remaining else 0.0,
            **_signal(ctx, params, subsets, effects),
        }
    )
    return effects


def subset_seeds(seed: int, subset_ids: np.ndarray) -> list[int]:
    """The data-order seed of each subset's fine-tune: independent streams of (seed, subset id)."""
    return [int(np.random.SeedSequence([seed, int(s)]).generate_state(1)[0]) for s in subset_ids]


def base_theta(ctx: StepContext, params: SubsetEffectsParams, theta: Any, meta: dict[str, Any]) -> Any:
    """θ of `base`; ModelError unless it has the scored model's parameters and tokenizer."""
    from tda.errors import ModelError
    from tda.models import load_model

    base_family, base_theta, base_meta = load_model(ctx.input(params.base).model_dir)
    if base_theta.shape != theta.shape:
        raise ModelError(
            f"base {params.base!r} has {base_theta.numel():,} parameters but model {params.model!r} has "
            f"{theta.numel():,}; give the base the model was fine-tuned from"
        )
    if meta.get("tokenizer") and not _same_tokenizer(meta["tokenizer"], base_meta.get("tokenizer")):
        raise ModelError(
            f"base {params.base!r} and model {params.model!r} have different tokenizers; give the base "
            "the model was fine-tuned from"
        )
    return base_theta


def _same_tokenizer(a: str, b: str | None) -> bool:
    from tda.models.tokenizer import load_tokenizer

    return b is not None and load_tokenizer(Path(a)).get_vocab() == load_tokenizer(Path(b)).get_vocab()


def with_recipe(family: Any, recipe: dict[str, float | int]) -> Any:
    from tda.errors import ModelError

    config = family.config()
    unknown = sorted(set(recipe) - set(config) - {"family"})
    if unknown:
        raise ModelError(
            f"recipe: {family.name} has no setting {unknown[0]!r}; it has {', '.join(sorted(config))}"
        )
    if hasattr(family, "with_recipe") and set(recipe) <= set(family.RECIPE):
        return family.with_recipe(**recipe)  # a language model is not loaded again
    return type(family).from_config({**config, **recipe})


def _save_base_losses(family: Any, theta: Any, data: Any, path: Path) -> None:
    """The base model's loss on every target (for normalising effects), beside the effects table."""
    import torch

    with torch.no_grad():
        losses = family.losses(theta, data.X_target, data.y_target).numpy()
    pl.DataFrame(
        {"target_id": data.target_ids.astype(np.int64), "loss": losses.astype(np.float32)}
    ).write_parquet(path)


def _signal(
    ctx: StepContext, params: SubsetEffectsParams, subsets: pl.DataFrame, effects: pl.DataFrame
) -> dict:
    """Mean same-group signal over targets, when the data has a `group` column."""
    from tda.evaluation.signal import same_group_signal

    table = ctx.table(params.data)
    if "group" not in table.collect_schema().names():
        return {}
    groups = table.select("example_id", "group").drop_nulls().collect()
    if groups.is_empty():
        return {}
    rho = same_group_signal(subsets.select("subset_id", "example_id"), effects, groups)["spearman"]
    return {"same_group_signal": float(rho.drop_nans().mean() or float("nan"))}


def _finished_subsets(scratch: Path) -> set[int]:
    files = sorted(scratch.glob("batch-*.parquet"))
    return set(pl.read_parquet(files, columns=["subset_id"])["subset_id"].to_list()) if files else set()


def _save_batch(scratch: Path, subset_ids: np.ndarray, target_ids: np.ndarray, losses: np.ndarray) -> None:
    """One Parquet file per finished batch, renamed into place (a crash loses only batches in flight)."""
    j, m = losses.shape  # (subsets, targets)
    frame = pl.DataFrame(
        {
            "subset_id": np.repeat(subset_ids, m).astype(np.int32),
            "target_id": np.tile(target_ids.astype(np.int64), j),
            "loss": losses.reshape(-1).astype(np.float32),
        }
    )
    name = f"batch-{int(subset_ids[0]):06d}-{len(subset_ids)}"
    tmp = scratch / f".{name}.tmp"
    frame.write_parquet(tmp)
    tmp.rename(scratch / f"{name}.parquet")


STEP = StepKind("subset_effects", SubsetEffectsParams, subset_effects, version="1")
