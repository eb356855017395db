"""Splits, random subsets and groups: sizes, determinism, stratification, errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tda.data.split import split_table
from tda.errors import DataError
from tda.subsets.groups import make_groups
from tda.subsets.sampling import sample_subsets, subset_size


@pytest.fixture
def table() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "example_id": np.arange(300),
            "label": np.repeat([0, 1, 2], [150, 100, 50]),
            "x_0": rng.normal(size=300),
        }
    )


class TestSplit:
    def test_stratified_targets_keep_class_proportions(self, table):
        out = split_table(table, n_targets=60, stratify_by="label", seed=1)
        counts = dict(out.filter(pl.col("split") == "target").group_by("label").len().iter_rows())
        assert counts == {0: 30, 1: 20, 2: 10}
        assert out.height == 300

    def test_n_train_caps_the_training_rows_and_seed_is_deterministic(self, table):
        a = split_table(table, target_fraction=0.1, n_train=100, seed=2)
        assert (a["split"] == "train").sum() == 100 and (a["split"] == "target").sum() == 30
        assert a.equals(split_table(table, target_fraction=0.1, n_train=100, seed=2))
        assert not a.equals(split_table(table, target_fraction=0.1, n_train=100, seed=3))

    def test_errors(self, table):
        with pytest.raises(DataError, match="0 < targets < rows"):
            split_table(table, n_targets=300)
        with pytest.raises(DataError, match="no column 'nope'"):
            split_table(table, n_targets=3, stratify_by="nope")


class TestSubsets:
    def test_sizes_purposes_and_no_repeats_within_a_subset(self):
        ids = np.arange(100, 200)
        subsets = sample_subsets(ids, n_subsets=10, size=30, eval_fraction=0.3, seed=0)
        assert subsets.height == 300
        per = subsets.group_by("subset_id").agg(pl.col("example_id").n_unique(), pl.col("purpose").first())
        assert per["example_id"].to_list() == [30] * 10
        assert dict(per.group_by("purpose").len().iter_rows()) == {"fit": 7, "eval": 3}
        assert subsets["example_id"].is_in(ids.tolist()).all()

    def test_size_from_fraction_and_too_large(self):
        assert subset_size(1000, 0.5, None) == 500
        with pytest.raises(DataError, match="larger than the training split"):
            subset_size(10, None, 11)


class TestGroups:
    def test_neighbors_are_the_nearest_rows_of_an_anchor(self):
        rng = np.random.default_rng(0)
        X = rng.normal(size=(200, 3))
        groups = make_groups(np.arange(200), X, "neighbors", [0.1], n_per_size=3, seed=0)
        for _, g in groups.group_by("group_id"):
            members = g["example_id"].to_numpy()
            assert len(members) == 20
            centre = X[members].mean(axis=0)
            outside = np.setdiff1d(np.arange(200), members)
            # coherent: members are closer to their centre than the average outsider
            assert (
                np.linalg.norm(X[members] - centre, axis=1).mean()
                < np.linalg.norm(X[outside] - centre, axis=1).mean()
            )

    def test_random_kmeans_and_column(self):
        X = np.random.default_rng(1).normal(size=(100, 2))
        random = make_groups(np.arange(100), X, "random", [0.05, 0.2], n_per_size=4)
        sizes = random.group_by("group_id").agg(pl.len(), pl.col("fraction").first())
        assert sorted(set(zip(sizes["fraction"], sizes["len"], strict=False))) == [(0.05, 5), (0.2, 20)]
        kmeans = make_groups(np.arange(100), X, "kmeans", [0.25], n_per_size=10)
        assert kmeans["group_id"].n_unique() == 4 and kmeans.height == 100
        column = make_groups(np.arange(6), None, "column", column_values=np.array(list("aabbbc")))
        assert dict(column.group_by("group_id").len().iter_rows()) == {
            "column-a": 2,
            "column-b": 3,
            "column-c": 1,
        }

    def test_errors(self):
        with pytest.raises(DataError, match="needs `fractions`"):
            make_groups(np.arange(10), None, "random", [])
        with pytest.raises(DataError, match="≥ the 10 training rows"):
            make_groups(np.arange(10), None, "random", [1.0])


class TestAirRepLayout:
    def test_splits_have_disjoint_targets_and_pools(self):
        from tda.subsets.sampling import sample_split_subsets

        table = sample_split_subsets(
            np.arange(1000),
            np.arange(1000, 1200),
            n_splits=4,
            n_subsets_per_split=6,
            size=50,
            eval_fraction=0.5,
            seed=0,
        )
        targets = table.filter(pl.col("purpose") == "target")
        assert targets.group_by("split_id").len()["len"].to_list() == [50] * 4
        assert targets["example_id"].n_unique() == 200 and (targets["subset_id"] < 0).all()
        pools = (
            table.filter(pl.col("purpose") != "target")
            .group_by("split_id")
            .agg(pl.col("example_id").unique())
        )
        members = [set(p) for p in pools["example_id"]]
        assert all(a.isdisjoint(b) for i, a in enumerate(members) for b in members[i + 1 :])
        per = (
            table.filter(pl.col("purpose") != "target")
            .group_by("subset_id")
            .agg(pl.len(), pl.col("split_id").first())
        )
        assert per.height == 24 and set(per["len"]) == {50}
        assert table.filter(pl.col("purpose") == "eval")["subset_id"].n_unique() == 12

    def test_too_many_splits_is_an_error(self):
        from tda.subsets.sampling import sample_split_subsets

        with pytest.raises(DataError, match="lower n_splits"):
            sample_split_subsets(np.arange(10), np.arange(10, 12), n_splits=4, n_subsets_per_split=2, size=2)


def test_same_group_signal_sees_a_planted_effect():
    from tda.evaluation.signal import same_group_signal

    # two groups; subsets hold k examples of group a; target 100 (group a) gets lower loss with more a's
    rows, effects = [], []
    for j, k in enumerate([0, 1, 2, 3, 4]):
        rows += [(j, e) for e in range(k)] + [(j, 10 + e) for e in range(4 - k)]
        effects += [(j, 100, 5.0 - k), (j, 101, 5.0 + 0.1 * ((j * 7) % 3))]
    subsets = pl.DataFrame(rows, schema=["subset_id", "example_id"], orient="row")
    effects = pl.DataFrame(effects, schema=["subset_id", "target_id", "loss"], orient="row")
    groups = pl.DataFrame(
        {"example_id": [*range(4), *range(10, 14), 100, 101], "group": ["a"] * 4 + ["b"] * 4 + ["a", "c"]}
    )
    rho = dict(same_group_signal(subsets, effects, groups).iter_rows())
    assert rho[100] == pytest.approx(1.0) and np.isnan(rho[101])  # target 101's group never appears
