"""Group influence: first order (Koh et al. 2019), second order (Basu, You, Feizi 2020) and the
one-step Newton reference, for many groups and many targets at once.

Objective convention (see `tda.models.base`): L(θ) = Σ_i ℓ(z_i, θ) + (λ_sum/2)‖θ‖², λ_sum = n·l2 with n
the full training size; removing a group U removes its loss terms only. With A = H̄ + δI (δ = damping,
0 for the formulas as published), p = |U|/n, g_U = Σ_{z∈U} ∇ℓ(z) and H_U = Σ_{z∈U} ∇²ℓ(z), the change
of the parameters when U is removed is estimated as

    first order   Δθ₁ = (1/n) A⁻¹ g_U
    second order  Δθ₂ = (1−2p)/(1−p)² · (1/n) A⁻¹ g_U + 1/(1−p)² · (1/n²) A⁻¹ H_U A⁻¹ g_U
    Newton        Δθ  = (n A − H_U)⁻¹ g_U      (exact for least squares when δ = 0)

and its effect on a target x_t is ∇ℓ(x_t)ᵀ Δθ, the predicted rise of the target's loss when U is
removed: positive means the group helped the target. Second order equals Newton when H_U = p·n·A.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tda.errors import InfluenceError
from tda.influence.solvers import (
    FunctionOperator,
    HessianOperator,
    InverseHVP,
    SolverOptions,
    cg,
    cholesky_factor,
)
from tda.models.base import ModelFamily

NEWTON_DENSE_MAX_D = 4000


@dataclass
class GroupProblem:
    """What every estimate needs: the operator A, the groups, their gradient sums and sizes."""

    family: ModelFamily
    theta: Tensor  # (d,)
    X: Tensor  # (n, n_features)
    y: Tensor  # (n,)
    op: HessianOperator
    groups: list[Tensor]
    g: Tensor  # (G, d): g_U per group
    p: Tensor  # (G,): |U| / n

    @property
    def n(self) -> int:
        return self.op.n

    def second_order_coefficients(self) -> tuple[Tensor, Tensor]:
        """(1−2p)/(1−p)² and 1/((1−p)² n²), per group: (G,) each."""
        q = (1.0 - self.p) ** 2
        return (1.0 - 2.0 * self.p) / q, 1.0 / (q * self.n**2)


def group_problem(
    family: ModelFamily,
    theta: Tensor,
    X_train: Tensor,
    y_train: Tensor,
    groups: list[Tensor],
    l2: float,
    options: SolverOptions | None = None,
) -> GroupProblem:
    """Check the groups and compute g_U for all of them from one pass of per-example gradients; A has
    the options' damping and products."""
    theta = theta.detach()
    n = X_train.shape[0]
    checked = check_groups(groups, n)
    op = HessianOperator.of_training(family, theta, X_train, y_train, l2, options or SolverOptions())
    rows = torch.cat(checked)  # (Σ|U|,)
    unique, inverse = torch.unique(rows, return_inverse=True)
    with torch.no_grad():
        grads = family.per_example_grads(theta, X_train[unique], y_train[unique])  # (u, d)
    owner = torch.repeat_interleave(torch.arange(len(checked)), torch.tensor([len(u) for u in checked]))
    g = torch.zeros(len(checked), theta.shape[0], dtype=theta.dtype)
    g.index_add_(0, owner, grads[inverse].to(theta.dtype))  # (G, d)
    p = torch.tensor([len(u) / n for u in checked], dtype=theta.dtype)
    return GroupProblem(family, theta, X_train, y_train, op, checked, g, p)


def check_groups(groups: list[Tensor], n: int) -> list[Tensor]:
    """Groups as int64 index vectors into the n training rows: non-empty, distinct, fewer than n."""
    if len(groups) == 0:
        raise InfluenceError("no groups given; pass a list of index tensors into the training rows")
    checked = []
    for i, idx in enumerate(groups):
        idx = torch.as_tensor(idx).reshape(-1).long()
        if idx.numel() == 0:
            raise InfluenceError(f"group {i} is empty; drop it or give it training rows")
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise InfluenceError(f"group {i} has row indices outside [0, {n}); index the training rows")
        if torch.unique(idx).numel() != idx.numel():
            raise InfluenceError(f"group {i} repeats a training row; give each row once")
        if idx.numel() >= n:
            raise InfluenceError(f"group {i} holds all {n} training rows; removing it leaves nothing to fit")
        checked.append(idx)
    return checked


def _check_orders(orders: tuple[int, ...], newton: bool) -> None:
    if set(orders) - {1, 2}:
        raise InfluenceError(f"orders must be drawn from (1, 2), got {tuple(orders)}")
    if not orders and not newton:
        raise InfluenceError("nothing to compute: give orders=(1, 2) or newton=True")


def group_influence(
    family: ModelFamily,
    theta: Tensor,
    X_train: Tensor,
    y_train: Tensor,
    X_target: Tensor,
    y_target: Tensor,
    groups: list[Tensor],
    l2: float,
    orders: tuple[int, ...] = (1, 2),
    newton: bool = True,
    newton_dense_max_d: int = NEWTON_DENSE_MAX_D,
    info: dict[str, Any] | None = None,
    options: SolverOptions | None = None,
) -> dict[str, Tensor]:
    """Predicted effect of removing each group on each target's loss.

    Args:
        family, theta: the model family and its trained parameters (d,).
        X_train, y_train: all n training rows; `groups` index into them.
        X_target, y_target: the m targets.
        groups: G index tensors (distinct rows each).
        l2: the per-example ridge weight; λ_sum = n · l2.
        orders: which influence orders to compute (1 and/or 2).
        newton: also compute the one-step Newton reference.
        newton_dense_max_d: Newton systems are solved densely up to this d, by block CG above it.
        info: if given, filled with seconds per stage and the solver's info.
        options: the solver for A⁻¹ and its options, the damping δ ≥ 0 added to H̄ (also to the Newton
            systems, as n·δ) and the products with H̄ (see `SolverOptions`; default: exact, undamped).

    Returns:
        (m, G) float64 matrices under "if-order1", "if-order2", "newton" (those requested).

    Cost: with m ≤ G, one block solve of A⁻¹ [∇ℓ_t | g_U] (m + G columns; m for first order only) and
    one `group_hvps` call; with G < m, the Δθ of `parameter_changes` (G, then 2G columns) times ∇ℓ_t.
    """
    _check_orders(orders, newton)
    info = info if info is not None else {}
    options = options if options is not None else SolverOptions()
    start = time.perf_counter()
    prob = group_problem(family, theta, X_train, y_train, groups, l2, options)
    with torch.no_grad():
        T = family.per_example_grads(prob.theta, X_target, y_target).to(prob.theta.dtype)  # (m, d)
    info["seconds_grads"] = time.perf_counter() - start
    out: dict[str, Tensor] = {}
    if orders:
        inverse = InverseHVP(prob.op, options)
        if len(prob.groups) < T.shape[0]:  # fewer groups than targets: solve on the groups' side
            changes = _influence_changes(prob, orders, inverse, info)
            out.update({key: T @ delta.T for key, delta in changes.items()})  # (m, G) each
        else:
            out.update(_influence_effects(prob, T, orders, inverse, info))
    if newton:
        start = time.perf_counter()
        delta = newton_changes(prob, newton_dense_max_d, options)  # (G, d)
        out["newton"] = T @ delta.T  # (m, G)
        info["seconds_newton"] = time.perf_counter() - start
    return out


def _influence_effects(
    prob: GroupProblem, T: Tensor, orders: tuple[int, ...], inverse: InverseHVP, info: dict[str, Any]
) -> dict[str, Tensor]:
    """First and second order effects from one block solve A⁻¹ [∇ℓ_t | g_U] and one group-HVP call."""
    m = T.shape[0]
    B = torch.cat([T.T, prob.g.T], dim=1) if 2 in orders else T.T  # (d, m [+ G])
    sol, info["solver"] = inverse(B)
    S = sol[:, :m].T  # (m, d): s_t = A⁻¹ ∇ℓ_t
    first = S @ prob.g.T / prob.n  # (m, G)
    out = {"if-order1": first} if 1 in orders else {}
    if 2 in orders:
        start = time.perf_counter()
        U = sol[:, m:].T  # (G, d): u_U = A⁻¹ g_U
        with torch.no_grad():
            W = prob.family.group_hvps(prob.theta, prob.X, prob.y, prob.groups, U)  # (G, d): H_U u_U
        c1, c2 = prob.second_order_coefficients()
        out["if-order2"] = c1 * first + c2 * (S @ W.T)  # (m, G)
        info["seconds_group_hvps"] = time.perf_counter() - start
    return out


def parameter_changes(
    family: ModelFamily,
    theta: Tensor,
    X_train: Tensor,
    y_train: Tensor,
    groups: list[Tensor],
    l2: float,
    orders: tuple[int, ...] = (1, 2),
    newton: bool = True,
    newton_dense_max_d: int = NEWTON_DENSE_MAX_D,
    options: SolverOptions | None = None,
) -> dict[str, Tensor]:
    """The estimated Δθ (removing each group) per method: (G, d) under "if-order1", "if-order2",
    "newton". Arguments as in `group_influence`; second order costs a second block solve here."""
    _check_orders(orders, newton)
    options = options if options is not None else SolverOptions()
    prob = group_problem(family, theta, X_train, y_train, groups, l2, options)
    out: dict[str, Tensor] = {}
    if orders:
        out.update(_influence_changes(prob, orders, InverseHVP(prob.op, options), {}))
    if newton:
        out["newton"] = newton_changes(prob, newton_dense_max_d, options)
    return out


def _influence_changes(
    prob: GroupProblem, orders: tuple[int, ...], inverse: InverseHVP, info: dict[str, Any]
) -> dict[str, Tensor]:
    """First and second order Δθ (G, d): u_U = A⁻¹ g_U, then A⁻¹ H_U u_U for second order."""
    U, info["solver"] = inverse(prob.g.T)  # (d, G)
    U = U.T  # (G, d): u_U = A⁻¹ g_U
    out = {"if-order1": U / prob.n} if 1 in orders else {}
    if 2 in orders:
        start = time.perf_counter()
        with torch.no_grad():
            W = prob.family.group_hvps(prob.theta, prob.X, prob.y, prob.groups, U)  # (G, d): H_U u_U
        info["seconds_group_hvps"] = time.perf_counter() - start
        V, info["solver_second"] = inverse(W.T)  # (d, G)
        c1, c2 = prob.second_order_coefficients()
        out["if-order2"] = c1[:, None] * U / prob.n + c2[:, None] * V.T
    return out


def newton_changes(
    prob: GroupProblem, dense_max_d: int = NEWTON_DENSE_MAX_D, options: SolverOptions | None = None
) -> Tensor:
    """Δθ = (n A − H_U)⁻¹ g_U for every group: (G, d). Dense Cholesky per group when d ≤ dense_max_d,
    else one block CG whose column U applies v ↦ n A v − H_U v, to the options' tol and max_iter
    (cg's defaults unless the solver is cg: the other solvers take neither)."""
    d = prob.theta.shape[0]
    if d <= dense_max_d:
        return _newton_dense(prob)
    n, family, theta = prob.n, prob.family, prob.theta

    def matvec(V: Tensor) -> Tensor:  # V (d, G): column U gets its own H_U
        return n * prob.op.matvec(V) - family.group_hvps(theta, prob.X, prob.y, prob.groups, V.T).T

    op = FunctionOperator(matvec, d, theta.dtype, columnwise=False)
    options = options if options is not None else SolverOptions()
    delta, _ = cg(op, prob.g.T, tol=options.tol, max_iter=options.max_iter)  # (d, G)
    return delta.T


def _newton_dense(prob: GroupProblem) -> Tensor:
    nA = prob.n * prob.op.dense()  # (d, d)
    rows = []
    for i, idx in enumerate(prob.groups):
        with torch.no_grad():
            H_U = prob.family.hessian(prob.theta, prob.X[idx], prob.y[idx])  # (d, d)
        try:
            factor = cholesky_factor(nA - H_U)
        except InfluenceError as err:
            raise InfluenceError(f"Newton system of group {i}: {err}") from err
        rows.append(factor.solve(prob.g[i]))
    return torch.stack(rows)  # (G, d)


def feature_group_influence(
    train: Tensor,
    targets: Tensor,
    groups: list[Tensor],
    orders: tuple[int, ...] = (1, 2),
    newton: bool = True,
    relative_damping: float = 0.1,
) -> dict[str, Tensor]:
    """Group influence in a feature space (projected gradients φ, e.g. LoGra's), with the projected
    Gauss–Newton curvature: per example ∇²ℓ ≈ φφᵀ, so with Φ the (n, K) training features,

        H̄ = ΦᵀΦ / n + λI,   λ = relative_damping × tr(ΦᵀΦ / n) / K,   H_U = Φ_Uᵀ Φ_U,   g_U = Φ_Uᵀ 1,

    and the first-, second-order and Newton formulas of the module docstring with A = H̄, the effect
    on a target being φ_tᵀ Δθ̃. Holds Φ (n × K) and K × K matrices: for n·K and K of projected sizes.

    Args:
        train: (n, K) training features; `groups` index its rows.
        targets: (m, K) target features.

    Returns:
        (m, G) float64 under "if-order1", "if-order2", "newton" (those requested).
    """
    _check_orders(orders, newton)
    Phi, T = train.double(), targets.double()
    n, K = Phi.shape
    groups = check_groups(groups, n)
    F = Phi.T @ Phi / n
    A = F + (relative_damping * float(torch.diagonal(F).mean()) or 1e-12) * torch.eye(K, dtype=F.dtype)
    chol = torch.linalg.cholesky(A)
    g = torch.stack([Phi[idx].sum(0) for idx in groups])  # (G, K)
    p = torch.tensor([len(idx) / n for idx in groups], dtype=torch.float64)
    S = torch.cholesky_solve(T.T, chol)  # (K, m): A⁻¹ φ_t
    first = S.T @ g.T / n  # (m, G)
    out = {"if-order1": first} if 1 in orders else {}
    if 2 in orders:
        U = torch.cholesky_solve(g.T, chol).T  # (G, K): A⁻¹ g_U
        W = torch.stack([Phi[idx].T @ (Phi[idx] @ u) for idx, u in zip(groups, U, strict=True)])  # H_U u_U
        q = (1.0 - p) ** 2
        out["if-order2"] = (1.0 - 2.0 * p) / q * first + (1.0 / (q * n**2)) * (S.T @ W.T)
    if newton:
        delta = torch.stack(
            [
                torch.linalg.solve(n * A - Phi[idx].T @ Phi[idx], g_u)
                for idx, g_u in zip(groups, g, strict=True)
            ]
        )  # (G, K)
        out["newton"] = T @ delta.T
    return out
