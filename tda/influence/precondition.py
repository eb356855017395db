"""Preconditioners of gradient features, fitted once from the training features: a score is
⟨P φ_t, φ_z⟩, so scoring is a plain dot product against preconditioned targets.

Features are laid out in blocks (`Layout`): one per LoGra layer (a (k_out, k_in) matrix V_l, flattened
row-major), or one block for TRAK and full gradients. With n training rows and λ the damping:

    identity   P = I                                   GradDot (gradient cosine normalises both sides)
    fisher     P_l = (F_l + λ_l I)⁻¹ / n,  F_l = (1/n) Σ_z φ_l(z) φ_l(z)ᵀ
               the empirical Fisher, i.e. the Gauss–Newton approximation that LoGra and TRAK invert,
               per block (`blocks="layer"`) or over all features at once (`blocks="all"`)
    kfac       F_l ≈ A_l ⊗ S_l with A_l = Σ x̃x̃ᵀ / tokens and S_l = Σ g̃g̃ᵀ / n (LoGra's factor sums):
               with A = Q_A diag(a) Q_Aᵀ, S = Q_S diag(s) Q_Sᵀ,
               P_l V = Q_S [(Q_Sᵀ V Q_A) ⊘ (s aᵀ + λ_l)] Q_Aᵀ / n
    ekfac      the same eigenbasis with the eigenvalues corrected (George et al. 2018, as kronfluence):
               s aᵀ → Λ_l = (1/n) Σ_z (Q_Sᵀ V_z Q_A)⊙²

Damping is relative: λ_l = `damping` × the mean eigenvalue of block l (the mean of tr(F_l)/dim, of
s aᵀ, or of Λ_l), 0.1 by default as kronfluence's heuristic. The 1/n makes the influence methods
estimate (1/n) ∇ℓ_tᵀ H̄⁻¹ ∇ℓ_z with H̄ ≈ F, the convention of `tda.influence.scores`; it does not change
any ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from tda.errors import InfluenceError

KINDS = ("identity", "fisher", "kfac", "ekfac")
Chunks = Callable[[], Iterable[Tensor]]  # a fresh pass over the training features, (b, K) chunks


@dataclass(frozen=True)
class Layout:
    """The feature blocks: (name, rows, cols) each, in order; K = Σ rows × cols."""

    blocks: tuple[tuple[str, int, int], ...]

    @property
    def dim(self) -> int:
        return sum(r * c for _, r, c in self.blocks)

    def spans(self) -> list[tuple[str, int, int, int, int]]:
        """(name, start, stop, rows, cols) of every block."""
        out, start = [], 0
        for name, rows, cols in self.blocks:
            out.append((name, start, start + rows * cols, rows, cols))
            start += rows * cols
        return out

    @staticmethod
    def single(dim: int) -> Layout:
        return Layout((("all", 1, dim),))


class Preconditioner:
    """P of one kind: `apply(φ (m, K)) -> P φ (m, K)`, float32 in, float32 out."""

    def __init__(self, kind: str, layout: Layout, n: int, blocks: dict[str, tuple[Tensor, ...]]) -> None:
        self.kind, self.layout, self.n, self.blocks = kind, layout, n, blocks

    def apply(self, phi: Tensor) -> Tensor:
        if self.kind == "identity":
            return phi.float()
        out = torch.empty_like(phi, dtype=torch.float32)
        for name, lo, hi, rows, cols in self.spans():
            out[:, lo:hi] = self._block(name, phi[:, lo:hi].double(), rows, cols).float()
        return out

    def spans(self) -> list[tuple[str, int, int, int, int]]:
        if self.kind == "fisher" and "all" in self.blocks:
            return [("all", 0, self.layout.dim, 1, self.layout.dim)]
        return self.layout.spans()

    def _block(self, name: str, v: Tensor, rows: int, cols: int) -> Tensor:
        if self.kind == "fisher":
            (cholesky,) = self.blocks[name]
            return torch.cholesky_solve(v.T, cholesky).T / self.n
        q_s, q_a, denominator = self.blocks[name]
        V = v.reshape(-1, rows, cols)  # (m, k_out, k_in)
        rotated = q_s.T @ V @ q_a / denominator
        return (q_s @ rotated @ q_a.T).reshape(len(v), -1) / self.n


def fit_preconditioner(
    kind: str,
    layout: Layout,
    chunks: Chunks,
    n: int,
    damping: float = 0.1,
    factors: tuple[dict[str, Tensor], dict[str, Tensor], int] | None = None,
    blocks: str = "layer",
) -> Preconditioner:
    """Fit P of `kind` from a pass over the n training features (and LoGra's factor sums A, S, tokens
    for kfac/ekfac); InfluenceError for what the features cannot support."""
    if kind not in KINDS:
        raise InfluenceError(f"preconditioner {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if damping < 0 or n < 1:
        raise InfluenceError(f"preconditioner: damping={damping}, n={n}; need damping ≥ 0 and n ≥ 1")
    if kind == "identity":
        return Preconditioner(kind, layout, n, {})
    if kind == "fisher":
        return Preconditioner(kind, layout, n, _fisher(layout, chunks, n, damping, blocks))
    if factors is None or len(layout.blocks) == 1 and layout.blocks[0][0] == "all":
        raise InfluenceError(f"{kind} needs LoGra features (per-layer blocks and their Kronecker factors)")
    return Preconditioner(kind, layout, n, _kronecker(kind, layout, chunks, n, damping, factors))


def _fisher(layout: Layout, chunks: Chunks, n: int, damping: float, blocks: str) -> dict[str, tuple[Tensor]]:
    spans = [("all", 0, layout.dim, 1, layout.dim)] if blocks == "all" else layout.spans()
    sums = {name: torch.zeros(hi - lo, hi - lo, dtype=torch.float64) for name, lo, hi, _, _ in spans}
    for chunk in chunks():
        chunk = chunk.double()
        for name, lo, hi, _, _ in spans:
            sums[name] += chunk[:, lo:hi].T @ chunk[:, lo:hi]
    out = {}
    for name, total in sums.items():
        F = total / n
        lam = damping * float(torch.diagonal(F).mean()) or 1e-12
        out[name] = (torch.linalg.cholesky(F + lam * torch.eye(len(F), dtype=F.dtype)),)
    return out


def _kronecker(
    kind: str,
    layout: Layout,
    chunks: Chunks,
    n: int,
    damping: float,
    factors: tuple[dict[str, Tensor], dict[str, Tensor], int],
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    A_sums, S_sums, tokens = factors
    eigen = {}
    for name, _, _ in layout.blocks:
        a, q_a = torch.linalg.eigh(A_sums[name].double() / max(tokens, 1))
        s, q_s = torch.linalg.eigh(S_sums[name].double() / n)
        eigen[name] = (q_s, q_a, s.clamp_min(0)[:, None] * a.clamp_min(0)[None, :])  # (k_out, k_in)
    if kind == "ekfac":
        corrected = {name: torch.zeros_like(e[2]) for name, e in eigen.items()}
        for chunk in chunks():
            for name, lo, hi, rows, cols in layout.spans():
                q_s, q_a, _ = eigen[name]
                V = chunk[:, lo:hi].double().reshape(-1, rows, cols)
                corrected[name] += ((q_s.T @ V @ q_a) ** 2).sum(0)
        eigen = {name: (q_s, q_a, corrected[name] / n) for name, (q_s, q_a, _) in eigen.items()}
    return {
        name: (q_s, q_a, lam + damping * float(lam.mean()) + 1e-12) for name, (q_s, q_a, lam) in eigen.items()
    }


def self_influence(P: Preconditioner, phi: Tensor) -> Tensor:
    """⟨P φ_z, φ_z⟩ of each row (b,): a training example's score on itself (data cleaning)."""
    return (P.apply(phi) * phi.float()).sum(1)
