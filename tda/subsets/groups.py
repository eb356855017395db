"""Groups of training examples whose joint removal we study (Koh et al. 2019; Basu et al. 2020).

- random: uniform random groups of size p·n;
- neighbors: the p·n nearest training points (Euclidean, feature space) of a random anchor: coherent
  groups, the hard case for first-order influence;
- kmeans: k-means clusters with k = round(1/p) (sizes vary around p·n);
- column: one group per distinct value of a column (e.g. the class, or a corpus's task).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from tda.errors import DataError

STRATEGIES = ("column", "random", "kmeans", "neighbors")


def _frame(groups: list[tuple[str, np.ndarray, str, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "group_id": [gid for gid, ids, _, _ in groups for _ in ids],
            "example_id": np.concatenate([ids for _, ids, _, _ in groups]).astype(np.int64),
            "strategy": [s for _, ids, s, _ in groups for _ in ids],
            "fraction": np.concatenate([np.full(len(ids), f) for _, ids, _, f in groups]),
        }
    )


def make_groups(
    example_ids: np.ndarray,
    X: np.ndarray | None,
    strategy: str,
    fractions: Sequence[float] = (),
    n_per_size: int = 10,
    column_values: np.ndarray | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Groups table: group_id str, example_id int64, strategy str, fraction float64."""
    n = len(example_ids)
    rng = np.random.default_rng(seed)
    if strategy == "column":
        if column_values is None:
            raise DataError("make_groups: strategy 'column' needs `column`")
        groups = [
            (f"column-{v}", example_ids[column_values == v], "column", float(np.mean(column_values == v)))
            for v in np.unique(column_values)
        ]
        return _frame(groups)
    if not fractions:
        raise DataError(f"make_groups: strategy {strategy!r} needs `fractions` (e.g. [0.05, 0.1])")
    groups = []
    for p in fractions:
        size = max(1, round(p * n))
        if size >= n:
            raise DataError(f"make_groups: fraction {p} gives groups of {size} ≥ the {n} training rows")
        for i, members in enumerate(_groups_of_size(strategy, n, size, p, n_per_size, X, rng)):
            groups.append((f"{strategy}-p{p:g}-{i:03d}", example_ids[np.sort(members)], strategy, p))
    return _frame(groups)


def _groups_of_size(
    strategy: str, n: int, size: int, p: float, count: int, X: np.ndarray | None, rng: np.random.Generator
) -> list[np.ndarray]:
    if strategy == "random":
        return [rng.choice(n, size=size, replace=False) for _ in range(count)]
    if X is None:
        raise DataError(f"make_groups: strategy {strategy!r} needs feature columns x_*")
    if strategy == "neighbors":
        anchors = rng.choice(n, size=count, replace=count > n)
        return [_nearest(X, X[a], size) for a in anchors]
    if strategy == "kmeans":
        from sklearn.cluster import KMeans

        k = max(2, round(1 / p))
        labels = KMeans(n_clusters=k, n_init=4, random_state=int(rng.integers(2**31))).fit_predict(X)
        clusters = rng.permutation(k)[: min(count, k)]
        return [np.flatnonzero(labels == c) for c in clusters]
    raise DataError(f"make_groups: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def _nearest(X: np.ndarray, anchor: np.ndarray, size: int) -> np.ndarray:
    distances = ((X - anchor) ** 2).sum(axis=1)  # (n,)
    return np.argpartition(distances, size - 1)[:size]
