"""`train_model`: fit a model family on the training rows of a split table → a model artifact.

Tabular families (logistic regression, MLP) minimise Σℓ + (n·l2/2)‖θ‖² with L-BFGS to a gradient-norm
tolerance; the causal LM family trains with AdamW (weight decay l2) for `epochs` passes, on the
response tokens of prompt/response pairs encoded with a `train_tokenizer` step's tokenizer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import (
    Device,
    Precision,
    check_device,
    device_field,
    l2_field,
    load_split,
    on_device,
    precision_field,
    set_threads,
    text_encoder,
)

Family = Literal["logistic_regression", "mlp", "causal_lm"]


class TrainModelParams(StepParams):
    """Train a model on the `train` rows of a split table (tabular or text corpus)."""

    non_semantic = StepParams.non_semantic | {"device"}

    kind: Literal["train_model"] = "train_model"
    data: StepRef = Field(description="A split table (tabular layout or corpus, with `split`).")
    family: Family = Field("logistic_regression", description="The model family.")
    l2: float = l2_field()
    hidden: list[int] = Field(default_factory=lambda: [32], description="mlp: hidden layer widths.")
    activation: Literal["tanh", "gelu"] = Field("tanh", description="mlp: activation (smooth).")
    tol: float = Field(1e-10, gt=0, description="Tabular: stop when ‖∇L‖∞ ≤ tol · max(1, n).")
    max_iter: int = Field(10_000, gt=0, description="Tabular: most L-BFGS iterations.")
    tokenizer: StepRef | None = Field(
        None, description="causal_lm: a train_tokenizer step (a new model; not with `init`)."
    )
    init: StepRef | None = Field(
        None,
        description="causal_lm: fine-tune this model step (a `checkpoint` or another train_model) with "
        "its own architecture and tokenizer; the size fields are then ignored.",
    )
    architecture: Literal["gpt2", "llama"] = Field("gpt2", description="causal_lm: the transformer built.")
    n_layer: int = Field(2, gt=0, description="causal_lm: transformer blocks.")
    n_embd: int = Field(64, gt=0, description="causal_lm: width.")
    n_head: int = Field(2, gt=0, description="causal_lm: attention heads.")
    max_len: int = Field(128, gt=1, description="causal_lm: tokens per example (longer ones are cut).")
    epochs: int = Field(3, gt=0, description="causal_lm: passes over the training rows.")
    lr: float = Field(3e-4, gt=0, description="causal_lm: AdamW learning rate.")
    batch_size: int = Field(16, gt=0, description="causal_lm: examples per optimiser step.")
    seed: int | None = Field(None, description="Initialisation and data-order seed (null = the spec's seed).")
    device: Device = device_field()
    precision: Precision = precision_field()

    @model_validator(mode="after")
    def _lm_needs_tokenizer(self) -> TrainModelParams:
        if self.family == "causal_lm" and (self.tokenizer is None) == (self.init is None):
            raise ValueError(
                "family causal_lm needs exactly one of `tokenizer:` (a train_tokenizer step: a new model) "
                "and `init:` (a model step to fine-tune, which brings its tokenizer)"
            )
        if self.family != "causal_lm" and self.init is not None:
            raise ValueError("`init:` (fine-tune a model step) is for family causal_lm")
        check_device(self.device, self.precision, self.resources.num_gpus, "resources.num_gpus")
        return self


def build_family(params: TrainModelParams, n_features: int, n_classes: int) -> Any:
    from tda.models import MLP, LogisticRegression

    if params.family == "mlp":
        return MLP(
            n_features,
            n_classes,
            hidden=list(params.hidden),
            activation=params.activation,
            tol=params.tol,
            max_iter=params.max_iter,
            seed=params.seed or 0,
        )
    return LogisticRegression(n_features, n_classes, tol=params.tol, max_iter=params.max_iter)


def lm_family(
    tokenizer: Any, max_len: int, params: TrainModelParams | None = None, pretrained: str | None = None
) -> Any:
    """A causal LM for `tokenizer`: a new one of `params`' sizes and recipe, or the folder
    `pretrained` as it is (the recipe's defaults)."""
    from tda.models.causal_lm import CausalLM

    sizes: dict[str, Any] = {}
    if params is not None:
        sizes = {"architecture": params.architecture, "n_layer": params.n_layer, "n_embd": params.n_embd}
        sizes |= {"n_head": params.n_head, "epochs": params.epochs, "lr": params.lr}
        sizes |= {"batch_size": params.batch_size, "seed": params.seed or 0}
    return CausalLM(
        vocab_size=len(tokenizer),
        n_positions=max_len,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        pretrained=pretrained,
        **sizes,
    )


def _lm_start(params: TrainModelParams, ctx: StepContext) -> tuple[Any, Any, Path]:
    """(family, θ to start from or None, tokenizer folder) of a causal LM: new, or `init`'s."""
    from tda.models import load_model
    from tda.models.tokenizer import load_tokenizer

    if params.init is None:
        folder = ctx.input(params.tokenizer).model_dir
        return lm_family(load_tokenizer(folder), params.max_len, params), None, folder
    base, theta, meta = load_model(ctx.input(params.init).model_dir)
    recipe = {
        "epochs": params.epochs,
        "lr": params.lr,
        "batch_size": params.batch_size,
        "seed": params.seed or 0,
    }
    return base.with_recipe(**recipe), theta, Path(meta["tokenizer"])


def train_model(params: TrainModelParams, ctx: StepContext) -> None:
    from tda.models import save_model

    set_threads(params.resources.num_cpus)
    meta: dict[str, Any] = {"l2": params.l2}
    init = None
    if params.family == "causal_lm":
        from tda.models.tokenizer import load_tokenizer

        family, init, tokenizer = _lm_start(params, ctx)
        on_device(family, params.device, params.precision, params.resources.num_gpus)
        data = load_split(ctx, params.data, text_encoder(tokenizer, params.max_len))
        load_tokenizer(tokenizer).save_pretrained(str(ctx.model_dir))  # beside the weights
        meta.update(tokenizer=".", max_len=params.max_len)
    else:
        data = load_split(ctx, params.data)
        n_classes = int(max(data.y_train.max(), data.y_target.max())) + 1
        family = build_family(params, data.X_train.shape[1], n_classes)
    t0 = time.perf_counter()
    fit = family.fit(data.X_train, data.y_train, l2_sum=data.n * params.l2, init=init)
    seconds = time.perf_counter() - t0
    meta.update(n_train=data.n, l2_sum=data.n * params.l2, converged=fit.converged)
    save_model(ctx.model_dir, family, fit.theta, meta)
    ctx.log_metrics(
        {
            **_losses(family, fit.theta, data),
            "grad_norm": fit.grad_norm,
            "iterations": fit.iterations,
            "parameters": fit.theta.numel(),
            "fit_seconds": seconds,
        }
    )


def _losses(family: Any, theta: Any, data: Any) -> dict[str, float]:
    import torch

    with torch.no_grad():
        out = {
            "train_loss": float(family.losses(theta, data.X_train, data.y_train).mean()),
            "target_loss": float(family.losses(theta, data.X_target, data.y_target).mean()),
        }
        if hasattr(family, "predict_proba") and data.y_target.dim() == 1:
            predicted = family.predict_proba(theta, data.X_target).argmax(dim=1)
            out["target_accuracy"] = float((predicted == data.y_target).double().mean())
    return out


STEP = StepKind("train_model", TrainModelParams, train_model, version="2")  # 2: LMs as transformers folders
