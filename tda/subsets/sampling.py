"""Random subsets of the training split, for effects experiments and the LDS."""

from __future__ import annotations

import numpy as np
import polars as pl

from tda.errors import DataError


def subset_size(n_train: int, fraction: float | None, size: int | None) -> int:
    """The subset size from `size` or `fraction` of the training split; checked against it."""
    k = size if size is not None else round((fraction or 0.0) * n_train)
    if k > n_train:
        raise DataError(
            f"sample_subsets: subset_size {k} is larger than the training split ({n_train} rows); "
            "lower subset_size or fraction"
        )
    if k < 1:
        raise DataError("sample_subsets: subsets would be empty; set subset_size ≥ 1 or a larger fraction")
    return k


def sample_subsets(
    example_ids: np.ndarray, n_subsets: int, size: int, eval_fraction: float = 0.0, seed: int = 0
) -> pl.DataFrame:
    """`n_subsets` uniform random subsets of `size` examples (without replacement within a subset).

    The last round(n_subsets · eval_fraction) subsets are marked `eval` (held out for the LDS), the
    others `fit`. Returns the subsets table: subset_id int32, example_id int64, purpose str.
    """
    rng = np.random.default_rng(seed)
    n_eval = round(n_subsets * eval_fraction)
    members = np.stack(
        [rng.choice(example_ids, size=size, replace=False) for _ in range(n_subsets)]
    )  # (J, k)
    purpose = np.where(np.arange(n_subsets) >= n_subsets - n_eval, "eval", "fit")
    return pl.DataFrame(
        {
            "subset_id": np.repeat(np.arange(n_subsets, dtype=np.int32), size),
            "example_id": np.sort(members, axis=1).reshape(-1).astype(np.int64),
            "purpose": np.repeat(purpose, size),
        }
    )


def sample_split_subsets(
    train_ids: np.ndarray,
    target_ids: np.ndarray,
    n_splits: int,
    n_subsets_per_split: int,
    size: int,
    eval_fraction: float = 0.0,
    pool_size: int | None = None,
    targets_per_split: int | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """The AirRep layout: `n_splits` splits, each with its own disjoint targets and training pool, and
    `n_subsets_per_split` subsets of `size` drawn from that pool.

    Returns the subsets table with `split_id`; each split's targets are rows with purpose `target` and
    subset_id = −1 − split_id (so code that reads fit/eval subsets never sees them).
    """
    rng = np.random.default_rng(seed)
    pool_size = pool_size or len(train_ids) // n_splits
    targets_per_split = targets_per_split or len(target_ids) // n_splits
    too_small = min(pool_size, targets_per_split) < 1
    if too_small or pool_size * n_splits > len(train_ids) or targets_per_split * n_splits > len(target_ids):
        raise DataError(
            f"sample_subsets: {n_splits} disjoint splits of {pool_size} pool rows and {targets_per_split} "
            f"targets need {pool_size * n_splits} training rows and {targets_per_split * n_splits} targets; "
            f"the data has {len(train_ids)} and {len(target_ids)}: "
            "lower n_splits, pool_size or targets_per_split"
        )
    subset_size(pool_size, None, size)
    pools = rng.permutation(train_ids)[: pool_size * n_splits].reshape(n_splits, pool_size)
    targets = rng.permutation(target_ids)[: targets_per_split * n_splits].reshape(n_splits, targets_per_split)
    frames = []
    for s in range(n_splits):
        part = sample_subsets(pools[s], n_subsets_per_split, size, eval_fraction, int(rng.integers(2**31)))
        part = part.with_columns(
            pl.col("subset_id") + s * n_subsets_per_split, pl.lit(s, pl.Int32).alias("split_id")
        )
        target_rows = pl.DataFrame(
            {
                "subset_id": np.full(targets_per_split, -1 - s, dtype=np.int32),
                "example_id": np.sort(targets[s]).astype(np.int64),
                "purpose": ["target"] * targets_per_split,
                "split_id": np.full(targets_per_split, s, dtype=np.int32),
            }
        )
        frames += [part, target_rows]
    return pl.concat(frames).with_columns(pl.col("subset_id").cast(pl.Int32))
