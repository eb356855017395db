"""Influence estimates: inverse Hessian-vector products, group influence (first order, second order,
Newton) and per-example scores. Plain functions over tensors; see each module for the formulas."""

from __future__ import annotations

from tda.influence.group import group_influence, newton_changes, parameter_changes
from tda.influence.scores import METHODS, example_scores
from tda.influence.solvers import (
    SOLVERS,
    CholeskyFactor,
    FunctionOperator,
    HessianOperator,
    InverseHVP,
    LinearOperator,
    SolverOptions,
    cg,
    cholesky_factor,
    lissa,
    power_iteration,
    solve,
)

__all__ = [
    "METHODS",
    "SOLVERS",
    "CholeskyFactor",
    "FunctionOperator",
    "HessianOperator",
    "InverseHVP",
    "LinearOperator",
    "SolverOptions",
    "cg",
    "cholesky_factor",
    "example_scores",
    "group_influence",
    "lissa",
    "newton_changes",
    "parameter_changes",
    "power_iteration",
    "solve",
]
