"""`influence_scores`: per-example attribution scores of every training row for every target."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from pipelines import InputPath, StepContext, StepKind, StepRef
from tda.steps.common import (
    Device,
    Precision,
    check_device,
    damping_field,
    device_field,
    on_device,
    precision_field,
    set_threads,
    trained_split,
)
from tda.steps.embedding import EmbeddingStepParams

if TYPE_CHECKING:
    from tda.influence.solvers import SolverOptions
from tda.steps.train_airrep import check_encoder

GRADIENT_METHODS = ("if-exact", "if-cg", "if-lissa", "graddot", "gradcos")
FEATURE_ONLY = ("logra", "trak", "kfac", "ekfac")  # methods on gradient features (`features:`)


class InfluenceScoresParams(EmbeddingStepParams):
    """Scores (method, target_id, example_id, score): higher = the example helped the target."""

    embedding_methods = ("airrep", "repsim")

    kind: Literal["influence_scores"] = "influence_scores"
    model: StepRef | None = Field(None, description="A train_model step (the gradient methods).")
    data: StepRef = Field(description="The split table the model was trained on (or the corpus split).")
    method: Literal[
        "if-exact",
        "if-cg",
        "if-lissa",
        "graddot",
        "gradcos",
        "logra",
        "trak",
        "kfac",
        "ekfac",
        "airrep",
        "repsim",
    ] = Field(
        description="Influence function (1/n)∇ℓ_tᵀH̄⁻¹∇ℓ_z with an exact, CG or LiSSA inverse-HVP; the "
        "gradient dot product / cosine (full gradients, or `features`); on gradient features: logra "
        "(per-layer projected Gauss–Newton inverse), trak (the same over all features), kfac, ekfac; "
        "airrep = e(t)·e(z) of a trained AirRep; repsim = cosine of the untrained encoder's mean-pooled "
        "features."
    )
    features: StepRef | None = Field(
        None,
        description="A gradient_features step: graddot, gradcos, logra, trak, kfac, ekfac score its features "
        "(streamed top-k over its shards) instead of full gradients.",
    )
    relative_damping: float = Field(
        0.1, ge=0, description="Feature methods: damping × the mean eigenvalue of each curvature block."
    )
    score_tasks: int = Field(
        1, gt=0, description="Feature methods: Ray tasks that share the training shards."
    )
    label: str | None = Field(
        None, description="The `method` column of the scores (null = the method), e.g. ekfac-k256."
    )
    encoder: StepRef | None = Field(None, description="airrep: a train_airrep step.")
    untrained: bool = Field(
        False,
        description="airrep: score with the model the AirRep started from (its starting encoder, the "
        "identity projection, its starting temperature): the untrained baseline of the same recipe.",
    )
    encoder_path: InputPath | None = Field(
        None,
        description="airrep: a saved AirRep folder; repsim: a transformers encoder folder (null = MiniLM).",
    )
    mlflow_run: str | None = Field(
        None, description="airrep: the MLflow run id of a train_airrep step (its `airrep` artifact)."
    )
    max_tokens: int = Field(64, gt=0, description="repsim: tokens per example.")
    embed_workers: int = Field(1, gt=0, description="airrep/repsim: Ray Data actors that embed.")
    embed_batch_size: int = Field(128, gt=0, description="airrep/repsim: examples per encoder forward.")
    embed_gpus: float = Field(
        0.0,
        ge=0,
        description="airrep/repsim: GPUs reserved by each embedding actor (fractional: they share).",
    )
    device: Device = device_field("the step (gradient methods) or each embedding actor")
    precision: Precision = precision_field()
    damping: float = damping_field()
    top_k: int | None = Field(
        None, gt=0, description="Keep the k highest scores per target (null = all pairs)."
    )
    block_size: int = Field(256, gt=0, description="Targets scored per block (memory: block × n_train).")
    hvp: Literal["auto", "dense", "matrix_free"] = Field(
        "auto", description="Products with H̄: dense = Σ∇²ℓ built once (d ≤ 4096 under auto), else the HVP."
    )
    cg_tol: float = Field(1e-10, gt=0, description="if-cg: relative residual tolerance.")
    cg_max_iter: int = Field(1000, gt=0, description="if-cg: most iterations.")
    lissa_depth: int = Field(1000, gt=0, description="if-lissa: recursion depth.")
    lissa_scale: float | None = Field(
        None, gt=0, description="if-lissa: scale (null = 1.05 × λ_max by power iteration)."
    )
    lissa_batch_size: int | None = Field(
        None, gt=0, description="if-lissa: rows per HVP sample (null = full batch)."
    )
    lissa_repeats: int = Field(1, gt=0, description="if-lissa: independent runs averaged.")
    seed: int | None = Field(None, description="if-lissa minibatch seed (null = the spec's seed).")

    @model_validator(mode="after")
    def _sources(self) -> InfluenceScoresParams:
        given = [f for f in ("encoder", "encoder_path", "mlflow_run") if getattr(self, f) is not None]
        if self.method in FEATURE_ONLY and self.features is None:
            raise ValueError(
                f"method {self.method} scores gradient features: give `features:` (a gradient_features step)"
            )
        if self.features is not None:
            if self.method not in (*FEATURE_ONLY, "graddot", "gradcos"):
                raise ValueError(f"method {self.method} does not use `features`; drop it")
            if given:
                raise ValueError(f"method {self.method} uses `features`; drop {given[0]}")
        elif self.method in GRADIENT_METHODS:
            if self.model is None:
                raise ValueError(f"method {self.method} needs `model` (a train_model step)")
            if given:
                raise ValueError(f"method {self.method} uses `model`; drop {given[0]}")
        if self.untrained and self.method != "airrep":
            raise ValueError(
                f"untrained applies to method airrep (the start of a trained AirRep), not {self.method}"
            )
        elif self.method == "airrep" and len(given) != 1:
            raise ValueError("method airrep needs exactly one of encoder, encoder_path and mlflow_run")
        elif self.method == "repsim" and set(given) - {"encoder_path"}:
            raise ValueError("method repsim takes only encoder_path (an encoder folder; null = MiniLM)")
        if self.method in self.embedding_methods:
            check_device(self.device, self.precision, self.embed_gpus, "embed_gpus")
        else:
            check_device(self.device, self.precision, self.resources.num_gpus, "resources.num_gpus")
        return self

    def check_references(self, steps: Any) -> list[tuple[tuple[str | int, ...], str]]:
        from tda.steps.common import check_features_ref

        return check_features_ref(steps, self.features, self.model, self.data, self.method)

    @field_validator("encoder_path")
    @classmethod
    def _encoder_folder(cls, value: InputPath | None, info: Any) -> InputPath | None:
        if value is not None and info.data.get("method") == "repsim":
            check_encoder(value)
        return value

    def solver_options(self) -> SolverOptions | None:
        """The influence methods' solver, damping and products from these fields (None otherwise)."""
        from tda.influence.solvers import SolverOptions

        common: dict[str, Any] = {"damping": self.damping, "hvp": self.hvp}
        if self.method == "if-exact":
            return SolverOptions("exact", **common)
        if self.method == "if-cg":
            return SolverOptions("cg", tol=self.cg_tol, max_iter=self.cg_max_iter, **common)
        if self.method == "if-lissa":
            return SolverOptions(
                "lissa",
                depth=self.lissa_depth,
                scale=self.lissa_scale,
                batch_size=self.lissa_batch_size,
                repeats=self.lissa_repeats,
                seed=self.seed or 0,
                **common,
            )
        return None


def encoder_source(params: Any, ctx: StepContext) -> Any:
    """Where the embedding model of an airrep/repsim step comes from."""
    from tda.steps.embedding import EncoderSource

    if params.method == "repsim":
        return EncoderSource("repsim", params.encoder_path, params.max_tokens)
    if params.encoder is not None:
        path = ctx.input(params.encoder).model_dir
    elif params.mlflow_run is not None:
        path = ctx.mlflow_artifacts(params.mlflow_run, "airrep")
    else:
        path = params.encoder_path
    untrained = getattr(params, "untrained", False)  # group_influence shares this and has no untrained
    return EncoderSource("airrep-untrained" if untrained else "airrep", str(path))


def embedding_scores(params: InfluenceScoresParams, ctx: StepContext) -> pl.DataFrame:
    """airrep / repsim: embed on Ray Data, then blocked dot products (top-k per target if asked)."""
    from tda.airrep.score import score_frame
    from tda.steps.embedding import embed_split

    set_threads(max(1.0, params.resources.num_cpus))
    emb = embed_split(
        ctx,
        params.data,
        encoder_source(params, ctx),
        batch_size=params.embed_batch_size,
        workers=params.embed_workers,
        gpus_per_worker=params.embed_gpus,
        device=(params.device, params.precision),
        save_to=ctx.output_dir / "embeddings.parquet",
    )
    t0 = time.perf_counter()
    frame = score_frame(
        params.label or params.method,
        emb.target_ids,
        emb.targets,
        emb.train_ids,
        emb.train,
        top_k=params.top_k,
        block_size=params.block_size,
        cosine=params.method == "repsim",
    )
    score_seconds = time.perf_counter() - t0
    seconds = emb.seconds + score_seconds
    ctx.log_metrics(
        {
            "seconds": seconds,
            "embed_seconds": emb.seconds,
            "embed_wall_seconds": emb.wall_seconds,
            "texts_resumed": emb.resumed,
            "score_seconds": score_seconds,
            "examples_per_second": emb.count / seconds,
            "targets_per_second": len(emb.target_ids) / seconds,
        }
    )
    return frame


def feature_method_scores(params: InfluenceScoresParams, ctx: StepContext) -> pl.DataFrame:
    """A method on gradient features: fit the preconditioner, precondition the targets, then stream the
    training shards through top-k on `score_tasks` Ray tasks and merge."""
    from tda.influence import feature_scores as fs
    from tda.influence.topk import stream_scores

    features = features_of(ctx, params.features, params.model, params.data)
    fs.check_method(params.method, features, params.features)
    P, fit_seconds = fs.timed(fs.fit, params.method, features, params.relative_damping)
    (target_ids, targets), prep_seconds = fs.timed(fs.prepared_targets, params.method, features, P)
    label, cosine = params.label or params.method, params.method == "gradcos"
    t0 = time.perf_counter()
    if params.top_k is None:
        chunks = fs.read_chunks(features.files, "train")
        frame = pl.concat(list(stream_scores(label, target_ids, targets, chunks, normalize_train=cosine)))
    else:
        groups = [
            features.files[i :: params.score_tasks]
            for i in range(min(params.score_tasks, len(features.files)))
        ]
        work = functools.partial(
            fs.shard_topk,
            targets=targets,
            top_k=params.top_k,
            normalize=cosine,
            threads=params.resources.num_cpus,
        )
        parts = ctx.map(work, groups, num_cpus=params.resources.num_cpus)
        top = functools.reduce(lambda a, b: a.merge(b), parts)
        frame = top.frame(label, target_ids)
    score_seconds = time.perf_counter() - t0
    n, m, dim = features.n_train, len(target_ids), int(features.meta["dim"])
    seconds = fit_seconds + prep_seconds + score_seconds
    ctx.log_metrics(
        {
            "seconds": seconds,
            "fit_seconds": fit_seconds,
            "score_seconds": score_seconds,
            "pairs_per_second": n * m / score_seconds if score_seconds else 0.0,
            "gflops": 2 * n * m * dim / score_seconds / 1e9 if score_seconds else 0.0,
            "examples_per_second": (n + m) / seconds,
            "dim": dim,
        }
    )
    return frame


def features_of(ctx: StepContext, features: str, model: str | None, data: str) -> Any:
    """The features of step `features`; ModelError (one line, before any work) if they were made from
    another model or split than the ones this step names."""
    from tda.errors import ModelError
    from tda.influence.feature_store import load_features

    obj = ctx.input(features)
    made = obj.manifest.get("params", {})
    keys = obj.manifest.get("inputs", {})
    for field, step in (("model", model), ("data", data)):
        if step is not None and keys.get(made.get(field)) != ctx.inputs.get(step):
            raise ModelError(
                f"features {features!r} were made from {field} {made.get(field)!r}, not from {step!r}; "
                f"featurise {step!r} (a gradient_features step with {field}: {step})"
            )
    return load_features(obj.data_dir, obj.model_dir)


def influence_scores(params: InfluenceScoresParams, ctx: StepContext) -> pl.DataFrame:
    from tda.influence import example_scores

    if params.features is not None:
        return feature_method_scores(params, ctx)
    if params.method not in GRADIENT_METHODS:
        return embedding_scores(params, ctx)
    set_threads(params.resources.num_cpus)
    data, family, theta, meta = trained_split(ctx, params.model, params.data)
    on_device(family, params.device, params.precision, params.resources.num_gpus)
    t0 = time.perf_counter()
    frame, info = example_scores(
        params.method,
        family,
        theta,
        data.X_train,
        data.y_train,
        data.X_target,
        data.y_target,
        l2=meta["l2"],
        train_ids=data.train_ids,
        target_ids=data.target_ids,
        block_size=params.block_size,
        top_k=params.top_k,
        options=params.solver_options(),
    )
    seconds = time.perf_counter() - t0
    ctx.log_metrics(
        {
            "seconds": seconds,
            "targets_per_second": len(data.target_ids) / seconds,
            "examples_per_second": (data.n + len(data.target_ids)) / seconds,
            **{k: float(v) for k, v in info.items() if isinstance(v, int | float)},
        }
    )
    if params.label:
        frame = frame.with_columns(pl.lit(params.label, dtype=pl.String).alias("method"))
    return frame


# version 2: `label` names the scores of every method (version 1 applied it to feature methods only)
STEP = StepKind("influence_scores", InfluenceScoresParams, influence_scores, version="2")
