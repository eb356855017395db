"""Train/target splits of any table with an `example_id` column (tabular tables, corpora)."""

from __future__ import annotations

import numpy as np
import polars as pl

from tda.errors import DataError


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` across strata proportionally to `sizes` (largest remainder)."""
    exact = sizes * total / sizes.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return np.minimum(counts, sizes)


def split_table(
    table: pl.DataFrame,
    n_targets: int | None = None,
    target_fraction: float | None = None,
    stratify_by: str | None = None,
    n_train: int | None = None,
    seed: int = 0,
    target_ids: list[int] | None = None,
) -> pl.DataFrame:
    """Add `split` ∈ {train, target}: a random (optionally stratified) set of targets.

    `n_train` caps the training rows (the rest of the non-targets are dropped), so a study can use
    e.g. 1000 train / 200 targets of a larger data set.
    """
    n = table.height
    if target_ids is not None:
        return _explicit_targets(table, target_ids)
    k = n_targets if n_targets is not None else round((target_fraction or 0.0) * n)
    if not 0 < k < n:
        raise DataError(
            f"split: {k} targets of {n} rows; set n_targets or target_fraction so that 0 < targets < rows"
        )
    rng = np.random.default_rng(seed)
    if stratify_by is None:
        strata = np.zeros(n, dtype=np.int64)
    elif stratify_by not in table.columns:
        raise DataError(
            f"split: no column {stratify_by!r} to stratify by; columns are {', '.join(table.columns)}"
        )
    else:
        strata = table[stratify_by].cast(pl.String).fill_null("").rank("dense").to_numpy().astype(np.int64)
    chosen = _pick(strata, k, rng)
    is_target = np.zeros(n, dtype=bool)
    is_target[chosen] = True
    split = np.where(is_target, "target", "train").astype(object)
    if n_train is not None:
        rest = np.flatnonzero(~is_target)
        if n_train > rest.size:
            raise DataError(f"split: n_train={n_train} but only {rest.size} rows are left after the targets")
        keep_train = _pick(strata[rest], n_train, rng)
        drop = np.setdiff1d(rest, rest[keep_train])
        split[drop] = None
    out = table.with_columns(pl.Series("split", split.tolist(), dtype=pl.String))
    return out.filter(pl.col("split").is_not_null())


def _explicit_targets(table: pl.DataFrame, target_ids: list[int]) -> pl.DataFrame:
    """Mark the given example ids as targets; every id must be in the table."""
    known = set(table["example_id"].to_list())
    missing = [t for t in target_ids if t not in known]
    if missing:
        raise DataError(
            f"split: target example_id {missing[0]} (and {len(missing) - 1} more) is not in the data; "
            "list ids that the corpus or table has"
        )
    is_target = pl.col("example_id").is_in(list(target_ids))
    return table.with_columns(
        pl.when(is_target).then(pl.lit("target")).otherwise(pl.lit("train")).alias("split")
    )


def _pick(strata: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k row positions, stratified: each stratum contributes in proportion to its size."""
    values, sizes = np.unique(strata, return_counts=True)
    counts = _allocate(sizes, k)
    picked = [
        rng.choice(np.flatnonzero(strata == v), size=c, replace=False)
        for v, c in zip(values, counts, strict=True)
    ]
    return np.sort(np.concatenate(picked))
