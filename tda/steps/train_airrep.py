"""`train_airrep`: train the AirRep encoder from subset effects, data-parallel on Ray Train.

The step reads the corpus split, the subsets and the effects, checks them (one line per problem, before
any training), then runs `tda.airrep.train.train` on `num_workers` Ray Train workers (torch DDP-style
gradient all-reduce: gloo on CPU, nccl on GPU). Rank 0 writes checkpoints into the step's scratch
folder in the store every `checkpoint_every` steps; a worker that dies is restarted by Ray Train
(`max_failures`) and the group resumes from the latest checkpoint, and so does a re-run of a failed step.
With a URI store (scratch folders are node-local) the workers are kept on the step's node.

Output: the model folder (transformers encoder + projection safetensors, loadable with
`tda.airrep.model.AirRep.load`, also logged to MLflow as the step run's `airrep` artifact) and the
table of target roles `target_id int64, split_id int64, role str ∈ {fit, val, heldout, unused}`: join
it with an LDS table to report held-out targets apart from the ones AirRep was trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field, field_validator, model_validator

from pipelines import InputPath, Reporter, Resources, StepContext, StepKind, StepParams, StepRef
from tda.steps.common import set_threads


def encoder_field(description: str) -> Any:
    return Field(None, description=description)


def check_encoder(value: InputPath | None) -> InputPath | None:
    """Spec-time check that a local encoder folder is a transformers encoder (one line otherwise)."""
    from tda.airrep.model import check_encoder_folder

    if value is not None and "://" not in value:
        check_encoder_folder(value)
    return value


class TrainAirRepParams(StepParams):
    """AirRep: encoder + projection trained with a weighted RankNet loss to rank subsets per target."""

    non_semantic = StepParams.non_semantic | {
        "num_workers",
        "cpus_per_worker",
        "use_gpu",
        "max_failures",
        "checkpoint_every",
    }
    needs_ray_dashboard = True  # its workers run under Ray Train

    kind: Literal["train_airrep"] = "train_airrep"
    data: StepRef = Field(description="The corpus split the experiments used (prompt/response).")
    subsets: StepRef = Field(description="The sample_subsets step of the experiments (its `fit` subsets).")
    effects: StepRef = Field(description="The subset_effects step: every fit subset's loss on the targets.")
    encoder: InputPath | None = Field(
        None, description="A transformers encoder folder (null = the shipped all-MiniLM-L6-v2)."
    )
    max_tokens: int = Field(64, gt=0, description="Tokens per example (longer texts are truncated).")
    trainable: Literal["all", "last_n_layers", "projection"] = Field(
        "last_n_layers", description="What is trained; a frozen body's output is computed once and cached."
    )
    n_layers: int = Field(1, gt=0, description="last_n_layers: how many of the encoder's last layers.")
    steps: int = Field(200, gt=0, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the encoder layers.")
    projection_lr: float | None = Field(
        None, gt=0, description="Learning rate of the projection (null = lr)."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps, then linear decay to 0.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    anchor: float = Field(
        0.0, ge=0, description="L2 pull of the trained weights towards their start (L2-SP; 0 = off)."
    )
    episodes_per_step: int = Field(
        2, gt=0, description="Episodes per step (the global batch); a multiple of num_workers."
    )
    targets_per_episode: int = Field(16, gt=0, description="Fit targets sampled per episode.")
    subsets_per_episode: int = Field(8, ge=2, description="Train subsets ranked per episode.")
    heldout_targets: float = Field(
        0.5, ge=0, lt=1, description="Share of targets never trained on nor used for selection (reported)."
    )
    val_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of targets and of fit subsets kept for validation (best checkpoint).",
    )
    eval_every: int = Field(25, gt=0, description="Validation LDS every this many steps.")
    checkpoint_every: int = Field(25, gt=0, description="Checkpoint (and report to Ray Train) every N steps.")
    batch_size: int = Field(128, gt=0, description="Examples per encoder forward pass.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (data parallel).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (also its torch threads).")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl); else CPU (gloo).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts Ray Train allows.")
    labels: Literal["all", "own_split"] = Field(
        "all",
        description="Which (target, subset) pairs are labels: all = every fit target on every train subset "
        "(targets are never in a pool, so each pair is a valid effect); own_split = a split's subsets on "
        "its own targets only (the AirRep paper's layout).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="τ of the attention Σ softmax(|s|/τ)·s over raw dot products (the start value when "
        "learned); folded into the embeddings as 1/√τ, so every scorer uses it.",
    )
    learn_temperature: bool = Field(False, description="Train τ along with the projection.")
    normalize: bool = Field(
        False, description="L2-normalise the projected embeddings (then τ scales cosines)."
    )
    seed: int | None = Field(None, description="Seed of the episodes (null = the spec's seed).")
    role_seed: int | None = Field(
        None,
        description="Seed of the target and subset roles (null = the spec's seed): independent of `seed`, "
        "so a new training seed keeps the held-out targets.",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(num_cpus=0),
        description="Ray resources of the driver task (the workers reserve their own).",
    )

    _check_encoder = field_validator("encoder")(check_encoder)

    @model_validator(mode="after")
    def _fractions(self) -> TrainAirRepParams:
        if self.heldout_targets + self.val_fraction >= 1:
            raise ValueError("heldout_targets + val_fraction must leave some fit targets (sum < 1)")
        if self.episodes_per_step % self.num_workers:
            raise ValueError(
                f"episodes_per_step ({self.episodes_per_step}) must be a multiple of num_workers "
                f"({self.num_workers}) so every worker has the same share"
            )
        return self

    def check_references(self, steps: Any) -> list[tuple[tuple[str | int, ...], str]]:
        from tda.steps.common import check_effects_ref

        return check_effects_ref(steps, self.effects, self.subsets)

    def demands(self) -> dict[str, tuple[float, str]]:
        out = super().demands()
        cpu, _ = out["CPU"]
        out["CPU"] = (cpu + self.num_workers * self.cpus_per_worker, "num_workers")
        if self.use_gpu:
            out["GPU"] = (out["GPU"][0] + self.num_workers, "num_workers")
        return out

    def train_config(self) -> dict[str, Any]:
        from tda.airrep.train import TrainConfig

        keys = [name for name in TrainConfig.__dataclass_fields__ if name != "seed"]
        return {k: getattr(self, k) for k in keys} | {"seed": self.seed or 0}

    @property
    def roles_seed(self) -> int:
        return self.role_seed if self.role_seed is not None else (self.seed or 0)


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the encoder, train (resuming from the latest checkpoint), rank 0 saves."""
    import ray
    import ray.train
    import torch

    from tda.airrep.model import AirRep
    from tda.airrep.train import TrainConfig, train

    set_threads(config["cpus_per_worker"])
    torch.manual_seed(0)
    _quiet_reports()
    rank = ray.train.get_context().get_world_rank()
    exp = ray.get(config["experiments"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    model = AirRep.from_encoder(config["encoder"], config["max_tokens"]).to(device)
    scratch = Path(config["scratch"])
    t0 = time.perf_counter()
    state = train(
        model,
        exp,
        TrainConfig(**config["train"]),
        checkpoint_dir=scratch / "checkpoints",
        report=ray.train.report,
        device=device,
        on_step=_live(config["reporter"], config["train"]["steps"]) if rank == 0 else None,
    )
    if rank == 0:
        tmp = scratch / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.cpu().save(tmp, initial=config["initial"])
        summary = {
            "history": state.history,
            "best_step": state.best_step,
            "best_val_lds": state.best_lds,
            "resumed_from": state.resumed_from,
            "temperature": model.temperature,
            "seconds": time.perf_counter() - t0,
        }
        (tmp / "history.json").write_text(json.dumps(summary))
        shutil.rmtree(scratch / "final", ignore_errors=True)
        tmp.rename(scratch / "final")


def _quiet_reports() -> None:
    """Ray Train logs an INFO line per `ray.train.report` through a logger named after its file
    (outside the `ray` hierarchy that LoggingConfig sets); progress lines replace them."""
    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _live(reporter: Reporter, steps: int) -> Callable[[dict[str, float]], None]:
    """Send each training step to the driver: steps done / total, and its metrics for MLflow."""

    unsent: list[tuple[str, float, int | None]] = []
    sent_at = [0.0]

    def send(record: dict[str, float]) -> None:
        step = int(record["step"])
        reporter.progress(step, steps)
        unsent.extend((k, float(v), step) for k, v in record.items() if k != "step")
        if step == steps or time.monotonic() - sent_at[0] >= reporter.interval:  # one message a second
            reporter.metrics(unsent)
            unsent.clear()
            sent_at[0] = time.monotonic()

    return send


def _this_node(per_worker: dict[str, float], num_workers: int) -> dict[str, str]:
    """A label selector that keeps the Ray Train workers on this task's node.

    Rank 0 writes checkpoints and the final model into the step's scratch folder, which this task then
    reads. With the store on a shared path every node sees that folder; with a URI store it is on the
    node's local disk, so the workers must run beside this task (data parallelism across nodes needs
    a shared-path store). ValueError when this node cannot hold them: they would wait forever.
    """
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    have = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
    for name, amount in per_worker.items():
        if amount * num_workers > have.get(name, 0.0):
            need, there = amount * num_workers, have.get(name, 0.0)
            raise ValueError(
                f"train_airrep: with a URI store the {num_workers} workers run on the step's node, which has "
                f"{there:g} {name} for {need:g} needed; lower num_workers, or keep the store on a path "
                "every node mounts so the workers can spread over nodes"
            )
    return {"ray.io/node-id": node_id}


def train_airrep(params: TrainAirRepParams, ctx: StepContext) -> pl.DataFrame:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tda.airrep.model import default_encoder_path

    # a quiet run: Ray Train's print patch logs every worker print a second time, and its preemption
    # watcher (for cloud spot instances) logs an error line at every start; either can be set back on
    for name in ("RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        os.environ.setdefault(name, "0")
    from tda.airrep.experiments import build_experiments
    from tda.effects import check_finite_losses

    effects = ctx.table(params.effects).collect()
    if "loss" in effects.columns:  # a missing column is named by build_experiments
        check_finite_losses(
            effects,
            f"effects {params.effects!r}",
            "re-measure them (subset_effects with a smaller recipe lr) or drop those rows",
        )
    exp = build_experiments(
        ctx.table(params.data).collect(),
        ctx.table(params.subsets).collect(),
        effects,
        heldout_targets=params.heldout_targets,
        val_fraction=params.val_fraction,
        seed=params.roles_seed,
        labels=params.labels,
    )
    encoder = str(params.encoder or default_encoder_path())
    initial = {"encoder": params.encoder, "temperature": params.temperature, "normalize": params.normalize}
    scratch = ctx.scratch_dir
    config = {
        "experiments": ray.put(exp),
        "encoder": encoder,
        "max_tokens": params.max_tokens,
        "cpus_per_worker": params.cpus_per_worker,
        "use_gpu": params.use_gpu,
        "scratch": str(scratch),
        "initial": initial,
        "train": params.train_config(),
        "reporter": ctx.reporter,
    }
    per_worker = {"CPU": params.cpus_per_worker, **({"GPU": 1} if params.use_gpu else {})}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=params.num_workers,
            use_gpu=params.use_gpu,
            resources_per_worker=per_worker,
            label_selector=None if ctx.store.is_local else _this_node(per_worker, params.num_workers),
        ),
        run_config=RunConfig(
            name=f"airrep-{ctx.key[:16]}",
            storage_path=str(scratch / "ray_train"),
            failure_config=FailureConfig(max_failures=params.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # not its per-report INFO lines
        ),
    )
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    final = scratch / "final"
    summary = json.loads((final / "history.json").read_text())
    shutil.copytree(final, ctx.model_dir, dirs_exist_ok=True)
    shutil.copytree(final, ctx.artifacts_dir / "airrep", dirs_exist_ok=True)
    for record in summary["history"]:
        for name in ("loss", "val_lds", "grad_norm"):
            if name in record and np.isfinite(record[name]):
                ctx.log_metric(name, record[name], record["step"])
    ctx.log_metrics(
        {
            "seconds": seconds,
            "train_seconds": summary["seconds"],
            "best_step": summary["best_step"],
            "best_val_lds": summary["best_val_lds"],
            "resumes": len(summary["resumed_from"]),
            "fit_targets": int((exp.target_role == "fit").sum()),
            "heldout_targets": int((exp.target_role == "heldout").sum()),
            "train_subsets": int((exp.subset_role == "train").sum()),
            "labels": int(
                np.isfinite(exp.labels[exp.subset_role == "train"][:, exp.target_role == "fit"]).sum()
            ),
            "temperature": summary.get("temperature", params.temperature),
        }
    )
    return pl.DataFrame(
        {
            "target_id": exp.target_ids.astype(np.int64),
            "split_id": exp.target_split.astype(np.int64),
            "role": exp.target_role.astype(str),
        }
    )


STEP = StepKind("train_airrep", TrainAirRepParams, train_airrep, version="2")
