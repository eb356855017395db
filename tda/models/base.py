"""The model-family interface (like kronfluence's Task): train, per-example losses, gradients, HVPs.

Parameters are one flat float64 vector θ of length d. The objective of every family is

    L(θ) = Σ_i ℓ(z_i, θ) + (λ_sum / 2) ‖θ‖²,      λ_sum = n_full · l2, fixed at the full-data n,

so removing examples removes their loss terms only, and H̄ = (Σ_i ∇²ℓ_i + λ_sum I) / n_full.
A family defines `example_loss` (one example) and `fit`; per-example gradients, Hessian-vector
products and dense Hessians come from torch.func, and a family may override them with closed forms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, vmap


@dataclass(frozen=True)
class FitResult:
    """A trained parameter vector and how the optimiser got there."""

    theta: Tensor  # (d,)
    iterations: int
    grad_norm: float  # ‖∇L(θ)‖ at the end (the regularised objective)
    converged: bool


class ModelFamily(ABC):
    """Base of the model families: subclasses set `name` and implement the abstract methods
    `example_loss`, `fit`, `init_params` and `config`/`from_config`."""

    name: str = "base"

    # --- to implement ----------------------------------------------------------
    @abstractmethod
    def example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """ℓ(z, θ) of one example: x (n_features,), y () → a scalar."""

    @abstractmethod
    def init_params(self, seed: int) -> Tensor:
        """A starting θ (d,)."""

    @abstractmethod
    def fit(
        self, X: Tensor, y: Tensor, l2_sum: float, init: Tensor | None = None, seed: int | None = None
    ) -> FitResult:
        """Minimise Σ_i ℓ(z_i, θ) + (l2_sum/2)‖θ‖² over the given examples, from `init` (else the
        family's initialisation); `seed` sets the data order of stochastic recipes (full-batch
        optimisers ignore it)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-ready hyperparameters that rebuild this family with `from_config`."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> ModelFamily:
        """The family that `config()` describes."""

    # --- derived (override for speed) -------------------------------------------
    def losses(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Per-example losses (n,)."""
        return vmap(self.example_loss, in_dims=(None, 0, 0))(theta, X, y)

    def objective(self, theta: Tensor, X: Tensor, y: Tensor, l2_sum: float) -> Tensor:
        return self.losses(theta, X, y).sum() + 0.5 * l2_sum * theta.dot(theta)

    def per_example_grads(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """∇_θ ℓ(z_i, θ) for every example: (n, d)."""
        return vmap(grad(self.example_loss), in_dims=(None, 0, 0))(theta, X, y)

    def hvp(self, theta: Tensor, X: Tensor, y: Tensor, V: Tensor) -> Tensor:
        """(Σ_i ∇²ℓ(z_i, θ)) V for V of shape (d,) or (d, k); no regulariser, no graph kept."""

        def total_grad(t: Tensor) -> Tensor:
            return grad(lambda s: self.losses(s, X, y).sum())(t)

        def one(v: Tensor) -> Tensor:
            return jvp(total_grad, (theta,), (v,))[1]

        with torch.no_grad():
            return one(V) if V.dim() == 1 else vmap(one, in_dims=1, out_dims=1)(V)

    def hessian(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        """Σ_i ∇²ℓ(z_i, θ) as a dense (d, d) matrix (for small d), no regulariser."""
        with torch.no_grad():
            return hessian(lambda t: self.losses(t, X, y).sum())(theta)

    def group_hvps(self, theta: Tensor, X: Tensor, y: Tensor, groups: list[Tensor], V: Tensor) -> Tensor:
        """H_U v_U for each group U (rows of X indexed by groups[g]) and its own vector V[g]: (G, d)."""
        return torch.stack([self.hvp(theta, X[idx], y[idx], V[g]) for g, idx in enumerate(groups)])


# --- shared training loop ------------------------------------------------------------
ValueAndGrad = Callable[[Tensor], tuple[float, Tensor]]  # θ (d,) -> (L(θ), ∇L(θ) (d,))


def minimize_objective(
    value_and_grad: ValueAndGrad,
    theta0: Tensor,
    gtol: float,
    max_iter: int,
    hessian: Callable[[Tensor], Tensor] | None = None,
    max_newton: int = 20,
) -> FitResult:
    """Minimise a smooth objective until ‖∇L‖_∞ ≤ gtol: L-BFGS-B, then Newton steps if it stopped short.

    L-BFGS-B's line search fails once the decrease of L falls below its rounding error, which can
    happen before the gradient is as small as asked; the effects measured by retraining are small
    differences of losses, so a run that stopped short is polished with Newton steps on the dense
    Hessian `hessian(θ)` of the whole objective (regulariser included) when one is given.

    Args:
        value_and_grad: θ (d,) float64 -> (L(θ), ∇L(θ) (d,)).
        theta0: the starting point (d,).
        gtol: the target for the largest absolute gradient entry.
        max_iter: the most L-BFGS-B iterations.
        hessian: θ -> ∇²L(θ) (d, d); None = no Newton polish.
        max_newton: the most Newton steps.

    Returns:
        The final θ, L-BFGS-B iterations plus Newton steps, ‖∇L‖₂, and whether ‖∇L‖_∞ ≤ gtol.
    """

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, g = value_and_grad(torch.from_numpy(x.copy()))
        return value, g.numpy().copy()

    result = scipy.optimize.minimize(
        fun,
        theta0.detach().to(torch.float64).numpy().copy(),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": gtol, "ftol": 0.0, "maxiter": max_iter, "maxcor": 30},
    )
    theta = torch.from_numpy(result.x.copy())
    _, g = value_and_grad(theta)
    steps = 0
    if hessian is not None and g.abs().max() > gtol:
        theta, g, steps = newton_polish(value_and_grad, hessian, theta, gtol, max_newton)
    return FitResult(theta, int(result.nit) + steps, float(g.norm()), bool(g.abs().max() <= gtol))


def newton_polish(
    value_and_grad: ValueAndGrad,
    hessian: Callable[[Tensor], Tensor],
    theta: Tensor,
    gtol: float,
    max_steps: int,
) -> tuple[Tensor, Tensor, int]:
    """Damped Newton steps from θ until ‖∇L‖_∞ ≤ gtol, a step stops shrinking ‖∇L‖₂, or ∇²L is not
    positive definite (a non-convex model away from a minimum). Returns (θ, ∇L(θ), steps taken)."""
    _, g = value_and_grad(theta)
    for step in range(max_steps):
        if g.abs().max() <= gtol:
            return theta, g, step
        chol, info = torch.linalg.cholesky_ex(hessian(theta))  # (d, d)
        if int(info) != 0:
            return theta, g, step
        direction = -torch.cholesky_solve(g[:, None], chol)[:, 0]  # (d,)
        for halving in range(20):
            candidate = theta + 0.5**halving * direction
            _, g_candidate = value_and_grad(candidate)
            if g_candidate.norm() < g.norm():
                break
        else:
            return theta, g, step
        theta, g = candidate, g_candidate
    return theta, g, max_steps
