"""AirRep scoring: score tables and group scores against dense loops, LDS with attention, type@1."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats

from tda.airrep.score import group_score_frame, score_frame
from tda.errors import DataError, ModelError
from tda.evaluation.lds import lds
from tda.evaluation.topk import type_at_1

N_TRAIN, N_TARGET, DIM = 37, 11, 8


@pytest.fixture
def emb() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "target_ids": np.arange(N_TARGET) * 5 + 1000,
        "target_emb": torch.randn(N_TARGET, DIM, generator=gen),
        "train_ids": np.arange(N_TRAIN) * 3 + 7,
        "train_emb": torch.randn(N_TRAIN, DIM, generator=gen),
    }


def dense(emb: dict, cosine: bool = False) -> np.ndarray:
    """The (m, n) score matrix in float64."""
    t, z = emb["target_emb"].double(), emb["train_emb"].double()
    if cosine:
        t, z = t / t.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    return (t @ z.T).numpy()


class TestScoreFrame:
    @pytest.mark.parametrize("block_size", [1, 4, 11, 256])
    @pytest.mark.parametrize("cosine", [False, True])
    def test_all_pairs(self, emb, block_size, cosine):
        got = score_frame("airrep", **emb, block_size=block_size, cosine=cosine)
        assert got.schema == pl.Schema(
            {"method": pl.String, "target_id": pl.Int64, "example_id": pl.Int64, "score": pl.Float32}
        )
        assert got.height == N_TARGET * N_TRAIN and set(got["method"]) == {"airrep"}
        t = np.searchsorted(emb["target_ids"], got["target_id"].to_numpy())
        z = np.searchsorted(emb["train_ids"], got["example_id"].to_numpy())
        assert not got.select(pl.struct("target_id", "example_id").is_duplicated().any()).item()
        np.testing.assert_allclose(got["score"].to_numpy(), dense(emb, cosine)[t, z], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("block_size", [1, 4, 256])
    @pytest.mark.parametrize("top_k", [1, 6, 500])
    @pytest.mark.parametrize("cosine", [False, True])
    def test_top_k(self, emb, block_size, top_k, cosine):
        got = score_frame("airrep", **emb, top_k=top_k, block_size=block_size, cosine=cosine)
        k = min(top_k, N_TRAIN)
        assert got.height == N_TARGET * k
        full = dense(emb, cosine)
        for i, target in enumerate(emb["target_ids"]):
            rows = got.filter(pl.col("target_id") == target)
            expected = np.sort(full[i])[::-1][:k]
            np.testing.assert_allclose(rows["score"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
            z = np.searchsorted(emb["train_ids"], rows["example_id"].to_numpy())
            np.testing.assert_allclose(full[i, z], expected, rtol=1e-5, atol=1e-5)

    def test_empty_and_invalid(self, emb):
        empty = score_frame(
            "m", emb["target_ids"][:0], emb["target_emb"][:0], emb["train_ids"], emb["train_emb"]
        )
        assert empty.height == 0 and empty.schema["score"] == pl.Float32
        with pytest.raises(DataError, match="train_ids has 36 ids but train_emb 37 rows"):
            score_frame("m", emb["target_ids"], emb["target_emb"], emb["train_ids"][:-1], emb["train_emb"])
        with pytest.raises(ModelError, match="same model"):
            score_frame("m", emb["target_ids"], emb["target_emb"][:, :4], emb["train_ids"], emb["train_emb"])
        with pytest.raises(DataError, match="top_k 0"):
            score_frame("m", **emb, top_k=0)


class TestGroupScoreFrame:
    @pytest.fixture
    def groups(self) -> tuple[list[str], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(1)
        sizes = [1, 5, 12, 3, 37, 2]
        return [f"g{i}" for i in range(len(sizes))], [
            torch.randperm(N_TRAIN, generator=gen)[:s] for s in sizes
        ]

    @pytest.mark.parametrize("aggregation", ["attention", "sum"])
    @pytest.mark.parametrize("block_size", [None, 1, 4])
    def test_equals_a_per_group_loop(self, emb, groups, aggregation, block_size):
        names, members = groups
        got = group_score_frame(
            "airrep", **emb, group_ids=names, members=members, aggregation=aggregation, block_size=block_size
        )
        assert got.schema == pl.Schema(
            {
                "method": pl.String,
                "order": pl.Int8,
                "target_id": pl.Int64,
                "group_id": pl.String,
                "score": pl.Float64,
            }
        )
        assert got.height == N_TARGET * len(names) and set(got["order"]) == {0}
        full = dense(emb)
        expected = {}
        for i, target in enumerate(emb["target_ids"]):
            for name, rows in zip(names, members, strict=True):
                s = full[i, rows.numpy()]
                if aggregation == "attention":
                    w = np.exp(np.abs(s) - np.abs(s).max())
                    expected[(target, name)] = float((w / w.sum() * s).sum())
                else:
                    expected[(target, name)] = float(s.sum())
        observed = {(r["target_id"], r["group_id"]): r["score"] for r in got.iter_rows(named=True)}
        assert observed.keys() == expected.keys()
        for key, value in expected.items():
            assert observed[key] == pytest.approx(value, rel=1e-5, abs=1e-5)

    def test_invalid(self, emb, groups):
        names, members = groups
        with pytest.raises(ModelError, match="aggregation 'max' is unknown"):
            group_score_frame("m", **emb, group_ids=names, members=members, aggregation="max")
        with pytest.raises(DataError, match="outside train_emb's 37 rows"):
            group_score_frame("m", **emb, group_ids=["a"], members=[torch.tensor([0, 37])], aggregation="sum")
        with pytest.raises(DataError, match="repeats 'a'"):
            group_score_frame("m", **emb, group_ids=["a", "a"], members=members[:2], aggregation="sum")
        with pytest.raises(DataError, match="one name per group"):
            group_score_frame("m", **emb, group_ids=names[:2], members=members, aggregation="sum")


@pytest.fixture
def study() -> dict[str, pl.DataFrame]:
    """All-pairs scores of two methods, 4 fit and 15 eval subsets of unequal size, and losses."""
    rng = np.random.default_rng(3)
    example_ids, target_ids = np.arange(25) * 2 + 50, np.arange(6) + 900
    scores = pl.concat(
        [
            pl.DataFrame(
                {
                    "method": method,
                    "target_id": np.repeat(target_ids, len(example_ids)),
                    "example_id": np.tile(example_ids, len(target_ids)),
                    "score": (scale * rng.normal(size=len(target_ids) * len(example_ids))).astype(np.float32),
                }
            )
            for method, scale in (("airrep", 3.0), ("repsim", 40.0))  # large scores test the stable softmax
        ]
    )
    subsets = pl.concat(
        [
            pl.DataFrame(
                {
                    "subset_id": np.full(size, j, dtype=np.int32),
                    "example_id": rng.choice(example_ids, size, replace=False),
                    "purpose": "fit" if j < 4 else "eval",
                }
            )
            for j, size in enumerate(rng.integers(3, 12, size=19))
        ]
    )
    effects = pl.DataFrame(
        {
            "subset_id": np.repeat(np.arange(19, dtype=np.int32), len(target_ids)),
            "target_id": np.tile(target_ids, 19),
            "loss": rng.normal(size=19 * len(target_ids)).astype(np.float32),
        }
    )
    return {"scores": scores, "subsets": subsets, "effects": effects}


def slow_attention_lds(scores: pl.DataFrame, subsets: pl.DataFrame, effects: pl.DataFrame) -> dict:
    """(method, target_id) → Spearman ρ of attention-pooled predictions, one (subset, target) at a time."""
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
            s = [float(table[(method, target, z)]) for z in members]
            weights = [math.exp(abs(v) - max(abs(u) for u in s)) for v in s]
            predicted.append(sum(w * v for w, v in zip(weights, s, strict=True)) / sum(weights))
            measured.append(-loss[(j, target)])
        out[(method, target)] = stats.spearmanr(predicted, measured).statistic
    return out


class TestAttentionLds:
    def test_equals_a_slow_loop_with_scipy(self, study):
        got = lds(**study, aggregation="attention")
        assert set(got["aggregation"]) == {"attention"} and got.height == 12
        observed = {(r["method"], r["target_id"]): r["spearman"] for r in got.iter_rows(named=True)}
        expected = slow_attention_lds(**study)
        assert observed.keys() == expected.keys()
        for key, value in expected.items():
            assert observed[key] == pytest.approx(value, abs=1e-12)

    def test_differs_from_sum(self, study):
        attention = lds(**study, aggregation="attention")["spearman"].to_numpy()
        assert not np.allclose(attention, lds(**study, aggregation="sum")["spearman"].to_numpy())

    def test_top_k_table_is_refused(self, study):
        top = study["scores"].sort("score", descending=True).group_by("method", "target_id").head(5)
        with pytest.raises(DataError, match="attention aggregation needs all pairs.*top_k: null"):
            lds(top, study["subsets"], study["effects"], aggregation="attention")


class TestTypeAt1:
    @pytest.fixture
    def groups(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "example_id": [1, 2, 3, 4, 10, 11, 12],
                "group": ["math", "code", "math", None, "math", "code", "code"],
            }
        )

    def test_hand_made(self, groups):
        scores = pl.DataFrame(
            {
                "method": ["a"] * 6 + ["b"] * 4,
                "target_id": [10, 10, 10, 11, 11, 12, 10, 10, 11, 11],
                "example_id": [1, 2, 3, 3, 2, 4, 2, 1, 3, 2],
                "score": [0.5, 0.9, 0.9, 0.1, 0.2, 5.0, 0.3, float("nan"), 1.0, 1.0],
            },
            schema_overrides={"score": pl.Float32},
        )
        got = type_at_1(scores, groups)
        assert got.schema == pl.Schema({"method": pl.String, "target_id": pl.Int64, "hit": pl.Boolean})
        # a/10: tie 2 (code) and 3 (math) → 2, a miss; a/11: 2 (code), a hit; a/12: 4 has no group, a miss;
        # b/10: 2 (code) beats the NaN of 1, a miss; b/11: tie 3 and 2 → 2 (code), a hit
        assert got.rows() == [
            ("a", 10, False),
            ("a", 11, True),
            ("a", 12, False),
            ("b", 10, False),
            ("b", 11, True),
        ]

    def test_invalid(self, groups):
        scores = pl.DataFrame({"method": ["a"], "target_id": [13], "example_id": [1], "score": [1.0]})
        with pytest.raises(DataError, match="no group for target 13"):
            type_at_1(scores, groups)
        with pytest.raises(DataError, match="groups lacks column.*group"):
            type_at_1(scores, groups.drop("group"))
        with pytest.raises(DataError, match="lacks example_id 99"):
            type_at_1(
                scores.with_columns(pl.lit(10).alias("target_id"), pl.lit(99).alias("example_id")), groups
            )
        with pytest.raises(DataError, match="repeats example_id 1"):
            type_at_1(scores, pl.concat([groups, groups.head(1)]))
