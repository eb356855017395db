"""Evaluation of attributions: the Linear Datamodeling Score and group-effect fidelity."""

from __future__ import annotations

from tda.evaluation.groups import group_fidelity
from tda.evaluation.lds import lds, pearson_columns, spearman_columns

__all__ = ["group_fidelity", "lds", "pearson_columns", "spearman_columns"]
