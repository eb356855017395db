"""Inverse Hessian-vector products: solve A X = B for a block B (d, k), with A = H̄ + δI.

H̄ = (Σ_i ∇²ℓ_i + λ_sum I) / n is the mean Hessian of the regularised objective (see
`tda.models.base`); the damping δ ≥ 0 is added on top in every solver, so δ > 0 makes a singular or
indefinite H̄ usable at the price of a bias towards (1/δ)·B. Three solvers share one front, `solve`:

- ``exact``: a Cholesky factorisation of the dense A (small d), reusable for many right-hand sides;
- ``cg``: conjugate gradient run for every column at once, each with its own step sizes;
- ``lissa``: the LiSSA recursion h ← B + h − A h / scale, optionally with minibatch Hessians.

Every solver runs under `torch.no_grad()`: no autograd graph is kept, so memory stays flat however
many iterations run, and nothing returned requires grad.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from tda.errors import InfluenceError
from tda.models.base import ModelFamily

SOLVERS = ("exact", "cg", "lissa")
_OPTIONS = {
    "exact": (),
    "cg": ("tol", "max_iter"),
    "lissa": ("depth", "scale", "repeats", "batch_size", "seed", "power_iters"),
}
_SINGULAR_FIX = "set damping > 0 (e.g. 1e-3) or l2 > 0"


class LinearOperator(Protocol):
    """A symmetric d × d operator applied to blocks: `matvec(V)` for V (d,) or (d, k)."""

    dim: int
    dtype: torch.dtype

    def matvec(self, V: Tensor) -> Tensor: ...


@dataclass
class FunctionOperator:
    """A `LinearOperator` from a function, e.g. v ↦ n·A v − H_U v for the Newton systems.

    `columnwise=False` says that column j of a block gets its own operator (fn must see the whole
    block), so conjugate gradient may not drop converged columns from the product.
    """

    fn: Callable[[Tensor], Tensor]
    dim: int
    dtype: torch.dtype = torch.float64
    columnwise: bool = True

    def matvec(self, V: Tensor) -> Tensor:
        with torch.no_grad():
            return self.fn(V)


HVP_MODES = ("auto", "dense", "matrix_free")
DENSE_HVP_MAX_D = 4096


class HessianOperator:
    """A = (Σ_i ∇²ℓ(z_i, θ) + λ_sum I) / n + δ I over the training rows (X, y), applied without a graph.

    Args:
        family: the model family (its `hvp` and `hessian` give Σ_i ∇²ℓ_i without the regulariser).
        theta: the trained parameters (d,).
        X: training inputs (n, n_features); y: their labels (n,).
        l2_sum: λ_sum = n_full · l2, the regulariser of the objective.
        n: the training-set size that H̄ is a mean over (default: the rows of X).
        damping: δ ≥ 0 added to the diagonal.
        hvp: how full-batch products are formed: "matrix_free" (the family's HVP every time),
            "dense" (Σ∇²ℓ built once, then a (d, d) matmul per product), or "auto" (dense when
            d ≤ 4096, i.e. at most 128 MiB, where building it costs about as much as a few block HVPs).
            Minibatch products (`rows`) are always matrix-free.
    """

    def __init__(
        self,
        family: ModelFamily,
        theta: Tensor,
        X: Tensor,
        y: Tensor,
        l2_sum: float,
        n: int | None = None,
        damping: float = 0.0,
        hvp: str = "auto",
    ) -> None:
        if hvp not in HVP_MODES:
            raise InfluenceError(f"hvp must be one of {', '.join(HVP_MODES)}, got {hvp!r}")
        if damping < 0:
            raise InfluenceError(f"damping must be >= 0, got {damping}; use 0 for none or e.g. 1e-3")
        self.family, self.theta, self.X, self.y = family, theta.detach(), X, y
        self.l2_sum, self.damping = float(l2_sum), float(damping)
        self.n = int(n if n is not None else X.shape[0])
        self.dim, self.dtype = self.theta.shape[0], self.theta.dtype
        self.use_dense = hvp == "dense" or (hvp == "auto" and self.dim <= DENSE_HVP_MAX_D)
        self._hessian_sum: Tensor | None = None

    @property
    def shift(self) -> float:
        """The multiple of the identity in A: λ_sum / n + δ."""
        return self.l2_sum / self.n + self.damping

    def matvec(self, V: Tensor, rows: Tensor | None = None) -> Tensor:
        """A V for V (d,) or (d, k); with `rows`, the Hessian sum is estimated from those rows only."""
        with torch.no_grad():
            if rows is None and self.use_dense:
                HV = self.hessian_sum() @ V
            elif rows is None:
                HV = self.family.hvp(self.theta, self.X, self.y, V)
            else:
                HV = self.family.hvp(self.theta, self.X[rows], self.y[rows], V)
                HV = HV * (self.X.shape[0] / rows.numel())  # estimate of the sum over all rows
            return HV / self.n + self.shift * V

    def hessian_sum(self) -> Tensor:
        """Σ_i ∇²ℓ_i over the training rows, (d, d), built once."""
        if self._hessian_sum is None:
            with torch.no_grad():
                self._hessian_sum = self.family.hessian(self.theta, self.X, self.y)
        return self._hessian_sum

    def dense(self) -> Tensor:
        """A as a dense (d, d) matrix."""
        H = self.hessian_sum()  # (d, d)
        return H / self.n + self.shift * torch.eye(self.dim, dtype=H.dtype)


# --- exact -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CholeskyFactor:
    """A = L Lᵀ, reusable: `solve(B)` costs O(d² k) per call. The eigenvalues are the estimates that
    the singularity check used (inverse and power iteration), not exact values."""

    L: Tensor  # (d, d), lower triangular
    min_eigenvalue: float
    max_eigenvalue: float

    def solve(self, B: Tensor) -> Tensor:
        """A⁻¹ B for B (d,) or (d, k)."""
        with torch.no_grad():
            X = torch.cholesky_solve(B.reshape(B.shape[0], -1).to(self.L.dtype), self.L)  # (d, k)
            return X.reshape(B.shape)


def cholesky_factor(A: Tensor, seed: int = 0) -> CholeskyFactor:
    """Factorise a dense symmetric A; raise InfluenceError if it is singular or indefinite.

    Singular means λ_min ≤ 1e-12 · λ_max, with λ_max from power iteration on A and λ_min from inverse
    iteration through the factor (a tiny λ_min dominates A⁻¹, so it is found in a few steps).
    """
    with torch.no_grad():
        A = 0.5 * (A + A.T)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            eig = torch.linalg.eigvalsh(A)
            _raise_singular(float(eig[0]), float(eig[-1]))
        lam_max = power_iteration(FunctionOperator(lambda V: A @ V, A.shape[0], A.dtype), 30, seed)
        inverse = FunctionOperator(lambda v: torch.cholesky_solve(v[:, None], L)[:, 0], A.shape[0], A.dtype)
        inv_max = power_iteration(inverse, 30, seed)
        lam_min = 1.0 / inv_max if inv_max > 0 else 0.0
        if not lam_min > 1e-12 * lam_max:
            _raise_singular(lam_min, lam_max)
        return CholeskyFactor(L, lam_min, lam_max)


def _raise_singular(lam_min: float, lam_max: float) -> None:
    raise InfluenceError(
        f"the Hessian is singular or indefinite (smallest eigenvalue {lam_min:.3g}, "
        f"largest {lam_max:.3g}); {_SINGULAR_FIX}"
    )


def exact(op: LinearOperator, B: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """A⁻¹ B through a Cholesky factor of `op.dense()` (factorised on each call: see `InverseHVP`)."""
    factor = cholesky_factor(_dense_of(op))
    return factor.solve(B), {"iterations": 0, "residual": 0.0}


def _dense_of(op: LinearOperator) -> Tensor:
    dense = getattr(op, "dense", None)
    if dense is None:
        raise InfluenceError(
            f"the exact solver needs a dense Hessian, which {type(op).__name__} lacks; use cg"
        )
    return dense()


# --- conjugate gradient -----------------------------------------------------------------------------
def cg(
    op: LinearOperator, B: Tensor, tol: float = 1e-10, max_iter: int = 1000
) -> tuple[Tensor, dict[str, Any]]:
    """Conjugate gradient for every column of B at once, each column with its own step sizes.

    A column stops moving once its relative residual ‖b − A x‖ / ‖b‖ is ≤ tol (and leaves the product
    A P unless the operator says it is not `columnwise`). Returns X (d, k) and
    info with `iterations` and `residual` (the largest final relative residual, recomputed as
    ‖B − A X‖ / ‖B‖ per column). A direction with pᵀAp ≤ 0 means A is not positive definite.
    """
    with torch.no_grad():
        B2 = B.reshape(B.shape[0], -1).to(op.dtype)  # (d, k)
        b_norm = B2.norm(dim=0).clamp_min(torch.finfo(op.dtype).tiny)  # (k,)
        X = torch.zeros_like(B2)
        R, P = B2.clone(), B2.clone()
        rs = (R * R).sum(0)  # (k,)
        iterations = 0
        while iterations < max_iter:
            active = rs.sqrt() / b_norm > tol  # (k,)
            if not bool(active.any()):
                break
            whole = bool(active.all()) or not getattr(op, "columnwise", True)
            AP = op.matvec(P) if whole else _masked_matvec(op, P, active)  # (d, k)
            pAp = (P * AP).sum(0)
            if bool((pAp[active] <= 0).any()):
                raise InfluenceError(
                    f"conjugate gradient met pᵀAp <= 0: the Hessian is indefinite; {_SINGULAR_FIX}"
                )
            alpha = torch.where(active, rs / torch.where(active, pAp, 1.0), 0.0)
            X.add_(P * alpha)
            R.sub_(AP * alpha)
            rs_new = (R * R).sum(0)
            P = R + P * torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
            rs = torch.where(active, rs_new, rs)
            iterations += 1
        residual = float(((B2 - op.matvec(X)).norm(dim=0) / b_norm).max()) if B2.numel() else 0.0
        if residual > tol and iterations >= max_iter:
            warnings.warn(
                f"conjugate gradient stopped after max_iter={max_iter} iterations at relative residual "
                f"{residual:.3g} > tol={tol:g}; raise max_iter or set damping > 0",
                RuntimeWarning,
                stacklevel=2,
            )
        return X.reshape(B.shape), {"iterations": iterations, "residual": residual}


def _masked_matvec(op: LinearOperator, P: Tensor, active: Tensor) -> Tensor:
    """A P on the active columns only (converged columns are left at zero: their step is 0)."""
    AP = torch.zeros_like(P)
    AP[:, active] = op.matvec(P[:, active])
    return AP


# --- LiSSA ------------------------------------------------------------------------------------------
def power_iteration(op: LinearOperator, iters: int = 50, seed: int = 0) -> float:
    """The largest eigenvalue of a symmetric positive semi-definite operator (Rayleigh quotient)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(op.dim, generator=gen, dtype=op.dtype)
        v = v / v.norm()
        value = 0.0
        for _ in range(iters):
            Av = op.matvec(v)
            value = float(v.dot(Av))
            norm = Av.norm()
            if float(norm) == 0.0:
                return 0.0
            v = Av / norm
        return value


def lissa(
    op: LinearOperator,
    B: Tensor,
    depth: int = 1000,
    scale: float | None = None,
    repeats: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    power_iters: int = 50,
) -> tuple[Tensor, dict[str, Any]]:
    """LiSSA: h₀ = B, h ← B + h − (A h) / scale for `depth` steps; A⁻¹ B ≈ h / scale.

    It converges when every eigenvalue of I − A / scale lies in (−1, 1), i.e. scale > λ_max(A) / 2; the
    default `scale` is 1.05 × λ_max from `power_iteration`, which makes the error shrink monotonically
    like (1 − λ_min / scale)^depth, so depth must exceed the condition number several times.

    With `batch_size`, every step uses the Hessian of a fresh random minibatch of training rows
    (rescaled to estimate the full sum; `op` must be a `HessianOperator`) and the `repeats` runs are
    averaged; with the full batch the runs would be identical, so one runs. Returns X (d, k) and info
    with iterations (depth × runs), residual (max relative ‖B − A X‖ / ‖B‖) and the scale used.
    """
    if depth < 1 or repeats < 1:
        raise InfluenceError(f"lissa needs depth >= 1 and repeats >= 1, got depth={depth}, repeats={repeats}")
    if batch_size is not None and not isinstance(op, HessianOperator):
        raise InfluenceError("lissa with batch_size needs a HessianOperator (training rows to sample)")
    with torch.no_grad():
        B2 = B.detach().reshape(B.shape[0], -1).to(op.dtype)  # (d, k)
        if scale is None:
            scale = 1.05 * power_iteration(op, power_iters, seed)
        if not scale > 0:
            raise InfluenceError(f"lissa needs scale > 0, got {scale}; the Hessian is zero: {_SINGULAR_FIX}")
        gen = torch.Generator().manual_seed(seed)
        runs = repeats if batch_size is not None else 1
        total = torch.zeros_like(B2)
        for _ in range(runs):
            total.add_(_lissa_run(op, B2, depth, scale, batch_size, gen))
        X = total / (runs * scale)
        residual = float(((B2 - op.matvec(X)).norm(dim=0) / B2.norm(dim=0).clamp_min(1e-300)).max())
        return X.reshape(B.shape), {"iterations": depth * runs, "residual": residual, "scale": scale}


def _lissa_run(
    op: LinearOperator, B: Tensor, depth: int, scale: float, batch_size: int | None, gen: torch.Generator
) -> Tensor:
    """One LiSSA recursion from h = B; returns h (not yet divided by scale)."""
    h = B.clone()  # (d, k), updated in place
    for _ in range(depth):
        if isinstance(op, HessianOperator) and batch_size is not None:
            rows = torch.randperm(op.X.shape[0], generator=gen)[:batch_size]
            Ah = op.matvec(h, rows=rows)
        else:
            Ah = op.matvec(h)
        h.add_(B).sub_(Ah, alpha=1.0 / scale)
    if not bool(torch.isfinite(h).all()):
        raise InfluenceError(f"lissa diverged with scale={scale:g}; raise scale (it must exceed λ_max of A)")
    return h


# --- front ------------------------------------------------------------------------------------------
class InverseHVP:
    """A prepared solver for A X = B that can be called on many blocks B; `exact` factorises once.

    Args:
        op: the operator A (a `HessianOperator`, or any `LinearOperator` for cg and lissa).
        solver: "exact", "cg" or "lissa".
        **options: the solver's options (cg: tol, max_iter; lissa: depth, scale, repeats,
            batch_size, seed, power_iters).
    """

    def __init__(self, op: LinearOperator, solver: str = "exact", **options: Any) -> None:
        check_solver(solver, options)
        self.op, self.solver, self.options = op, solver, options
        self.factor: CholeskyFactor | None = None
        self.setup_seconds = 0.0

    def __call__(self, B: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Solve A X = B for B (d,) or (d, k); info has solver, iterations, residual, seconds."""
        start = time.perf_counter()
        if self.solver == "exact":
            if self.factor is None:
                self.factor = cholesky_factor(_dense_of(self.op))
                self.setup_seconds = time.perf_counter() - start
            X, info = self.factor.solve(B), {"iterations": 0, "residual": 0.0}
        elif self.solver == "cg":
            X, info = cg(self.op, B, **self.options)
        else:
            if self.options.get("scale") is None:  # estimate λ_max once for all blocks
                it, seed = self.options.get("power_iters", 50), self.options.get("seed", 0)
                self.options["scale"] = 1.05 * power_iteration(self.op, it, seed)
            X, info = lissa(self.op, B, **self.options)
        return X, {"solver": self.solver, **info, "seconds": time.perf_counter() - start}


def check_solver(solver: str, options: dict[str, Any]) -> None:
    """Raise InfluenceError for an unknown solver name or an option the solver does not take."""
    if solver not in _OPTIONS:
        raise InfluenceError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    unknown = sorted(set(options) - set(_OPTIONS[solver]))
    if unknown:
        allowed = ", ".join(_OPTIONS[solver]) or "none"
        raise InfluenceError(
            f"solver {solver!r} takes no option {', '.join(unknown)}; its options: {allowed}"
        )


def solve(
    op: LinearOperator, B: Tensor, solver: str = "exact", **options: Any
) -> tuple[Tensor, dict[str, Any]]:
    """Solve A X = B with the named solver: returns X (same shape as B) and an info dict
    (solver, iterations, residual, seconds)."""
    return InverseHVP(op, solver, **options)(B)
