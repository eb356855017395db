"""Type@1: does a target's highest-scored training example come from the target's own group?

The group is the corpus's task/source label (`group` column). Per (method, target), the top training
example is the one with the highest score, ties going to the lowest example_id; the target is a hit
when that example's group equals the target's. A method's type@1 is the mean of `hit` over targets.
NaN or null scores are ignored. A top example whose group is null is a miss; a target without a group,
or a top example absent from the groups table, is an error.
"""

from __future__ import annotations

import polars as pl

from tda.errors import DataError

TYPE_AT_1_SCHEMA = {"method": pl.String, "target_id": pl.Int64, "hit": pl.Boolean}


def type_at_1(scores: pl.DataFrame, groups: pl.DataFrame) -> pl.DataFrame:
    """Whether each target's top-scored training example shares the target's group.

    Args:
        scores: method, target_id, example_id, score (all pairs or top-k per target).
        groups: example_id, group: one row per example, covering the training examples and the targets.

    Returns:
        method str, target_id int64, hit bool: one row per (method, target) with a score, sorted.
    """
    _require(scores, ("method", "target_id", "example_id", "score"), "scores")
    _require(groups, ("example_id", "group"), "groups")
    groups = groups.select(pl.col("example_id").cast(pl.Int64), pl.col("group").cast(pl.String))
    if groups["example_id"].is_duplicated().any():
        dup = groups.filter(pl.col("example_id").is_duplicated())["example_id"][0]
        raise DataError(f"groups repeats example_id {dup}; give each example one group")
    key = ["method", "target_id"]
    scored = scores.select(
        pl.col("method").cast(pl.String),
        pl.col("target_id").cast(pl.Int64),
        pl.col("example_id").cast(pl.Int64),
        pl.col("score").cast(pl.Float64),
    ).filter(pl.col("score").is_not_null() & pl.col("score").is_not_nan())
    top = (
        scored.filter(pl.col("score") == pl.col("score").max().over(key))
        .group_by(key)
        .agg(pl.col("example_id").min())
    )
    joined = top.join(groups, on="example_id", how="left").join(
        groups.rename({"example_id": "target_id", "group": "target_group"}), on="target_id", how="left"
    )
    no_group = joined.filter(pl.col("target_group").is_null())["target_id"]
    if len(no_group):
        raise DataError(
            f"groups has no group for target {no_group.min()} ({no_group.n_unique()} targets without one); "
            "give every target a non-null group"
        )
    absent = top.join(groups, on="example_id", how="anti")
    if absent.height:
        raise DataError(
            f"groups lacks example_id {absent['example_id'].min()} (a top-scored training example); "
            "give every training example a row in groups"
        )
    hit = (pl.col("group") == pl.col("target_group")).fill_null(False).alias("hit")
    return joined.select(*key, hit).sort(key).select([pl.col(c).cast(t) for c, t in TYPE_AT_1_SCHEMA.items()])


def _require(frame: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{name} lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}")
