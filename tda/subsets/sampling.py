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
