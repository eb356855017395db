"""Inverse Hessian-vector products: solve A X = B for a block B (d, k), with A = H̄ + δI.

H̄ = (Σ_i ∇²ℓ_i + λ_sum I) / n is the mean Hessian of the regularised objective (see
`tda.models.base`); the damping δ ≥ 0 is added on top in every solver, so δ > 0 makes a singular or
indefinite H̄ usable at the price of a bias towards (1/δ)·B. Three solvers share one front,
`InverseHVP` (and `solve` for one block), set up by one typed `SolverOptions`:

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
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from tda.errors import InfluenceError
from tda.models.base import ModelFamily

SOLVERS = ("exact", "cg", "lissa")
_OPTIONS = {  # the options each solver reads; the rest of SolverOptions (solver, damping, hvp) is common
    "exact": (),
    "cg": ("tol", "max_iter"),
    "lissa": ("depth", "scale", "repeats", "batch_size", "seed", "power_iters"),
}
_SINGULAR_FIX = "set damping > 0 (e.g. 1e-3) or l2 > 0"
HVP_MODES = ("auto", "dense", "matrix_free")
DENSE_HVP_MAX_D = 4096
CG_TOL, CG_MAX_ITER = 1e-10, 1000
LISSA_DEPTH, POWER_ITERS = 1000, 50


@dataclass(frozen=True)
class SolverOptions:
    """How A⁻¹ B is computed: A's damping and products, the solver and the solver's options.

    Every option has a default. One that the chosen solver does not read must stay at its default
    (`SolverOptions("cg", depth=3)` raises), so a recipe meant for another solver fails before any work.
    Each field's `metadata["help"]` says what it does.
    """

    solver: str = field(
        default="exact",
        metadata={"help": "exact (a Cholesky factor of the dense A), cg (conjugate gradient) or lissa."},
    )
    damping: float = field(default=0.0, metadata={"help": "δ ≥ 0 added to the mean Hessian: A = H̄ + δI."})
    hvp: str = field(
        default="auto",
        metadata={"help": "Full-batch products with H̄: dense, matrix_free or auto (see HessianOperator)."},
    )
    tol: float = field(
        default=CG_TOL, metadata={"help": "cg: a column stops at relative residual ‖b − A x‖ / ‖b‖ ≤ tol."}
    )
    max_iter: int = field(default=CG_MAX_ITER, metadata={"help": "cg: the most iterations."})
    depth: int = field(default=LISSA_DEPTH, metadata={"help": "lissa: steps of the recursion (≥ 1)."})
    scale: float | None = field(
        default=None, metadata={"help": "lissa: the scale; None = 1.05 × λ_max(A) by power iteration."}
    )
    repeats: int = field(default=1, metadata={"help": "lissa with batch_size: independent runs averaged."})
    batch_size: int | None = field(
        default=None, metadata={"help": "lissa: training rows per Hessian sample; None = the full batch."}
    )
    seed: int = field(default=0, metadata={"help": "lissa: seed of the minibatches and power iteration."})
    power_iters: int = field(
        default=POWER_ITERS, metadata={"help": "lissa: power-iteration steps that estimate λ_max."}
    )

    def __post_init__(self) -> None:
        if self.solver not in _OPTIONS:
            raise InfluenceError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        unread = sorted(
            f.name
            for f in fields(self)
            if any(f.name in names for names in _OPTIONS.values())
            and f.name not in _OPTIONS[self.solver]
            and getattr(self, f.name) != f.default
        )
        if unread:
            allowed = ", ".join(_OPTIONS[self.solver]) or "none"
            raise InfluenceError(
                f"solver {self.solver!r} takes no option {', '.join(unread)}; its options: {allowed}"
            )
        check_operator_options(self.damping, self.hvp)
        if self.solver == "lissa":
            _check_lissa(self.depth, self.repeats)


def check_operator_options(damping: float, hvp: str) -> None:
    """Raise InfluenceError for a negative damping or an unknown product mode."""
    if hvp not in HVP_MODES:
        raise InfluenceError(f"hvp must be one of {', '.join(HVP_MODES)}, got {hvp!r}")
    if damping < 0:
        raise InfluenceError(f"damping must be >= 0, got {damping}; use 0 for none or e.g. 1e-3")


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
        check_operator_options(damping, hvp)
        self.family, self.theta, self.X, self.y = family, theta.detach(), X, y
        self.l2_sum, self.damping = float(l2_sum), float(damping)
        self.n = int(n if n is not None else X.shape[0])
        self.dim, self.dtype = self.theta.shape[0], self.theta.dtype
        self.use_dense = hvp == "dense" or (hvp == "auto" and self.dim <= DENSE_HVP_MAX_D)
        self._hessian_sum: Tensor | None = None

    @classmethod
    def of_training(
        cls, family: ModelFamily, theta: Tensor, X: Tensor, y: Tensor, l2: float, options: SolverOptions
    ) -> HessianOperator:
        """A over all n rows of (X, y) with λ_sum = n · l2 and the options' damping and products."""
        n = X.shape[0]
        return cls(family, theta, X, y, l2_sum=n * l2, n=n, damping=options.damping, hvp=options.hvp)

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
    op: LinearOperator, B: Tensor, tol: float = CG_TOL, max_iter: int = CG_MAX_ITER
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
def power_iteration(op: LinearOperator, iters: int = POWER_ITERS, seed: int = 0) -> float:
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
    depth: int = LISSA_DEPTH,
    scale: float | None = None,
    repeats: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    power_iters: int = POWER_ITERS,
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
    _check_lissa(depth, repeats)
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


def _check_lissa(depth: int, repeats: int) -> None:
    if depth < 1 or repeats < 1:
        raise InfluenceError(f"lissa needs depth >= 1 and repeats >= 1, got depth={depth}, repeats={repeats}")


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
    """A prepared solver for A X = B that can be called on many blocks B; `exact` factorises once and
    `lissa` estimates its scale once.

    Args:
        op: the operator A (a `HessianOperator`, or any `LinearOperator` for cg and lissa); the options'
            damping and hvp are A's, given when it was built (`HessianOperator.of_training`).
        options: the solver and its options (default: exact).
    """

    def __init__(self, op: LinearOperator, options: SolverOptions | None = None) -> None:
        self.op = op
        self.options = options if options is not None else SolverOptions()
        self.solver = self.options.solver
        self.scale = self.options.scale  # lissa: None until estimated on the first call
        self.factor: CholeskyFactor | None = None
        self.setup_seconds = 0.0

    def __call__(self, B: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Solve A X = B for B (d,) or (d, k); info has solver, iterations, residual, seconds."""
        start = time.perf_counter()
        o = self.options
        if self.solver == "exact":
            if self.factor is None:
                self.factor = cholesky_factor(_dense_of(self.op))
                self.setup_seconds = time.perf_counter() - start
            X, info = self.factor.solve(B), {"iterations": 0, "residual": 0.0}
        elif self.solver == "cg":
            X, info = cg(self.op, B, tol=o.tol, max_iter=o.max_iter)
        else:
            if self.scale is None:  # estimate λ_max once for all blocks
                self.scale = 1.05 * power_iteration(self.op, o.power_iters, o.seed)
            X, info = lissa(
                self.op,
                B,
                depth=o.depth,
                scale=self.scale,
                repeats=o.repeats,
                batch_size=o.batch_size,
                seed=o.seed,
                power_iters=o.power_iters,
            )
        return X, {"solver": self.solver, **info, "seconds": time.perf_counter() - start}


def solve(
    op: LinearOperator, B: Tensor, options: SolverOptions | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Solve A X = B with the options' solver: returns X (same shape as B) and an info dict
    (solver, iterations, residual, seconds)."""
    return InverseHVP(op, options)(B)
