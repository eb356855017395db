"""L2-regularised multiclass logistic (softmax) regression with closed-form gradients and Hessians.

θ is the row-major flattening of W (n_classes, n_features + 1); the last column is the bias, which is
regularised like every other weight, so the objective Σ_i ℓ_i + (λ_sum/2)‖θ‖² is strictly convex for
λ_sum > 0. With x̃ = [x; 1], p = softmax(W x̃) and e_y the one-hot label:

    ℓ(z, θ) = logsumexp(W x̃) − (W x̃)_y,     ∇ℓ = (p − e_y) ⊗ x̃,     ∇²ℓ = (diag(p) − p pᵀ) ⊗ x̃ x̃ᵀ.

Every quantity is computed for all examples at once; nothing loops over examples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tda.errors import ModelError
from tda.models.base import FitResult, ModelFamily, minimize_objective

HESSIAN_CHUNK_ELEMENTS = 2**22  # bound on the (rows, (D+1)²) block built per step of `hessian`


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """−log softmax(logits)_y for logits (C,) or (n, C) and int64 labels () or (n,); vmap-friendly."""
    picked = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # () or (n,)
    return torch.logsumexp(logits, dim=-1) - picked


def check_examples(family: str, n_features: int, n_classes: int, X: Tensor, y: Tensor) -> None:
    """Raise ModelError when X (n, n_features) and int labels y (n,) in [0, n_classes) do not fit."""
    if X.dim() != 2 or X.shape[1] != n_features:
        raise ModelError(
            f"{family}: X has shape {tuple(X.shape)} but the model takes (n, {n_features}); "
            f"build it with n_features={X.shape[-1]}"
        )
    if y.shape != (X.shape[0],):
        raise ModelError(f"{family}: y has shape {tuple(y.shape)}; expected ({X.shape[0]},), one label a row")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ModelError(
            f"{family}: labels span [{int(y.min())}, {int(y.max())}] but n_classes={n_classes}; "
            f"build it with n_classes={int(y.max()) + 1}"
        )


def augment(X: Tensor) -> Tensor:
    """[x; 1] for x (n_features,) or X (n, n_features)."""
    return torch.cat([X, X.new_ones(*X.shape[:-1], 1)], dim=-1)  # (..., n_features + 1)


class LogisticRegression(ModelFamily):
    """Softmax regression over n_classes with a regularised bias; labels are int64 in [0, n_classes)."""

    name = "logistic_regression"

    def __init__(self, n_features: int, n_classes: int, tol: float = 1e-10, max_iter: int = 10_000) -> None:
        if n_features < 1 or n_classes < 2:
            raise ModelError(
                f"{self.name}: n_features={n_features}, n_classes={n_classes}; "
                "need at least 1 feature and 2 classes"
            )
        self.n_features, self.n_classes = n_features, n_classes
        self.tol, self.max_iter = tol, max_iter

    @property
    def n_params(self) -> int:
        return self.n_classes * (self.n_features + 1)

    # --- the model -------------------------------------------------------------------
    def weights(self, theta: Tensor) -> Tensor:
        return theta.view(self.n_classes, self.n_features + 1)  # (C, D+1)

    def logits(self, theta: Tensor, X: Tensor) -> Tensor:
        """W x̃ for x (n_features,) -> (C,) or X (n, n_features) -> (n, C)."""
        return augment(X) @ self.weights(theta).T

    def predict_proba(self, theta: Tensor, X: Tensor) -> Tensor:
        """Class probabilities softmax(W x̃): (n, C)."""
        return torch.softmax(self.logits(theta, X), dim=-1)

    def example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(self.logits(theta, x), y)

    def init_params(self, seed: int) -> Tensor:
        return torch.zeros(self.n_params, dtype=torch.float64)

    # --- closed forms ------------------------------------------------------------------
    def losses(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return cross_entropy(self.logits(theta, X), y)  # (n,)

    def residuals(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """p − e_y for every example: (n, C)."""
        onehot = torch.nn.functional.one_hot(y, self.n_classes).to(X.dtype)  # (n, C)
        return self.predict_proba(theta, X) - onehot

    def per_example_grads(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        R = self.residuals(theta, X, y)  # (n, C)
        return (R[:, :, None] * augment(X)[:, None, :]).reshape(len(y), self.n_params)  # (n, d)

    def total_grad(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Σ_i ∇ℓ_i: (d,)."""
        return (self.residuals(theta, X, y).T @ augment(X)).reshape(-1)

    @staticmethod
    def _softmax_curvature(P: Tensor, U: Tensor) -> Tensor:
        """(diag(p_i) − p_i p_iᵀ) u_i for every row i: P (m, C), U = V x̃ (m, C, k) -> (m, C, k)."""
        PU = P[:, :, None] * U  # (m, C, k)
        return PU - P[:, :, None] * PU.sum(dim=1, keepdim=True)

    def hvp(self, theta: Tensor, X: Tensor, y: Tensor, V: Tensor) -> Tensor:
        Xt, P = augment(X), self.predict_proba(theta, X)  # (n, D+1), (n, C)
        Vk = V if V.dim() == 2 else V[:, None]  # (d, k)
        Vm = Vk.reshape(self.n_classes, self.n_features + 1, -1)  # (C, D+1, k)
        A = self._softmax_curvature(P, torch.einsum("nj,cjk->nck", Xt, Vm))  # (n, C, k)
        out = torch.einsum("nck,nj->cjk", A, Xt).reshape(self.n_params, -1)  # (d, k)
        return out if V.dim() == 2 else out[:, 0]

    def hessian(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ as (d, d), accumulated over row chunks."""
        C, D1 = self.n_classes, self.n_features + 1
        Xt, P = augment(X), self.predict_proba(theta, X)  # (n, D+1), (n, C)
        chunk = max(1, HESSIAN_CHUNK_ELEMENTS // (D1 * D1))
        H = X.new_zeros(C * C, D1 * D1)
        for start in range(0, len(Xt), chunk):
            p, xt = P[start : start + chunk], Xt[start : start + chunk]  # (m, C), (m, D+1)
            S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (m, C, C)
            outer = xt[:, :, None] * xt[:, None, :]  # (m, D+1, D+1)
            H += S.reshape(len(p), -1).T @ outer.reshape(len(p), -1)  # (C², (D+1)²)
        return H.view(C, C, D1, D1).permute(0, 2, 1, 3).reshape(self.n_params, self.n_params)

    def group_hvps(self, theta: Tensor, X: Tensor, y: Tensor, groups: list[Tensor], V: Tensor) -> Tensor:
        """H_U v_U for every group at once: rows of all groups concatenated, each against its own v."""
        if not groups:
            return V.new_zeros(0, self.n_params)
        sizes = torch.tensor([len(idx) for idx in groups])
        rows = torch.cat([idx.long() for idx in groups])  # (m,)
        group_of_row = torch.repeat_interleave(torch.arange(len(groups)), sizes)  # (m,)
        Xt, P = augment(X[rows]), self.predict_proba(theta, X[rows])  # (m, D+1), (m, C)
        Vm = V.view(len(groups), self.n_classes, self.n_features + 1)[group_of_row]  # (m, C, D+1)
        U = torch.einsum("mcj,mj->mc", Vm, Xt)[:, :, None]  # (m, C, 1)
        A = self._softmax_curvature(P, U)[:, :, 0]  # (m, C)
        contributions = (A[:, :, None] * Xt[:, None, :]).reshape(len(rows), -1)  # (m, d)
        return V.new_zeros(len(groups), self.n_params).index_add_(0, group_of_row, contributions)

    # --- training ----------------------------------------------------------------------
    def fit(
        self, X: Tensor, y: Tensor, l2_sum: float, init: Tensor | None = None, seed: int | None = None
    ) -> FitResult:
        """Minimise Σ_i ℓ_i + (l2_sum/2)‖θ‖² from `init` (else zeros) to ‖∇L‖_∞ ≤ tol·max(1, n).

        L-BFGS-B first; if it stops short (its line search cannot resolve the last decrease of L),
        Newton steps on the dense Hessian finish the job, so retrained optima are precise.
        """
        X, y = X.to(torch.float64), y.long()
        check_examples(self.name, self.n_features, self.n_classes, X, y)

        def value_and_grad(theta: Tensor) -> tuple[float, Tensor]:
            value = self.losses(theta, X, y).sum() + 0.5 * l2_sum * theta.dot(theta)
            return float(value), self.total_grad(theta, X, y) + l2_sum * theta

        def objective_hessian(theta: Tensor) -> Tensor:
            return self.hessian(theta, X, y) + l2_sum * torch.eye(self.n_params, dtype=torch.float64)

        theta0 = self.init_params(0) if init is None else init.detach().to(torch.float64).clone()
        gtol = self.tol * max(1, len(y))
        return minimize_objective(value_and_grad, theta0, gtol, self.max_iter, objective_hessian)

    # --- configuration -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "tol": self.tol,
            "max_iter": self.max_iter,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LogisticRegression:
        return cls(
            config["n_features"],
            config["n_classes"],
            config.get("tol", 1e-10),
            config.get("max_iter", 10_000),
        )
