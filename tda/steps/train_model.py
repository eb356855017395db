"""`train_model`: fit a model family on the training rows of a split table → a model artifact."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef
from tda.steps.common import l2_field, load_split, set_threads

Family = Literal["logistic_regression", "mlp"]


class TrainModelParams(StepParams):
    """Train a model on the `train` rows: L-BFGS on Σℓ + (n·l2/2)‖θ‖² to a gradient-norm tolerance."""

    kind: Literal["train_model"] = "train_model"
    data: StepRef = Field(description="A split table (tabular layout + `split`).")
    family: Family = Field("logistic_regression", description="The model family.")
    l2: float = l2_field()
    hidden: list[int] = Field(default_factory=lambda: [32], description="mlp: hidden layer widths.")
    activation: Literal["tanh", "gelu"] = Field(
        "tanh", description="mlp: activation (smooth, so Hessians exist)."
    )
    tol: float = Field(1e-10, gt=0, description="Stop when ‖∇L‖∞ ≤ tol · max(1, n).")
    max_iter: int = Field(10_000, gt=0, description="Most L-BFGS iterations.")
    seed: int | None = Field(None, description="Initialisation seed (mlp; null = the spec's seed).")


def build_family(params: TrainModelParams, n_features: int, n_classes: int):  # noqa: ANN201
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


def train_model(params: TrainModelParams, ctx: StepContext) -> None:
    import torch

    from tda.models import save_model

    set_threads(params.resources.num_cpus)
    data = load_split(ctx, params.data)
    n_classes = int(torch.cat([data.y_train, data.y_target]).max()) + 1
    family = build_family(params, data.X_train.shape[1], n_classes)
    t0 = time.perf_counter()
    fit = family.fit(data.X_train, data.y_train, l2_sum=data.n * params.l2)
    seconds = time.perf_counter() - t0
    meta = {"l2": params.l2, "n_train": data.n, "l2_sum": data.n * params.l2, "converged": fit.converged}
    save_model(ctx.model_dir, family, fit.theta, meta)
    with torch.no_grad():
        target_pred = family.losses(fit.theta, data.X_target, data.y_target)
        train_loss = family.losses(fit.theta, data.X_train, data.y_train).mean()
    ctx.log_metrics(
        {
            "train_loss": float(train_loss),
            "target_loss": float(target_pred.mean()),
            "grad_norm": fit.grad_norm,
            "iterations": fit.iterations,
            "parameters": fit.theta.numel(),
            "fit_seconds": seconds,
            "target_accuracy": _accuracy(family, fit.theta, data.X_target, data.y_target),
        }
    )


def _accuracy(family: Any, theta: Any, X: Any, y: Any) -> float:
    import torch

    if not hasattr(family, "predict_proba"):
        return float("nan")
    with torch.no_grad():
        return float((family.predict_proba(theta, X).argmax(dim=1) == y).double().mean())


STEP = StepKind("train_model", TrainModelParams, train_model, version="1")
