"""How well predicted group effects match the effects measured by retraining without each group.

A cell is one (method, order, strategy, fraction): the groups of one sampling strategy and size,
scored by one method. Per target, the predicted and actual effects are compared across the cell's
groups (Pearson r, Spearman ρ, and the OLS slope of actual on predicted: 1 means calibrated, below 1
means over-estimation); the cell reports their means over targets (NaNs ignored) and the Pearson r
pooled over all its (target, group) pairs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from tda.errors import DataError

CELL = ("method", "order", "strategy", "fraction")
FIDELITY_COLUMNS = (*CELL, "n_groups", "n_targets", "pearson", "spearman", "slope", "pearson_pooled")


def group_fidelity(predicted: pl.DataFrame, truth: pl.DataFrame, groups_meta: pl.DataFrame) -> pl.DataFrame:
    """Fidelity of predicted group effects per (method, order, strategy, fraction).

    Args:
        predicted: method, order, target_id, group_id, score (a `group_scores` table).
        truth: target_id, group_id, actual (a `group_truth` table).
        groups_meta: group_id, strategy, fraction: one row per group.

    Returns:
        method, order, strategy, fraction, n_groups, n_targets, pearson, spearman, slope,
        pearson_pooled; (target, group) pairs missing from either side or non-finite are left out.
    """
    _require(predicted, ("method", "order", "target_id", "group_id", "score"), "predicted")
    _require(truth, ("target_id", "group_id", "actual"), "truth")
    _require(groups_meta, ("group_id", "strategy", "fraction"), "groups_meta")
    if groups_meta["group_id"].is_duplicated().any():
        raise DataError("groups_meta repeats a group_id; give each group one strategy and fraction")
    joined = (
        predicted.join(truth.select("target_id", "group_id", "actual"), on=["target_id", "group_id"])
        .join(groups_meta.select("group_id", "strategy", "fraction"), on="group_id")
        .filter(pl.col("score").is_finite() & pl.col("actual").is_finite())
    )
    if joined.height == 0:
        raise DataError("predicted and truth share no finite (target_id, group_id) pair with known groups")
    cells = joined.partition_by(list(CELL), as_dict=True, maintain_order=True)
    rows = [_cell_row(dict(zip(CELL, key, strict=True)), cell) for key, cell in cells.items()]
    return pl.DataFrame(rows).select(FIDELITY_COLUMNS).sort(list(CELL))


def _require(frame: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{name} lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}")


def _cell_row(key: dict[str, object], cell: pl.DataFrame) -> dict[str, object]:
    """The fidelity row of one cell: per-target statistics averaged, plus the pooled Pearson r."""
    per_target = cell.group_by("target_id").agg("score", "actual")
    per = np.array(
        [
            _target_stats(np.asarray(s), np.asarray(a))
            for s, a in zip(per_target["score"], per_target["actual"], strict=True)
        ]
    ).reshape(-1, 3)  # (n_targets, 3): pearson, spearman, slope
    pearson, spearman, slope = (_nanmean(per[:, i]) for i in range(3))
    pooled = _correlation(stats.pearsonr, cell["score"].to_numpy(), cell["actual"].to_numpy())
    return {
        **key,
        "n_groups": cell["group_id"].n_unique(),
        "n_targets": per_target.height,
        "pearson": pearson,
        "spearman": spearman,
        "slope": slope,
        "pearson_pooled": pooled,
    }


def _target_stats(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float, float]:
    """Pearson r, Spearman ρ and the OLS slope of actual on predicted across one target's groups."""
    pearson = _correlation(stats.pearsonr, predicted, actual)
    spearman = _correlation(stats.spearmanr, predicted, actual)
    if len(predicted) < 2 or np.ptp(predicted) == 0:
        return pearson, spearman, float("nan")
    return pearson, spearman, float(stats.linregress(predicted, actual).slope)


def _correlation(fn: Callable[[np.ndarray, np.ndarray], Any], a: np.ndarray, b: np.ndarray) -> float:
    """A scipy correlation, NaN when it is undefined (fewer than 2 points or a constant side)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b).statistic)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
