"""The Linear Datamodeling Score (Park et al. 2023; the AirRep and TRAK evaluations).

For each held-out ("eval") subset S_j and target t, the attribution predicts ĝ_j(t) from the scores of
S_j's members and the experiment measured y_j(t) = −loss_j(t) of a model trained on S_j. The LDS of a
method for t is the Spearman ρ over j between ĝ_j(t) and y_j(t); a method's LDS is its mean over
targets. The prediction aggregates the member scores s_it = score(t, z_i), i ∈ S_j, by

    sum        ĝ_j(t) = Σ_i s_it
    mean       ĝ_j(t) = Σ_i s_it / |S_j|
    attention  ĝ_j(t) = Σ_i softmax_i(|s_it|) s_it      (AirRep's group score; softmax over S_j)

For sum and mean a (target, example) pair missing from the scores (a top-k table) counts as a score of
0; attention is not linear in the scores, so it needs every pair and refuses a top-k table.
Sum and mean are matrix algebra: membership (J, n) times scores (n, m); attention takes each subset's
dense (|S_j|, m) slice of the scores with a stable softmax over the members. Then ranks and a Pearson
correlation per column, which equals `scipy.stats.spearmanr` (average ranks for ties).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.stats import rankdata

from tda.errors import DataError, TdaError

AGGREGATIONS = ("sum", "mean", "attention")
LDS_SCHEMA = {"method": pl.String, "aggregation": pl.String, "target_id": pl.Int64, "spearman": pl.Float64}
_METHOD_SCHEMA = {"method": pl.String, "target_id": pl.Int64, "spearman": pl.Float64}


def lds(
    scores: pl.DataFrame,
    subsets: pl.DataFrame,
    effects: pl.DataFrame,
    aggregation: str = "sum",
    purpose: str = "eval",
) -> pl.DataFrame:
    """Spearman ρ per (method, target) between predicted and measured subset effects.

    Args:
        scores: method, target_id, example_id, score (all pairs or top-k per target).
        subsets: subset_id, example_id, purpose; only the rows of `purpose` are used.
        effects: subset_id, target_id, loss; every (eval subset, evaluated target) needs a loss
            (repeated measurements of a pair are averaged).
        aggregation: "sum", "mean" or "attention" (Σ softmax(|s|)_i s_i) of the scores over a subset;
            attention needs the score of every (target, eval-subset member) pair.
        purpose: which subsets to evaluate on.

    Returns:
        method str, aggregation str, target_id int64, spearman float64 (NaN where either side is
        constant over the subsets), for every target that has both scores and effects.
    """
    if aggregation not in AGGREGATIONS:
        raise TdaError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    _require(scores, ("method", "target_id", "example_id", "score"), "scores")
    _require(subsets, ("subset_id", "example_id", "purpose"), "subsets")
    _require(effects, ("subset_id", "target_id", "loss"), "effects")
    from tda.effects import check_finite_losses

    check_finite_losses(
        effects, "effects", "re-measure them (subset_effects with a smaller recipe lr) or drop those rows"
    )
    members = subsets.filter(pl.col("purpose") == purpose).select("subset_id", "example_id").unique()
    if members.height == 0:
        raise DataError(f"subsets has no rows with purpose {purpose!r}; sample some or pick another purpose")
    subset_ids = np.sort(members["subset_id"].unique().to_numpy())
    example_ids = np.sort(members["example_id"].unique().to_numpy())
    M = _membership(members, subset_ids, example_ids, aggregation)  # (J, n)
    frames = []
    for method in sorted(scores["method"].unique().to_list()):
        frames.append(
            _method_lds(
                scores.filter(pl.col("method") == method), effects, M, subset_ids, example_ids, aggregation
            )
        )
    out = pl.concat(frames) if frames else pl.DataFrame(schema=_METHOD_SCHEMA)
    return out.with_columns(pl.lit(aggregation, dtype=pl.String).alias("aggregation")).select(
        list(LDS_SCHEMA)
    )


def _require(frame: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{name} lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}")


def _membership(
    members: pl.DataFrame, subset_ids: np.ndarray, example_ids: np.ndarray, aggregation: str
) -> sp.csr_matrix:
    """M[j, i] = 1 (or 1/|S_j| for the mean) when example i is in eval subset j: sparse (J, n).

    Row j's stored column indices are S_j's members (what attention aggregation slices by).
    """
    rows = np.searchsorted(subset_ids, members["subset_id"].to_numpy())
    cols = np.searchsorted(example_ids, members["example_id"].to_numpy())
    values = np.ones(len(rows))
    if aggregation == "mean":
        values = values / np.bincount(rows, minlength=len(subset_ids))[rows]
    return sp.csr_matrix((values, (rows, cols)), shape=(len(subset_ids), len(example_ids)))


def _method_lds(
    scores: pl.DataFrame,
    effects: pl.DataFrame,
    M: sp.csr_matrix,
    subset_ids: np.ndarray,
    example_ids: np.ndarray,
    aggregation: str,
) -> pl.DataFrame:
    """LDS of one method for every target it scored that has effects."""
    method = scores["method"][0]
    targets = np.intersect1d(
        scores["target_id"].unique().to_numpy(), effects["target_id"].unique().to_numpy()
    )
    if len(targets) == 0:
        raise DataError(
            f"scores of method {method!r} share no target_id with the effects (e.g. "
            f"{scores['target_id'][0]} is not measured); score the targets of the same split as the effects"
        )
    y = _measured(effects, subset_ids, targets)  # (J, m)
    scores = scores.filter(pl.col("example_id").is_in(example_ids) & pl.col("target_id").is_in(targets))
    if scores.height == 0:
        raise DataError(
            f"scores of method {method!r} name no example_id of the subsets (ids from another corpus?); "
            "score the training rows the subsets were sampled from"
        )
    if scores.select(pl.struct("target_id", "example_id").is_duplicated().any()).item():
        raise DataError(
            f"scores of method {method!r} repeat a (target_id, example_id) pair; keep one score each"
        )
    rows = np.searchsorted(example_ids, scores["example_id"].to_numpy())
    cols = np.searchsorted(targets, scores["target_id"].to_numpy())
    values = scores["score"].cast(pl.Float64).to_numpy()
    if aggregation == "attention":
        predicted = _attention_predicted(M, _dense_scores(method, rows, cols, values, example_ids, targets))
    else:
        S = sp.csr_matrix((values, (rows, cols)), shape=(len(example_ids), len(targets)))  # (n, m)
        predicted = np.asarray((M @ S).todense())  # (J, m)
    return pl.DataFrame(
        {"method": [method] * len(targets), "target_id": targets, "spearman": spearman_columns(predicted, y)},
        schema=_METHOD_SCHEMA,
    )


def _dense_scores(
    method: str,
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    example_ids: np.ndarray,
    targets: np.ndarray,
) -> np.ndarray:
    """The scores as a dense (n, m) matrix; every (eval member, target) pair must be present."""
    S = np.zeros((len(example_ids), len(targets)))
    present = np.zeros(S.shape, dtype=bool)
    S[rows, cols], present[rows, cols] = values, True
    if not present.all():
        gap_i, gap_t = np.argwhere(~present)[0]
        raise DataError(
            f"scores of method {method!r} lack example {example_ids[gap_i]} for target {targets[gap_t]} "
            f"({int((~present).sum())} pairs missing); attention aggregation needs all pairs, so score "
            "with top_k: null"
        )
    return S


def _attention_predicted(M: sp.csr_matrix, S: np.ndarray) -> np.ndarray:
    """ĝ[j, t] = Σ_{i∈S_j} softmax_i(|s_it|) s_it from membership M (J, n) and scores S (n, m): (J, m)."""
    predicted = np.empty((M.shape[0], S.shape[1]))
    for j in range(M.shape[0]):
        s = S[M.indices[M.indptr[j] : M.indptr[j + 1]]]  # (k, m): subset j's members
        logits = np.abs(s)
        weights = np.exp(logits - logits.max(axis=0))  # stable softmax over the members
        predicted[j] = (weights * s).sum(axis=0) / weights.sum(axis=0)
    return predicted


def _measured(effects: pl.DataFrame, subset_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """y[j, t] = −loss of subset j on target t: (J, m); every pair must be present."""
    rows = effects.filter(pl.col("subset_id").is_in(subset_ids) & pl.col("target_id").is_in(targets))
    rows = rows.group_by("subset_id", "target_id").agg(pl.col("loss").cast(pl.Float64).mean())
    j = np.searchsorted(subset_ids, rows["subset_id"].to_numpy())
    t = np.searchsorted(targets, rows["target_id"].to_numpy())
    y = np.full((len(subset_ids), len(targets)), np.nan)
    y[j, t] = -rows["loss"].to_numpy()
    if np.isnan(y).any():
        gap_j, gap_t = np.argwhere(np.isnan(y))[0]
        raise DataError(
            f"effects lack the loss of eval subset {subset_ids[gap_j]} on target {targets[gap_t]} "
            f"({int(np.isnan(y).sum())} pairs missing); measure every eval subset on every target"
        )
    return y


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ between matching columns of a and b (J, m): (m,), NaN where a column is constant."""
    return pearson_columns(rankdata(a, axis=0), rankdata(b, axis=0))


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of a and b (J, m): (m,), NaN where a column is constant."""
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    denom = np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, (ac * bc).sum(axis=0) / denom, np.nan)
    return np.clip(r, -1.0, 1.0)
