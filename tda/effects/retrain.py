"""Retraining: the actual effects that influence estimates are checked against, and the subset
experiments that datamodels and the LDS are built from. Same objective as the model's training:
Σ_{i kept} ℓ_i + (λ_sum/2)‖θ‖² with λ_sum fixed at the full training size."""

from __future__ import annotations

import torch
from torch import Tensor

from tda.models.base import ModelFamily


def leave_group_out(
    family: ModelFamily,
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    X_target: Tensor,
    y_target: Tensor,
    l2_sum: float,
    groups: list[Tensor],
    control: bool = False,
) -> Tensor:
    """Actual change of each target's loss when each group is removed and the model retrained
    (warm start from θ): (m targets, G groups).

    The change is measured against θ, or with `control` against the same recipe run on every row from
    θ: for a recipe that does not converge (an LM fine-tune: a fixed number of AdamW steps moves θ
    even when nothing is removed), only the difference the group makes is left."""
    reference = family.fit(X, y, l2_sum=l2_sum, init=theta).theta if control else theta
    with torch.no_grad():
        base = family.losses(reference, X_target, y_target)  # (m,)
    out = torch.empty(len(base), len(groups), dtype=torch.float64)
    for g, index in enumerate(groups):
        keep = torch.ones(len(X), dtype=torch.bool)
        keep[index] = False
        fit = family.fit(X[keep], y[keep], l2_sum=l2_sum, init=theta)
        with torch.no_grad():
            out[:, g] = family.losses(fit.theta, X_target, y_target) - base
    return out


def subset_losses(
    family: ModelFamily,
    theta: Tensor,
    X: Tensor,
    y: Tensor,
    X_target: Tensor,
    y_target: Tensor,
    l2_sum: float,
    subsets: list[Tensor],
    warm_start: bool = True,
    seeds: list[int] | None = None,
) -> Tensor:
    """Each target's loss after training on each subset (rows of X): (J subsets, m targets).

    Every fit starts from `theta` (None or `warm_start=False`: the family's initialisation); `seeds`
    gives each subset's fit its own data order (None: the family's seed for all)."""
    out = torch.empty(len(subsets), len(X_target), dtype=torch.float64)
    for j, index in enumerate(subsets):
        init = theta if warm_start else None
        seed = None if seeds is None else seeds[j]
        fit = family.fit(X[index], y[index], l2_sum=l2_sum, init=init, seed=seed)
        with torch.no_grad():
            out[j] = family.losses(fit.theta, X_target, y_target)
    return out
