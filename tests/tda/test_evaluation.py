"""Evaluation: LDS against a slow per-target loop with scipy, and group fidelity on a hand-made case."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from tda.errors import DataError, TdaError
from tda.evaluation import group_fidelity, lds

N_EXAMPLES, N_TARGETS, N_EVAL, N_FIT, SUBSET_SIZE = 30, 5, 12, 3, 10


@pytest.fixture
def study() -> dict[str, pl.DataFrame]:
    """Scores of two methods (all pairs), fit and eval subsets, and measured losses."""
    rng = np.random.default_rng(0)
    example_ids = np.arange(N_EXAMPLES) * 3 + 100  # ids need not be 0..n-1
    target_ids = np.arange(N_TARGETS) + 7
    scores = pl.concat(
        [
            pl.DataFrame(
                {
                    "method": method,
                    "target_id": np.repeat(target_ids, N_EXAMPLES),
                    "example_id": np.tile(example_ids, N_TARGETS),
                    "score": rng.normal(size=N_TARGETS * N_EXAMPLES).astype(np.float32),
                }
            )
            for method in ("graddot", "if-exact")
        ]
    )
    subsets = pl.concat(
        [
            pl.DataFrame(
                {
                    "subset_id": np.full(SUBSET_SIZE, j, dtype=np.int32),
                    "example_id": rng.choice(example_ids, SUBSET_SIZE, replace=False),
                    "purpose": "fit" if j < N_FIT else "eval",
                }
            )
            for j in range(N_FIT + N_EVAL)
        ]
    )
    effects = pl.DataFrame(
        {
            "subset_id": np.repeat(np.arange(N_FIT + N_EVAL, dtype=np.int32), N_TARGETS),
            "target_id": np.tile(target_ids, N_FIT + N_EVAL),
            "loss": rng.normal(size=(N_FIT + N_EVAL) * N_TARGETS).astype(np.float32),
        }
    )
    return {"scores": scores, "subsets": subsets, "effects": effects}


def slow_lds(scores: pl.DataFrame, subsets: pl.DataFrame, effects: pl.DataFrame, aggregation: str) -> dict:
    """(method, target_id) → Spearman ρ, one target at a time, with dictionaries and scipy."""
    eval_sets = {
        j: rows["example_id"].to_list()
        for (j,), rows in subsets.filter(pl.col("purpose") == "eval").group_by("subset_id")
    }
    loss = {(r["subset_id"], r["target_id"]): r["loss"] for r in effects.iter_rows(named=True)}
    table = {(r["method"], r["target_id"], r["example_id"]): r["score"] for r in scores.iter_rows(named=True)}
    out = {}
    for method, target in scores.select("method", "target_id").unique().iter_rows():
        predicted, measured = [], []
        for j, members in sorted(eval_sets.items()):
            total = sum(float(table.get((method, target, z), 0.0)) for z in members)
            predicted.append(total / len(members) if aggregation == "mean" else total)
            measured.append(-loss[(j, target)])
        out[(method, target)] = stats.spearmanr(predicted, measured).statistic
    return out


def as_dict(frame: pl.DataFrame) -> dict:
    return {(r["method"], r["target_id"]): r["spearman"] for r in frame.iter_rows(named=True)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) < 1e-12 for k in a
    )


class TestLds:
    @pytest.mark.parametrize("aggregation", ["sum", "mean"])
    def test_equals_a_slow_loop_with_scipy(self, study, aggregation):
        got = lds(**study, aggregation=aggregation)
        assert got.schema == pl.Schema(
            {"method": pl.String, "aggregation": pl.String, "target_id": pl.Int64, "spearman": pl.Float64}
        )
        assert got.height == 2 * N_TARGETS and set(got["aggregation"]) == {aggregation}
        assert same(as_dict(got), slow_lds(**study, aggregation=aggregation))

    def test_missing_pairs_count_as_zero(self, study):
        scores = study["scores"]
        top = scores.sort("score", descending=True).group_by("method", "target_id").head(4)
        zeroed = scores.join(top, on=["method", "target_id", "example_id"], how="left", suffix="_top")
        zeroed = zeroed.with_columns(pl.col("score_top").fill_null(0.0).alias("score")).drop("score_top")
        from_top = as_dict(lds(top, study["subsets"], study["effects"]))
        assert same(from_top, as_dict(lds(zeroed, study["subsets"], study["effects"])))
        assert same(from_top, slow_lds(top, study["subsets"], study["effects"], "sum"))

    def test_constant_prediction_is_nan(self, study):
        flat = study["scores"].with_columns(pl.lit(0.5, dtype=pl.Float32).alias("score"))
        assert all(math.isnan(v) for v in as_dict(lds(flat, study["subsets"], study["effects"])).values())

    def test_only_targets_with_effects_are_scored(self, study):
        effects = study["effects"].filter(pl.col("target_id") != 7)
        got = lds(study["scores"], study["subsets"], effects)
        assert 7 not in set(got["target_id"]) and got.height == 2 * (N_TARGETS - 1)


class TestInvalidLds:
    def test_missing_effect(self, study):
        effects = study["effects"].filter(~((pl.col("subset_id") == 5) & (pl.col("target_id") == 9)))
        with pytest.raises(DataError, match="effects lack the loss of eval subset 5 on target 9"):
            lds(study["scores"], study["subsets"], effects)

    def test_missing_column_and_unknown_aggregation(self, study):
        with pytest.raises(DataError, match="scores lacks column"):
            lds(study["scores"].drop("score"), study["subsets"], study["effects"])
        with pytest.raises(TdaError, match="unknown aggregation 'max'"):
            lds(**study, aggregation="max")
        with pytest.raises(DataError, match="no rows with purpose 'test'"):
            lds(**study, purpose="test")


class TestGroupFidelity:
    @pytest.fixture
    def tables(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        meta = pl.DataFrame(
            {
                "group_id": ["r1", "r2", "r3", "c1", "c2", "c3"],
                "strategy": ["random"] * 3 + ["cluster"] * 3,
                "fraction": [0.1] * 6,
            }
        )
        truth = pl.DataFrame(
            {
                "target_id": [0] * 6 + [1] * 6,
                "group_id": ["r1", "r2", "r3", "c1", "c2", "c3"] * 2,
                "actual": [1.0, 2.0, 3.0, 1.0, 1.0, 1.0] + [1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
            }
        )
        predicted = pl.DataFrame(
            {
                "method": "if",
                "order": pl.Series([1] * 12, dtype=pl.Int8),
                "target_id": [0] * 6 + [1] * 6,
                "group_id": ["r1", "r2", "r3", "c1", "c2", "c3"] * 2,
                "score": [2.0, 4.0, 6.0, 1.0, 2.0, 4.0] + [3.0, 2.0, 1.0, 1.0, 2.0, 3.0],
            }
        )
        return predicted, truth, meta

    def test_hand_made_values(self, tables):
        got = group_fidelity(*tables).to_dicts()
        assert [(r["strategy"], r["n_groups"], r["n_targets"]) for r in got] == [
            ("cluster", 3, 2),
            ("random", 3, 2),
        ]
        cluster, random = got
        # random: target 0 is predicted as 2 × actual (r 1, slope 0.5); target 1 reversed (r −1, slope −1)
        assert random["pearson"] == pytest.approx(0.0, abs=1e-12)
        assert random["spearman"] == pytest.approx(0.0, abs=1e-12)
        assert random["slope"] == pytest.approx(-0.25)
        assert random["pearson_pooled"] == pytest.approx(0.25)  # r of (2,4,6,3,2,1) and (1,2,3,1,2,3)
        # cluster: target 0 has constant actual (r undefined, slope 0), target 1 is exact
        assert cluster["pearson"] == pytest.approx(1.0) and cluster["spearman"] == pytest.approx(1.0)
        assert cluster["slope"] == pytest.approx(0.5)  # mean of 0 and 1
        pooled = stats.pearsonr([1.0, 2.0, 4.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0, 2.0, 3.0]).statistic
        assert cluster["pearson_pooled"] == pytest.approx(pooled)

    def test_orders_are_separate_cells_and_missing_pairs_are_dropped(self, tables):
        predicted, truth, meta = tables
        second = predicted.with_columns(pl.lit(2, dtype=pl.Int8).alias("order"), pl.col("score") * 2)
        both = pl.concat([predicted, second]).filter(pl.col("group_id") != "r3")
        got = group_fidelity(both, truth, meta)
        assert got.height == 4 and got.columns[:4] == ["method", "order", "strategy", "fraction"]
        random = got.filter(pl.col("strategy") == "random").sort("order")
        assert random["n_groups"].to_list() == [2, 2]
        assert random["slope"].to_list() == pytest.approx([-0.25, -0.125])

    def test_duplicated_group_meta(self, tables):
        predicted, truth, meta = tables
        with pytest.raises(DataError, match="groups_meta repeats a group_id"):
            group_fidelity(predicted, truth, pl.concat([meta, meta.head(1)]))
