"""A small fully connected classifier: x -> [Linear -> tanh|gelu] * len(hidden) -> Linear -> softmax.

θ is one flat float64 vector holding, layer by layer, the weight (out, in) row-major and then the bias
(out,). `layers` cuts it into views by slicing, so torch.func's grad, jvp and vmap in the base class
differentiate through `example_loss` directly; the activation is smooth so every Hessian exists.
Objective and stopping rule are the ones of the logistic family; the weights are non-convex, so a fit
converges to a local minimum that depends on the seed of `init_params`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tda.errors import ModelError
from tda.models.base import FitResult, ModelFamily, minimize_objective
from tda.models.logistic import check_examples, cross_entropy

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "gelu": F.gelu}
NEWTON_MAX_PARAMS = 5000  # above this, a fit that stopped short is not Newton-polished (dense Hessian)
HVP_COLUMNS = 64  # Hessian columns built per batched HVP when forming the dense Hessian


class MLP(ModelFamily):
    """Multilayer perceptron classifier with L2 on every weight and bias; labels int64 in [0, n_classes)."""

    name = "mlp"

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        hidden: Sequence[int] = (32,),
        activation: str = "tanh",
        tol: float = 1e-8,
        max_iter: int = 5000,
        seed: int = 0,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ModelError(
                f"{self.name}: activation {activation!r} is unknown; use one of {sorted(ACTIVATIONS)}"
            )
        if n_features < 1 or n_classes < 2 or any(h < 1 for h in hidden):
            raise ModelError(
                f"{self.name}: n_features={n_features}, n_classes={n_classes}, hidden={list(hidden)}; "
                "need at least 1 feature, 2 classes and positive hidden widths"
            )
        self.n_features, self.n_classes, self.hidden = n_features, n_classes, [int(h) for h in hidden]
        self.activation, self.tol, self.max_iter, self.seed = activation, tol, max_iter, seed
        widths = [n_features, *self.hidden, n_classes]
        self.shapes = list(zip(widths[1:], widths[:-1], strict=True))  # (out, in) per layer
        self.n_params = sum(o * i + o for o, i in self.shapes)

    # --- the model -------------------------------------------------------------------
    def layers(self, theta: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(weight (out, in), bias (out,)) views of θ, layer by layer."""
        out, offset = [], 0
        for o, i in self.shapes:
            weight = theta[offset : offset + o * i].view(o, i)
            bias = theta[offset + o * i : offset + o * i + o]
            out.append((weight, bias))
            offset += o * i + o
        return out

    def logits(self, theta: Tensor, X: Tensor) -> Tensor:
        """Class scores for x (n_features,) -> (C,) or X (n, n_features) -> (n, C)."""
        act = ACTIVATIONS[self.activation]
        *hidden, (w_out, b_out) = self.layers(theta)
        h = X
        for weight, bias in hidden:
            h = act(h @ weight.T + bias)  # (..., width)
        return h @ w_out.T + b_out

    def predict_proba(self, theta: Tensor, X: Tensor) -> Tensor:
        """Class probabilities: (n, C)."""
        return torch.softmax(self.logits(theta, X), dim=-1)

    def example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(self.logits(theta, x), y)

    def init_params(self, seed: int) -> Tensor:
        """Weights ~ N(0, 1/fan_in) (LeCun, suited to tanh), biases 0; deterministic in `seed`."""
        generator = torch.Generator().manual_seed(seed)
        parts = []
        for o, i in self.shapes:
            parts.append(torch.randn(o * i, generator=generator, dtype=torch.float64) / i**0.5)
            parts.append(torch.zeros(o, dtype=torch.float64))
        return torch.cat(parts)  # (d,)

    # --- training ----------------------------------------------------------------------
    def dense_hessian(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Σ_i ∇²ℓ_i (d, d) from batched HVPs against blocks of identity columns (bounded memory)."""
        eye = torch.eye(self.n_params, dtype=torch.float64)
        blocks = [
            self.hvp(theta, X, y, eye[:, start : start + HVP_COLUMNS])  # (d, k)
            for start in range(0, self.n_params, HVP_COLUMNS)
        ]
        H = torch.cat(blocks, dim=1)  # (d, d)
        return 0.5 * (H + H.T)

    def fit(
        self, X: Tensor, y: Tensor, l2_sum: float, init: Tensor | None = None, seed: int | None = None
    ) -> FitResult:
        """Full-batch L-BFGS-B on Σ_i ℓ_i + (l2_sum/2)‖θ‖² to ‖∇L‖_∞ ≤ tol·max(1, n), from `init` or
        `init_params(seed)`; Newton-polished near a minimum when it stops short and d ≤ NEWTON_MAX_PARAMS."""
        X, y = X.to(torch.float64), y.long()
        check_examples(self.name, self.n_features, self.n_classes, X, y)

        def value_and_grad(theta: Tensor) -> tuple[float, Tensor]:
            theta = theta.detach().requires_grad_(True)
            value = cross_entropy(self.logits(theta, X), y).sum() + 0.5 * l2_sum * theta.dot(theta)
            (gradient,) = torch.autograd.grad(value, theta)
            return float(value.detach()), gradient

        def objective_hessian(theta: Tensor) -> Tensor:
            return self.dense_hessian(theta, X, y) + l2_sum * torch.eye(self.n_params, dtype=torch.float64)

        theta0 = self.init_params(self.seed) if init is None else init.detach().to(torch.float64).clone()
        gtol = self.tol * max(1, len(y))
        polish = objective_hessian if self.n_params <= NEWTON_MAX_PARAMS else None
        return minimize_objective(value_and_grad, theta0, gtol, self.max_iter, polish)

    # --- configuration -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "tol": self.tol,
            "max_iter": self.max_iter,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MLP:
        return cls(
            config["n_features"],
            config["n_classes"],
            hidden=config.get("hidden", (32,)),
            activation=config.get("activation", "tanh"),
            tol=config.get("tol", 1e-8),
            max_iter=config.get("max_iter", 5000),
            seed=config.get("seed", 0),
        )
