"""`gradient_features`: per-example gradient features of a model's training and target rows, in shards.

The split's rows (train first, then targets, each in example-id order) are cut into shards of
`shard_rows`; Ray tasks (`task_cpus`, `task_gpus`) featurise `shards_per_task` shards each (the model is
loaded once per task) and return them, and the step writes each shard to its scratch folder as it
arrives: a run killed mid-way keeps its finished shards, and the next run featurises only the rest.
Over training rows, LoGra's pass also sums the projected Kronecker factors (K-FAC, EK-FAC). See
`tda.influence.features` for the projections and `tda.influence.feature_store` for the layout.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import (
    Device,
    Precision,
    batches,
    check_device,
    device_field,
    on_device,
    precision_field,
    set_threads,
    trained_split,
)


class GradientFeaturesParams(StepParams):
    """Projected per-example gradients (LoGra, TRAK, or the full gradient) of the rows of a split."""

    non_semantic = StepParams.non_semantic | {
        "shard_rows",
        "shards_per_task",
        "batch_size",
        "task_cpus",
        "task_gpus",
        "device",
    }

    kind: Literal["gradient_features"] = "gradient_features"
    model: StepRef = Field(
        description="The model step whose gradients are featurised (train_model, checkpoint)."
    )
    data: StepRef = Field(description="The split table of its rows (train and target rows are featurised).")
    projection: Literal["logra", "trak", "identity"] = Field(
        "logra",
        description="logra: per-layer projections of inputs and output gradients (causal LMs); trak: a dense "
        "random projection of the full gradient; identity: the full gradient (tiny models, tests).",
    )
    k_in: int = Field(16, gt=0, description="logra: projected input dimension per layer.")
    k_out: int = Field(16, gt=0, description="logra: projected output-gradient dimension per layer.")
    k: int = Field(256, gt=0, description="trak: the feature dimension.")
    layers: list[str] = Field(
        default_factory=lambda: ["*"], description="logra: name patterns (fnmatch) of the linear layers used."
    )
    exclude: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="logra: name patterns of linear layers left out."
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="How features are stored.")
    seed: int | None = Field(None, description="Seeds the random projections (null = the spec's seed).")
    shard_rows: int = Field(4096, gt=0, description="Rows per stored shard (the unit of resumption).")
    shards_per_task: int = Field(2, gt=0, description="Shards featurised by one Ray task.")
    batch_size: int = Field(32, gt=0, description="Rows per backward pass.")
    task_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each featurising task.")
    task_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each featurising task (fractional).")
    device: Device = device_field("a featurising task")
    precision: Precision = precision_field()

    @model_validator(mode="after")
    def _devices(self) -> GradientFeaturesParams:
        check_device(self.device, self.precision, self.task_gpus, "task_gpus")
        return self

    def demands(self) -> dict[str, tuple[float, str]]:
        out = super().demands()
        out["CPU"] = (max(out["CPU"][0], self.task_cpus), "task_cpus")
        if self.task_gpus > out["GPU"][0]:
            out["GPU"] = (self.task_gpus, "task_gpus")
        return out

    def to_projection(self) -> Any:
        from tda.influence.features import Projection

        return Projection(
            self.projection,
            self.seed or 0,
            self.k,
            self.k_in,
            self.k_out,
            tuple(self.layers),
            tuple(self.exclude),
        )


def _featurise_shards(
    shards: list[dict[str, Any]], *, family: Any, theta: Any, params: GradientFeaturesParams
) -> list[dict[str, Any]]:
    """Features (and, on training rows, LoGra's factor sums) of each shard, in a Ray task."""
    import torch

    from tda.influence.features import FactorSums, featurize

    set_threads(params.task_cpus)
    on_device(family, params.device, params.precision, params.task_gpus)
    projection = params.to_projection()
    out = []
    for shard in shards:
        t0 = time.perf_counter()
        sums = FactorSums()
        train = torch.tensor(shard["train"])  # a writable copy (the shard's arrays are read-only)
        parts = [
            featurize(
                family, theta, shard["X"][train], shard["y"][train], projection, params.batch_size, sums
            ),
            featurize(family, theta, shard["X"][~train], shard["y"][~train], projection, params.batch_size),
        ]
        features = _in_rows(parts, train)
        out.append({"index": shard["index"], "features": features, "sums": sums})
        out[-1]["seconds"] = time.perf_counter() - t0  # featurising only: no task start, no model load
    return out


def _in_rows(parts: list[Any], train: Any) -> Any:
    """The train and target features back in the shard's row order."""
    import torch

    feats = torch.empty(len(train), parts[0].shape[1])
    feats[train] = parts[0]
    feats[~train] = parts[1]
    return feats


def gradient_features(params: GradientFeaturesParams, ctx: StepContext) -> None:
    from tda.influence.feature_store import save_meta, shard_files
    from tda.influence.features import feature_dim

    data, family, theta, meta = trained_split(ctx, params.model, params.data, same_rows=False)
    projection = params.to_projection()
    dim = feature_dim(family, projection)  # a bad layer pattern or k: one line, before any work
    shards = _shards(data, params.shard_rows)
    done = {int(p.stem.split("-")[1]) for p in shard_files(ctx.scratch_dir)}
    todo = [s for s in shards if s["index"] not in done]
    work = functools.partial(_featurise_shards, family=family, theta=theta, params=params)
    groups = [[todo[i] for i in chunk] for chunk in batches(len(todo), params.shards_per_task)]
    tasks = {"num_cpus": params.task_cpus} | ({"num_gpus": params.task_gpus} if params.task_gpus else {})
    t0, compute = time.perf_counter(), 0.0
    total = sum(len(s["ids"]) for s in shards)
    finished = total - sum(len(s["ids"]) for s in todo)
    ctx.progress(finished, total)
    for results in ctx.imap_unordered(work, groups, progress=False, **tasks):
        for result in results:
            compute += result["seconds"]
            _save_shard(ctx.scratch_dir, shards[result["index"]], result, params.dtype)
            finished += len(shards[result["index"]]["ids"])
        ctx.progress(finished, total)  # examples featurised / total
    seconds = time.perf_counter() - t0
    sums = _collect(ctx, shards)
    layout = _layout(family, projection, dim)
    save_meta(ctx.model_dir, _record(params, projection, layout, dim, data, meta), sums)
    rows = sum(len(s["ids"]) for s in todo)
    ctx.log_metrics(
        {
            "seconds": seconds,
            "examples_per_second": rows / seconds if rows else 0.0,
            # the tasks' featurising seconds, summed (without task starts and model loads): per task
            "featurise_seconds": compute,
            "examples_per_task_second": rows / compute if compute else 0.0,
            "shards_featurised": len(todo),
            "shards_resumed": len(shards) - len(todo),
            "dim": dim,
        }
    )


def _shards(data: Any, size: int) -> list[dict[str, Any]]:
    """The rows (train, then targets) cut into shards: ids, split labels, encoded X and y."""

    ids = np.concatenate([data.train_ids, data.target_ids]).astype(np.int64)
    train = np.concatenate([np.ones(data.n, bool), np.zeros(len(data.target_ids), bool)])
    X, y = _stacked(data.X_train, data.X_target, 0), _stacked(data.y_train, data.y_target, -100)
    return [
        {"index": i, "ids": ids[s], "train": train[s], "X": X[s], "y": y[s]}
        for i, s in enumerate(slice(lo, lo + size) for lo in range(0, len(ids), size))
    ]


def _stacked(a: Any, b: Any, pad: int) -> Any:
    """Rows of a and b in one tensor; token rows of different widths are right-padded (pads carry no
    loss and, with causal attention, change nothing before them)."""
    import torch
    import torch.nn.functional as F

    if a.dim() == 2 and b.dim() == 2 and a.shape[1] != b.shape[1] and a.dtype == torch.long:
        width = max(a.shape[1], b.shape[1])
        a, b = (F.pad(t, (0, width - t.shape[1]), value=pad) for t in (a, b))
    return torch.cat([a, b])


def _save_shard(scratch: Path, shard: dict[str, Any], result: dict[str, Any], dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    from tda.influence.feature_store import write_shard

    sums = result["sums"]
    tensors = {f"A/{k}": v for k, v in sums.A.items()} | {f"S/{k}": v for k, v in sums.S.items()}
    tensors["tokens"] = torch.tensor([sums.tokens])
    tmp = scratch / f".sums-{shard['index']:05d}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, scratch / f"sums-{shard['index']:05d}.safetensors")  # before the shard: it marks done
    splits = ["train" if t else "target" for t in shard["train"]]
    write_shard(
        scratch / f"part-{shard['index']:05d}.parquet", shard["ids"], splits, result["features"], dtype
    )


def _collect(ctx: StepContext, shards: list[dict[str, Any]]) -> Any:
    """Move the finished shards into the step's table and add up their factor sums."""
    from safetensors.torch import load_file

    from tda.influence.features import FactorSums

    total = FactorSums()
    for shard in shards:
        name = f"{shard['index']:05d}"
        tensors = load_file(str(ctx.scratch_dir / f"sums-{name}.safetensors"))
        part = FactorSums(
            {k[2:]: v for k, v in tensors.items() if k.startswith("A/")},
            {k[2:]: v for k, v in tensors.items() if k.startswith("S/")},
            int(tensors["tokens"][0]),
        )
        total.add(part)
        _link(ctx.scratch_dir / f"part-{name}.parquet", ctx.data_dir / f"part-{name}.parquet")
    return total


def _link(source: Path, target: Path) -> None:
    """`target` with `source`'s bytes, `source` left in place (a hard link, else a copy): the scratch
    stays whole until the object commits, so a run killed while collecting (or a dead driver's step
    still collecting) leaves the next run every finished shard."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or no hard links
        shutil.copyfile(source, target)


def _layout(family: Any, projection: Any, dim: int) -> list[list[Any]]:
    from tda.influence.features import linear_layers

    if projection.kind != "logra":
        return [["all", 1, dim]]
    return [
        [layer.name, projection.k_out, projection.k_in] for layer in linear_layers(family.model, projection)
    ]


def _record(
    params: Any, projection: Any, layout: Any, dim: int, data: Any, meta: dict[str, Any]
) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "projection": asdict(projection),
        "layout": layout,
        "dim": dim,
        "dtype": params.dtype,
        "n_train": int(data.n),
        "n_target": len(data.target_ids),
        "model": params.model,
        "l2": meta.get("l2", 0.0),
    }


STEP = StepKind("gradient_features", GradientFeaturesParams, gradient_features, version="2")  # 2: binary rows
