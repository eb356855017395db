"""The streaming top-k kernel against the full score matrix: chunkings, blocks, dtypes, ties, merges."""

from __future__ import annotations

import pickle

import numpy as np
import polars as pl
import pytest
import torch

from tda.errors import InfluenceError
from tda.influence.topk import NO_ID, SCORES_SCHEMA, TopK, stream_scores, stream_topk

M, N, D = 13, 300, 8


def full_topk(targets: torch.Tensor, feats: torch.Tensor, ids: np.ndarray, k: int | None, cosine=False):
    """The expected table from the whole (m, n) float64 matrix: rows by (score desc, id asc), k per target."""
    t, z = targets.double(), feats.double()
    if cosine:
        z = z / z.norm(dim=1, keepdim=True)
    scores = (t @ z.T).numpy()  # (m, n)
    rows = []
    for i, row in enumerate(scores):
        order = np.lexsort((ids, -row))[: len(ids) if k is None else k]
        rows += [(i, int(ids[j]), float(row[j])) for j in order]
    return pl.DataFrame(
        rows, schema={"target_id": pl.Int64, "example_id": pl.Int64, "score": pl.Float64}, orient="row"
    )


def chunked(ids: np.ndarray, feats: torch.Tensor, size: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    return [(ids[lo : lo + size], feats[lo : lo + size]) for lo in range(0, len(ids), size)]


def assert_same(got: pl.DataFrame, expected: pl.DataFrame, exact: bool = True) -> None:
    assert got.schema == pl.Schema(SCORES_SCHEMA)
    assert got.select("target_id", "example_id").rows() == expected.select("target_id", "example_id").rows()
    tol = 0 if exact else 1e-5
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=tol, atol=tol)


@pytest.fixture
def data() -> dict:
    """Gaussian targets and features, shuffled example ids (arrival order ≠ id order)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "targets": torch.randn(M, D, generator=gen),
        "feats": torch.randn(N, D, generator=gen),
        "ids": np.random.default_rng(0).permutation(N).astype(np.int64) * 7 + 3,
    }


@pytest.fixture
def tied() -> dict:
    """Small-integer features: float32 dot products are exact and many scores tie."""
    gen = torch.Generator().manual_seed(1)
    return {
        "targets": torch.randint(-2, 3, (M, D), generator=gen).float(),
        "feats": torch.randint(-1, 2, (N, D), generator=gen).float(),
        "ids": np.random.default_rng(1).permutation(N).astype(np.int64),
    }


class TestStreamTopK:
    @pytest.mark.parametrize("chunk", [1, 37, 64, 300])
    @pytest.mark.parametrize(("target_block", "rows"), [(1, 64), (5, 128), (1024, 4096)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_equals_the_full_matrix(self, data, chunk, target_block, rows, dtype):
        feats = data["feats"].to(dtype)
        block_bytes = 4 * rows * (min(target_block, M) + D)  # score blocks of (target_block, rows)
        top = stream_topk(
            data["targets"],
            chunked(data["ids"], feats, chunk),
            10,
            target_block=target_block,
            block_bytes=block_bytes,
        )
        expected = full_topk(data["targets"], feats.float(), data["ids"], 10)
        assert_same(top.frame("m", np.arange(M)), expected, exact=False)
        assert top.count.tolist() == [10] * M

    @pytest.mark.parametrize("chunk", [1, 50, 300])
    @pytest.mark.parametrize("k", [1, 7, 40])
    def test_ties_go_to_the_smaller_id(self, tied, chunk, k):
        scores = tied["targets"] @ tied["feats"].T
        assert (scores == scores[:, :1]).sum() > M  # the data do tie
        top = stream_topk(
            tied["targets"], chunked(tied["ids"], tied["feats"], chunk), k, block_bytes=4 * 21 * 64
        )
        assert_same(top.frame("m", np.arange(M)), full_topk(tied["targets"], tied["feats"], tied["ids"], k))

    def test_all_scores_equal(self, tied):
        feats = torch.ones(N, D)
        top = stream_topk(tied["targets"], chunked(tied["ids"], feats, 70), 5)
        expected = np.sort(tied["ids"])[:5]
        assert all(
            (rows["example_id"].to_numpy() == expected).all()
            for _, rows in top.frame("m", np.arange(M)).group_by("target_id")
        )

    def test_cosine(self, data):
        targets = data["targets"] / data["targets"].norm(dim=1, keepdim=True)
        top = stream_topk(targets, chunked(data["ids"], data["feats"].half(), 64), 9, normalize_train=True)
        expected = full_topk(targets, data["feats"].half().float(), data["ids"], 9, cosine=True)
        assert_same(top.frame("m", np.arange(M)), expected, exact=False)
        assert top.frame("m", np.arange(M))["score"].max() <= 1 + 1e-6

    def test_k_larger_than_n(self, data):
        top = stream_topk(data["targets"], chunked(data["ids"][:20], data["feats"][:20], 6), 50)
        assert top.count.tolist() == [20] * M
        expected = full_topk(data["targets"], data["feats"][:20], data["ids"][:20], None)
        assert_same(top.frame("m", np.arange(M)), expected, exact=False)

    def test_empty_chunks(self, data):
        empty = (data["ids"][:0], data["feats"][:0])
        chunks = [empty, *chunked(data["ids"], data["feats"], 100), empty]
        top = stream_topk(data["targets"], chunks, 4)
        assert_same(
            top.frame("m", np.arange(M)), full_topk(data["targets"], data["feats"], data["ids"], 4), False
        )
        nothing = stream_topk(data["targets"], [empty], 4).frame("m", np.arange(M))
        assert nothing.height == 0 and nothing.schema == pl.Schema(SCORES_SCHEMA)
        no_targets = stream_topk(data["targets"][:0], chunked(data["ids"], data["feats"], 100), 4)
        assert no_targets.frame("m", np.arange(0)).height == 0

    def test_numpy_read_only_chunks(self, data):
        feats = data["feats"].half().numpy()
        feats.flags.writeable = False
        top = stream_topk(data["targets"], [(list(data["ids"]), feats)], 3)
        assert_same(
            top.frame("m", np.arange(M)),
            full_topk(data["targets"], data["feats"].half().float(), data["ids"], 3),
            False,
        )

    def test_threads_are_restored(self, data):
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            stream_topk(data["targets"], chunked(data["ids"], data["feats"], 100), 4)
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(before)

    def test_phases_are_timed(self, data):
        top = stream_topk(data["targets"], chunked(data["ids"], data["feats"], 100), 4)
        assert set(top.seconds) == {"cast", "matmul", "filter", "merge"}


class TestMerge:
    @pytest.mark.parametrize("k", [1, 10, 200])
    def test_two_halves_equal_the_whole(self, tied, k):
        ids, feats = tied["ids"], tied["feats"]
        first = stream_topk(tied["targets"], chunked(ids[:120], feats[:120], 50), k)
        second = stream_topk(tied["targets"], chunked(ids[120:], feats[120:], 50), k)
        whole = stream_topk(tied["targets"], chunked(ids, feats, 50), k).frame("m", np.arange(M))
        assert_same(first.merge(second).frame("m", np.arange(M)), whole)
        assert_same(second.merge(first).frame("m", np.arange(M)), whole)
        assert_same(whole, full_topk(tied["targets"], feats, ids, k))

    def test_pickled_results_merge(self, tied):
        """Workers' results travel pickled (Ray): the waiting candidates go along, merged."""
        ids, feats = tied["ids"], tied["feats"]
        parts = [stream_topk(tied["targets"], chunked(ids[lo::3], feats[lo::3], 30), 8) for lo in range(3)]
        parts = [pickle.loads(pickle.dumps(part)) for part in parts]
        merged = parts[0].merge(parts[1]).merge(parts[2])
        assert_same(merged.frame("m", np.arange(M)), full_topk(tied["targets"], feats, ids, 8))

    def test_mismatch(self):
        with pytest.raises(InfluenceError, match="cannot merge a top-3 .* into a top-2"):
            TopK(4, 2).merge(TopK(4, 3))


class TestUpdate:
    def test_blocks_of_any_width(self, data):
        """Blocks scored by the caller, widths not a multiple of 64, padding columns skipped."""
        scores = data["targets"] @ data["feats"].T  # (m, n)
        top = TopK(M, 6)
        for lo in range(0, N, 45):
            block = scores[:, lo : lo + 45]
            ids = data["ids"][lo : lo + 45]
            top.update(np.append(ids, NO_ID), torch.nn.functional.pad(block, (0, 1), value=-torch.inf))
        assert_same(
            top.frame("m", np.arange(M)), full_topk(data["targets"], data["feats"], data["ids"], 6), False
        )

    def test_target_rows(self, data):
        scores = data["targets"] @ data["feats"].T
        top = TopK(M, 5)
        top.update(data["ids"], scores[:4], start=0)
        top.update(data["ids"], scores[4:], start=4)
        assert_same(
            top.frame("m", np.arange(M)), full_topk(data["targets"], data["feats"], data["ids"], 5), False
        )


class TestStreamScores:
    @pytest.mark.parametrize("target_block", [1, 4, 64])
    @pytest.mark.parametrize("chunk", [37, 300])
    def test_all_pairs_equal_the_full_matrix(self, data, target_block, chunk):
        frames = list(
            stream_scores(
                "m",
                np.arange(M) + 100,
                data["targets"],
                chunked(data["ids"], data["feats"].half(), chunk),
                target_block=target_block,
            )
        )
        assert all(f.schema == pl.Schema(SCORES_SCHEMA) for f in frames) and set(
            pl.concat(frames)["method"]
        ) == {"m"}
        got = pl.concat(frames).sort("target_id", "example_id")
        scores = (data["targets"] @ data["feats"].half().float().T).numpy()
        expected = pl.DataFrame(
            {
                "target_id": np.repeat(np.arange(M) + 100, N),
                "example_id": np.tile(data["ids"], M),
                "score": scores.ravel(),
            }
        ).sort("target_id", "example_id")
        assert (
            got.select("target_id", "example_id").rows() == expected.select("target_id", "example_id").rows()
        )
        np.testing.assert_allclose(
            got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5, atol=1e-5
        )

    def test_empty_chunks_and_targets(self, data):
        empty = (data["ids"][:0], data["feats"][:0])
        frames = list(
            stream_scores("m", np.arange(M), data["targets"], [empty, (data["ids"], data["feats"]), empty])
        )
        assert sum(f.height for f in frames) == M * N
        assert list(stream_scores("m", [], data["targets"][:0], [(data["ids"], data["feats"])])) == []

    def test_one_chunk_is_target_major(self, data):
        frames = list(
            stream_scores("m", np.arange(M), data["targets"], [(data["ids"], data["feats"])], target_block=5)
        )
        got = pl.concat(frames)
        assert got["target_id"].to_list() == np.repeat(np.arange(M), N).tolist()
        assert got["example_id"].to_list() == np.tile(data["ids"], M).tolist()


class TestInvalid:
    def test_k_below_one(self, data):
        with pytest.raises(InfluenceError, match="top_k 0: must be at least 1"):
            stream_topk(data["targets"], [], 0)

    def test_dimension_mismatch(self, data):
        with pytest.raises(InfluenceError, match="training features are 5-d but targets 8-d"):
            stream_topk(data["targets"], [(data["ids"], data["feats"][:, :5])], 3)
        with pytest.raises(InfluenceError, match="training features are 5-d but targets 8-d"):
            list(stream_scores("m", np.arange(M), data["targets"], [(data["ids"], data["feats"][:, :5])]))

    def test_ids_and_rows_disagree(self, data):
        with pytest.raises(InfluenceError, match="a chunk has 299 ids and features of shape \\(300, 8\\)"):
            stream_topk(data["targets"], [(data["ids"][:-1], data["feats"])], 3)
        with pytest.raises(InfluenceError, match="target_ids has 2 ids for 13 targets"):
            stream_topk(data["targets"], [], 3).frame("m", [1, 2])
        with pytest.raises(InfluenceError, match="does not fit"):
            TopK(M, 3).update(data["ids"][:5], torch.zeros(M, 6))

    def test_bad_blocks_and_nan(self, data):
        with pytest.raises(InfluenceError, match="target_block 0"):
            stream_topk(data["targets"], [(data["ids"], data["feats"])], 3, target_block=0)
        feats = data["feats"].clone()
        feats[200, 3] = float("nan")
        with pytest.raises(InfluenceError, match=f"features of example {data['ids'][200]} hold NaN or inf"):
            stream_topk(data["targets"], chunked(data["ids"], feats.half(), 64), 3)
        targets = data["targets"].clone()
        targets[4, 0] = float("inf")
        with pytest.raises(InfluenceError, match="target row 4 holds NaN or inf"):
            stream_topk(targets, chunked(data["ids"], data["feats"], 64), 3)

    def test_messages_are_one_line(self, data):
        with pytest.raises(InfluenceError) as err:
            stream_topk(data["targets"], [(data["ids"], data["feats"][:, :5])], 3)
        assert "\n" not in str(err.value)
