"""Ridge regression as a model family: ℓ(z, θ) = ½ (xᵀθ − y)². Quadratic, so one Newton step is exact:
the reference case for checking influence estimates against retraining."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tda.models.base import FitResult, ModelFamily


class LeastSquares(ModelFamily):
    """Linear regression with a squared loss; y is a float target, x includes any bias column."""

    name = "least_squares"

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features

    def example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (x @ theta - y) ** 2

    def init_params(self, seed: int) -> Tensor:
        return torch.zeros(self.n_features, dtype=torch.float64)

    def fit(
        self, X: Tensor, y: Tensor, l2_sum: float, init: Tensor | None = None, seed: int | None = None
    ) -> FitResult:
        """Closed form: (XᵀX + λ I) θ = Xᵀy."""
        A = X.T @ X + l2_sum * torch.eye(X.shape[1], dtype=X.dtype)  # (d, d)
        theta = torch.linalg.solve(A, X.T @ y.to(X.dtype))
        residual = A @ theta - X.T @ y.to(X.dtype)
        return FitResult(theta, 1, float(residual.norm()), True)

    def config(self) -> dict[str, Any]:
        return {"family": self.name, "n_features": self.n_features}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LeastSquares:
        return cls(config["n_features"])
