"""Does an effects table carry signal? Per target, the Spearman correlation over subsets between the
number of same-group training examples in the subset (e.g. the same task) and −loss."""

from __future__ import annotations

import numpy as np
import polars as pl

from tda.evaluation.lds import spearman_columns


def same_group_signal(subsets: pl.DataFrame, effects: pl.DataFrame, groups: pl.DataFrame) -> pl.DataFrame:
    """Per target: Spearman over subsets of (# members sharing the target's group) vs −loss.

    Args:
        subsets: subset_id, example_id (fit/eval rows).
        effects: subset_id, target_id, loss.
        groups: example_id, group for training examples and targets alike.

    Returns:
        target_id int64, spearman float64 (NaN where a target's count or loss never varies).
    """
    counts = subsets.join(groups, on="example_id").group_by("subset_id", "group").len("count")
    target_groups = groups.rename({"example_id": "target_id"})
    pairs = (
        effects.join(target_groups, on="target_id")
        .join(counts, on=["subset_id", "group"], how="left")
        .with_columns(pl.col("count").fill_null(0))
        .sort("target_id", "subset_id")
    )
    loss = pairs.pivot(on="target_id", index="subset_id", values="loss").sort("subset_id")
    count = pairs.pivot(on="target_id", index="subset_id", values="count").sort("subset_id")
    targets = [c for c in loss.columns if c != "subset_id"]
    rho = spearman_columns(count.select(targets).to_numpy().astype(float), -loss.select(targets).to_numpy())
    return pl.DataFrame({"target_id": np.array(targets, dtype=np.int64), "spearman": rho})
