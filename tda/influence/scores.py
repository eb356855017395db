"""Per-example attribution scores of training examples for targets, as a `scores` table.

With A = H̄ + δI (see `tda.influence.solvers`), the methods score a training example z for a target t:

    if-exact, if-cg, if-lissa   (1/n) ∇ℓ_tᵀ A⁻¹ ∇ℓ_z    (A⁻¹ by Cholesky, conjugate gradient or LiSSA)
    graddot                     ∇ℓ_tᵀ ∇ℓ_z
    gradcos                     ∇ℓ_tᵀ ∇ℓ_z / (‖∇ℓ_t‖ ‖∇ℓ_z‖)   (0 where a gradient is zero)

The influence score is the first-order rise of t's loss when z is removed, so a higher score means z
helped t, as everywhere in the project. Targets are scored in blocks: only a (block, n) score matrix
is held at a time, and with `top_k` only the k highest scores per target are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from tda.errors import InfluenceError
from tda.influence.solvers import HessianOperator, InverseHVP, SolverOptions
from tda.models.base import ModelFamily

METHODS = ("if-exact", "if-cg", "if-lissa", "graddot", "gradcos")
_SOLVER_OF = {"if-exact": "exact", "if-cg": "cg", "if-lissa": "lissa"}
SCORES_SCHEMA = {"method": pl.String, "target_id": pl.Int64, "example_id": pl.Int64, "score": pl.Float32}

Ids = Sequence[int] | np.ndarray | Tensor


def example_scores(
    method: str,
    family: ModelFamily,
    theta: Tensor,
    X_train: Tensor,
    y_train: Tensor,
    X_target: Tensor,
    y_target: Tensor,
    l2: float,
    train_ids: Ids | None = None,
    target_ids: Ids | None = None,
    block_size: int = 256,
    top_k: int | None = None,
    options: SolverOptions | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Score every training example for every target with one method.

    Args:
        method: one of "if-exact", "if-cg", "if-lissa", "graddot", "gradcos".
        family, theta: the model family and its trained parameters (d,).
        X_train, y_train: the n training rows; X_target, y_target: the m targets.
        l2: the per-example ridge weight (λ_sum = n · l2), used by the influence methods.
        train_ids, target_ids: the example ids of the rows (default 0..n-1 and 0..m-1).
        block_size: targets scored at once; a (block_size, n) matrix is the largest held.
        top_k: keep only the k highest scores per target (None = all pairs).
        options: the influence methods' damping, products with H̄ and solver options (see
            `SolverOptions`); its solver must be the method's (default: the method's, undamped).
            The gradient methods take none.

    Returns:
        The scores table (method str, target_id int64, example_id int64, score float32), all pairs
        in example order or the top k per target in descending score order, and an info dict with
        seconds (total, grads, scores) and the solver's iterations and largest residual.
    """
    _check_arguments(method, block_size, top_k, options)
    n, m = X_train.shape[0], X_target.shape[0]
    train_ids, target_ids = _ids(train_ids, n, "train_ids"), _ids(target_ids, m, "target_ids")
    start = time.perf_counter()
    with torch.no_grad():
        G = family.per_example_grads(theta.detach(), X_train, y_train).to(theta.dtype)  # (n, d)
        T = family.per_example_grads(theta.detach(), X_target, y_target).to(theta.dtype)  # (m, d)
    info: dict[str, Any] = {"method": method, "n_train": n, "n_targets": m, "iterations": 0, "residual": 0.0}
    info["seconds_grads"] = time.perf_counter() - start
    score_block = _block_scorer(method, family, theta, X_train, y_train, l2, G, info, options)
    frames = []
    for lo in range(0, m, block_size):
        S = score_block(T[lo : lo + block_size])  # (b, n)
        frames.append(_block_frame(method, S, target_ids[lo : lo + block_size], train_ids, top_k))
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=SCORES_SCHEMA)
    info["seconds"] = time.perf_counter() - start
    info["seconds_scores"] = info["seconds"] - info["seconds_grads"]
    return frame, info


def _check_arguments(method: str, block_size: int, top_k: int | None, options: SolverOptions | None) -> None:
    if method not in METHODS:
        raise InfluenceError(f"unknown scoring method {method!r}; choose one of {', '.join(METHODS)}")
    if method not in _SOLVER_OF and options is not None:
        raise InfluenceError(f"method {method!r} takes no solver options; drop `options`")
    if method in _SOLVER_OF and options is not None and options.solver != _SOLVER_OF[method]:
        raise InfluenceError(
            f"method {method!r} solves with {_SOLVER_OF[method]!r}, but the options name solver "
            f"{options.solver!r}; give SolverOptions({_SOLVER_OF[method]!r}, …)"
        )
    if block_size < 1:
        raise InfluenceError(f"block_size must be >= 1, got {block_size}")
    if top_k is not None and top_k < 1:
        raise InfluenceError(f"top_k must be >= 1 or None (all pairs), got {top_k}")


def _ids(ids: Ids | None, count: int, name: str) -> np.ndarray:
    if ids is None:
        return np.arange(count, dtype=np.int64)
    out = ids.numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    out = out.astype(np.int64).reshape(-1)
    if out.shape[0] != count:
        raise InfluenceError(f"{name} has {out.shape[0]} ids for {count} rows; give one id per row")
    return out


def _block_scorer(
    method: str,
    family: ModelFamily,
    theta: Tensor,
    X_train: Tensor,
    y_train: Tensor,
    l2: float,
    G: Tensor,
    info: dict[str, Any],
    options: SolverOptions | None,
) -> Callable[[Tensor], Tensor]:
    """A function from a block of target gradients (b, d) to its scores against all of G: (b, n)."""
    if method == "graddot":
        return lambda Tb: Tb @ G.T
    if method == "gradcos":
        G_unit = F.normalize(G, dim=1)  # (n, d); zero rows stay zero
        return lambda Tb: (F.normalize(Tb, dim=1) @ G_unit.T).clamp(-1.0, 1.0)
    n = X_train.shape[0]
    options = options if options is not None else SolverOptions(_SOLVER_OF[method])
    inverse = InverseHVP(HessianOperator.of_training(family, theta, X_train, y_train, l2, options), options)

    def influence(Tb: Tensor) -> Tensor:
        S, solved = inverse(Tb.T)  # (d, b): A⁻¹ ∇ℓ_t
        info["iterations"] += solved["iterations"]
        info["residual"] = max(info["residual"], solved["residual"])
        info["seconds_setup"] = inverse.setup_seconds
        return (G @ S).T / n  # (b, n)

    return influence


def _block_frame(
    method: str, S: Tensor, target_ids: np.ndarray, train_ids: np.ndarray, top_k: int | None
) -> pl.DataFrame:
    """The rows of one block of scores S (b, n): all pairs, or the top k per target."""
    b, n = S.shape
    if top_k is None:
        targets = np.repeat(target_ids, n)
        examples = np.tile(train_ids, b)
        values = S.reshape(-1)
    else:
        k = min(top_k, n)
        top = torch.topk(S, k, dim=1)  # values, indices: (b, k)
        targets = np.repeat(target_ids, k)
        examples = train_ids[top.indices.reshape(-1).numpy()]
        values = top.values.reshape(-1)
    frame = pl.DataFrame(
        {"target_id": targets, "example_id": examples, "score": values.to(torch.float32).numpy()},
        schema={k: v for k, v in SCORES_SCHEMA.items() if k != "method"},
    )
    return frame.select(pl.lit(method, dtype=pl.String).alias("method"), pl.all())
