"""Streaming top-k of dot products: targets × training chunks in blocks, never the (m, n) matrix.

The scores are s(t, z) = t·z (or t·z / ‖z‖ with `normalize_train`) between an in-memory (m, d) target
matrix, already preconditioned or normalised by the caller, and training features that arrive in
chunks `(ids (r,) int64, feats (r, d) float16|float32)`, e.g. one Parquet shard at a time.

How (`stream_topk`): each chunk is cast to float32 `rows_per_block` rows at a time into a reused
buffer, and each block of `target_block` targets is scored by one matmul into a reused
(target_block, rows_per_block) buffer. Only candidates leave a score block: once a target keeps k
scores, its k-th best is its threshold; one `amax` per group of 64 columns finds the groups that reach
it, and only those are copied out and compared. Candidates wait in a per-target buffer of k slots,
merged into the kept scores (an exact selection) when it would overflow. On random data a block's
candidates shrink like k · rows / seen, so after the first blocks the matmul is nearly all the time:
`TopK.seconds` says where it went ("cast", "matmul", "filter", "merge").

Threads: the matmul, the cast and the passes over a whole score block use the caller's torch threads
(`torch.set_num_threads`); the bookkeeping on small tensors runs on one thread. On cores shared with
other busy processes every parallel op waits for a time slice, and with dozens of small ops per block
that made scoring 5× slower under load (and only ~10% faster when the machine was idle).

Order and ties: a target's top k are its k highest scores, ties broken by the smaller example id, as a
stable sort of the full score matrix's row by (score descending, example id ascending) takes them;
`TopK.frame` lists them in that order. Results therefore do not depend on chunking, block sizes or the
order in which `TopK.merge` combines parallel workers. Features must be finite (NaN or inf raises);
`TopK.update` takes finite scores.

Memory: peak ≈ block_bytes (the score block, target_block × rows_per_block × 4 bytes, plus the float32
rows, rows_per_block × d × 4) + m × k × 24 bytes (kept scores and the buffer: float32 score + int64
id each) + one block's candidates (at most the score block's size, about k · rows / seen per target
on random data); independent of n. A chunk is read in place, never copied whole.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import polars as pl
import torch
from torch import Tensor

from tda.errors import InfluenceError

SCORES_SCHEMA = {"method": pl.String, "target_id": pl.Int64, "example_id": pl.Int64, "score": pl.Float32}
TARGET_BLOCK = 1024  # targets per matmul
BLOCK_BYTES = 16 << 20  # the score block plus the float32 rows of one matmul
GROUP = 64  # columns per group of the candidate filter (one amax each)
NO_ID = torch.iinfo(torch.int64).max  # id of an empty slot or a padding column: after every real id

Chunk = tuple[np.ndarray | Tensor, np.ndarray | Tensor]  # (ids (r,), feats (r, d))


class TopK:
    """Per target, the running k highest scores and their example ids.

    Attributes:
        k: how many scores each target keeps.
        values: (m, k) float32 kept scores, unordered within a row; empty slots hold -inf.
        ids: (m, k) int64 example ids of `values`; empty slots hold `NO_ID`.
        count: (m,) int64 filled slots per target (= min(k, training rows seen)).
        seconds: time per phase, summed: "cast" and "matmul" (filled by `stream_topk`), "filter"
            (thresholds and candidates) and "merge" (exact selections).
    """

    def __init__(self, m: int, k: int) -> None:
        if k < 1:
            raise InfluenceError(f"top_k {k}: must be at least 1; give a positive k or null for all pairs")
        self.k = k
        self.values = torch.full((m, k), -torch.inf)  # (m, k)
        self.ids = torch.full((m, k), NO_ID, dtype=torch.int64)  # (m, k)
        self.count = torch.zeros(m, dtype=torch.int64)  # (m,)
        self.seconds: dict[str, float] = {}
        self._threshold = torch.full((m,), -torch.inf)  # (m,) k-th best kept score; -inf until k kept
        self._buffer_values = torch.full((m, k), -torch.inf)  # (m, k) candidates not merged yet
        self._buffer_ids = torch.full((m, k), NO_ID, dtype=torch.int64)  # (m, k)
        self._fill = torch.zeros(m, dtype=torch.int64)  # (m,) buffer slots in use

    def update(self, ids: np.ndarray | Tensor, scores: Tensor, start: int = 0) -> None:
        """Take a block of scores: (b, r) for targets start..start+b-1 and the examples `ids` (r,).

        Scores must be finite (a NaN would hide its group of 64 columns); columns whose id is `NO_ID`
        are padding and must score -inf.
        """
        ids = _tensor(ids).to(torch.int64).reshape(-1)
        rows = slice(start, start + scores.shape[0])
        if scores.ndim != 2 or scores.shape[1] != len(ids) or not 0 <= start <= rows.stop <= len(self.count):
            raise InfluenceError(
                f"a score block of shape {tuple(scores.shape)} at target {start} does not fit {len(ids)} "
                f"ids and {len(self.count)} targets; give (b, r) scores for r ids and targets in range"
            )
        real = int((ids != NO_ID).sum())
        if real == 0 or scores.shape[0] == 0:
            return
        t0, merging, threads = time.perf_counter(), self.seconds.get("merge", 0.0), torch.get_num_threads()
        with _threads(1):  # bookkeeping on small tensors; passes over the whole block use `threads`
            scores, ids = _whole_groups(scores.to(torch.float32).contiguous(), ids)  # (b, r_pad), (r_pad,)
            threshold = self._threshold[rows]  # (b,)
            partial = bool((self.count[rows] < self.k).any())
            if partial:  # a bound on the block's own k-th best bounds what it can add
                threshold = torch.maximum(threshold, _kth_bound(scores, min(self.k, scores.shape[1])))
            candidates = _candidates(scores, ids, threshold, threads)  # rows, scores, ids (c,): row-major
            self.count[rows] = (self.count[rows] + real).clamp_max(self.k)
            self._take(rows, *candidates, merge_now=partial)
        _add(self.seconds, "filter", t0 + self.seconds.get("merge", 0.0) - merging)  # merges apart

    def merge(self, other: TopK) -> TopK:
        """The top k of both (e.g. two workers' results over different training shards), as a new TopK."""
        if other.k != self.k or other.values.shape != self.values.shape:
            raise InfluenceError(
                f"cannot merge a top-{other.k} of {other.values.shape[0]} targets into a top-{self.k} of "
                f"{self.values.shape[0]} targets; merge results of the same targets and k"
            )
        self._flush()
        other._flush()
        merged = TopK(len(self.count), self.k)
        merged.values, merged.ids = _select(
            torch.cat([self.values, other.values], 1), torch.cat([self.ids, other.ids], 1), self.k
        )
        merged.count = (self.count + other.count).clamp_max(self.k)
        merged._threshold = torch.where(merged.count == self.k, merged.values.amin(1), -torch.inf)
        for phase in {*self.seconds, *other.seconds}:
            merged.seconds[phase] = self.seconds.get(phase, 0.0) + other.seconds.get(phase, 0.0)
        return merged

    def frame(self, method: str, target_ids: np.ndarray | Tensor) -> pl.DataFrame:
        """The `scores` table: target-major, each target's rows by score descending, then example id."""
        target_ids = _target_ids(target_ids, len(self.count))
        self._flush()
        order = _ranked(self.values, self.ids)  # (m, k)
        keep = (torch.arange(self.k).unsqueeze(0) < self.count.unsqueeze(1)).numpy()  # (m, k)
        return pl.DataFrame(
            {
                "method": pl.repeat(method, int(keep.sum()), dtype=pl.String, eager=True),
                "target_id": np.broadcast_to(target_ids[:, None], keep.shape)[keep],
                "example_id": self.ids.gather(1, order).numpy()[keep],
                "score": self.values.gather(1, order).numpy()[keep],
            },
            schema=SCORES_SCHEMA,
        )

    def __getstate__(self) -> dict:
        """Pickled (e.g. back from a Ray task) without the candidate buffer, merged in first."""
        self._flush()
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_buffer")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._buffer_values = torch.full_like(self.values, -torch.inf)
        self._buffer_ids = torch.full_like(self.ids, NO_ID)

    def _take(self, rows: slice, cand_rows: Tensor, values: Tensor, ids: Tensor, merge_now: bool) -> None:
        """Buffer a block's candidates (row-major, rows counted from rows.start); merge on overflow."""
        b = rows.stop - rows.start
        per_row = torch.bincount(cand_rows, minlength=b)  # (b,)
        slot = torch.arange(len(cand_rows)) - (per_row.cumsum(0) - per_row)[cand_rows]  # place in its row
        fill = self._fill[rows]  # (b,)
        if merge_now or int((fill + per_row).max()) > self.k:
            extra_values = values.new_full((b, int(per_row.max())), -torch.inf)  # (b, most per row)
            extra_ids = ids.new_full(extra_values.shape, NO_ID)
            extra_values[cand_rows, slot], extra_ids[cand_rows, slot] = values, ids
            self._merge_buffer(rows, extra_values, extra_ids)
            return
        at = (rows.start + cand_rows, fill[cand_rows] + slot)
        self._buffer_values[at], self._buffer_ids[at] = values, ids
        self._fill[rows] += per_row

    def _flush(self) -> None:
        """Merge every target's waiting candidates into its kept scores."""
        if bool((self._fill > 0).any()):
            m = len(self.count)
            self._merge_buffer(slice(0, m), self.values.new_empty(m, 0), self.ids.new_empty(m, 0))

    def _merge_buffer(self, rows: slice, extra_values: Tensor, extra_ids: Tensor) -> None:
        """Kept scores of `rows` := the top k of kept ∪ buffer ∪ extra (b, c); the buffer is emptied."""
        t0 = time.perf_counter()
        width = int(self._fill[rows].max())
        self.values[rows], self.ids[rows] = _select(
            torch.cat([self.values[rows], self._buffer_values[rows, :width], extra_values], 1),
            torch.cat([self.ids[rows], self._buffer_ids[rows, :width], extra_ids], 1),
            self.k,
        )
        self._buffer_values[rows, :width], self._buffer_ids[rows, :width] = -torch.inf, NO_ID
        self._fill[rows] = 0
        full = self.count[rows] == self.k
        self._threshold[rows] = torch.where(full, self.values[rows].amin(1), -torch.inf)
        _add(self.seconds, "merge", t0)


def stream_topk(
    targets: Tensor,
    chunks: Iterable[Chunk],
    top_k: int,
    *,
    target_block: int = TARGET_BLOCK,
    block_bytes: int = BLOCK_BYTES,
    normalize_train: bool = False,
) -> TopK:
    """The top k training examples per target by dot product, the training rows streamed in chunks.

    Args:
        targets: (m, d) target features (preconditioned or normalised by the caller); cast to float32.
        chunks: (ids (r,) int64, feats (r, d) float16|float32) pairs, numpy or torch; r may be 0.
        top_k: scores kept per target (≥ 1; a target keeps min(k, n) when only n < k rows arrive).
        target_block: targets scored per matmul.
        block_bytes: bound on the float32 score block and rows of one matmul: rows_per_block =
            block_bytes / 4 / (target_block + d), rounded down to a multiple of 64 (at least 64).
        normalize_train: divide each score by the training row's norm (cosine, with unit targets).

    Returns:
        The running top k after the last chunk; `TopK.frame` gives the `scores` table.
    """
    top = TopK(len(targets), top_k)
    rows = block_bytes // 4 // (min(target_block, max(len(targets), 1)) + targets.shape[-1])
    rows = max(GROUP, rows // GROUP * GROUP)
    for ids, scores, start in _score_blocks(
        targets, chunks, target_block, rows, normalize_train, top.seconds
    ):
        top.update(ids, scores, start)
    return top


def stream_scores(
    method: str,
    target_ids: np.ndarray | Tensor,
    targets: Tensor,
    chunks: Iterable[Chunk],
    *,
    target_block: int = TARGET_BLOCK,
    normalize_train: bool = False,
) -> Iterator[pl.DataFrame]:
    """All pairs as `scores` frames, one per (chunk, target block), each target-major in chunk order.

    A chunk is scored whole (memory ≈ target_block × r × 4 bytes plus the frame), so the caller sizes
    the chunks; with a single chunk the frames concatenate to a target-major table.
    """
    target_ids = _target_ids(target_ids, len(targets))
    for ids, feats in chunks:
        ids, feats = _chunk(ids, feats, targets)
        r = len(ids)
        if r == 0:
            continue
        rows = -(-r // GROUP) * GROUP
        for _, scores, start in _score_blocks(
            targets, [(ids, feats)], target_block, rows, normalize_train, {}
        ):
            b = scores.shape[0]
            yield pl.DataFrame(
                {
                    "method": pl.repeat(method, b * r, dtype=pl.String, eager=True),
                    "target_id": np.repeat(target_ids[start : start + b], r),
                    "example_id": np.tile(ids.numpy(), b),
                    "score": np.array(scores[:, :r].numpy()).ravel(),  # a copy: the buffer is reused
                },
                schema=SCORES_SCHEMA,
            )


def _score_blocks(
    targets: Tensor,
    chunks: Iterable[Chunk],
    target_block: int,
    rows_per_block: int,
    normalize_train: bool,
    seconds: dict[str, float],
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """(ids (r_pad,), scores (b, r_pad), first target) per block, the chunks cut `rows_per_block` rows
    (a multiple of 64) at a time; padding columns score -inf with `NO_ID`.

    The score block and the float32 rows are buffers reused across blocks: a block is valid until the
    next one is drawn.
    """
    if target_block < 1:
        raise InfluenceError(f"target_block {target_block}: must be at least 1; give a positive number")
    if targets.ndim != 2:
        raise InfluenceError(f"targets have shape {tuple(targets.shape)}; give a 2-d (m, d) matrix")
    targets = targets.detach().to(torch.float32).contiguous()
    if not bool(targets.isfinite().all()):
        bad = int(targets.isfinite().all(1).logical_not().nonzero()[0])
        raise InfluenceError(f"target row {bad} holds NaN or inf; fix or drop that target")
    m, d = targets.shape
    target_block = min(target_block, max(m, 1))
    score_buffer = torch.empty(target_block * rows_per_block)
    feat_buffer = torch.empty(rows_per_block, d)
    for chunk_ids, feats in chunks:
        chunk_ids, feats = _chunk(chunk_ids, feats, targets)
        for lo in range(0, len(chunk_ids) if m else 0, rows_per_block):
            t0 = time.perf_counter()
            ids, train, r = _rows(chunk_ids, feats, lo, feat_buffer, normalize_train)  # (r_pad,), (r_pad, d)
            _add(seconds, "cast", t0)
            for start in range(0, m, target_block):
                t0 = time.perf_counter()
                block = targets[start : start + target_block]  # (b, d)
                scores = score_buffer[: len(block) * len(ids)].view(len(block), len(ids))
                torch.mm(block, train.T, out=scores)  # (b, r_pad)
                scores[:, r:] = -torch.inf
                _add(seconds, "matmul", t0)
                yield ids, scores, start


def _rows(
    chunk_ids: Tensor, feats: Tensor, lo: int, buffer: Tensor, normalize: bool
) -> tuple[Tensor, Tensor, int]:
    """Rows lo.. of a chunk, as many (r) as `buffer` holds, as float32 in `buffer` padded to 64 rows."""
    r = min(len(buffer), len(chunk_ids) - lo)
    r_pad = -(-r // GROUP) * GROUP
    ids = torch.full((r_pad,), NO_ID, dtype=torch.int64)
    ids[:r] = chunk_ids[lo : lo + r]
    train = buffer[:r_pad]  # (r_pad, d)
    train[:r].copy_(feats[lo : lo + r])
    train[r:].zero_()
    if not bool(train[:r].sum().isfinite()):  # one fast pass; the finite sums of features don't overflow
        bad = int(ids[:r][~train[:r].isfinite().all(1)][0])
        raise InfluenceError(f"the features of example {bad} hold NaN or inf; fix or drop that row")
    if normalize:
        train[:r].div_(train[:r].norm(dim=1, keepdim=True).clamp_min(1e-12))
    return ids, train, r


def _chunk(ids: np.ndarray | Tensor, feats: np.ndarray | Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk as (ids (r,) int64, feats (r, d)) tensors, checked against the targets' dimension."""
    ids, feats = _tensor(ids).to(torch.int64).reshape(-1), _tensor(feats).detach()
    if feats.ndim != 2 or feats.shape[0] != len(ids):
        raise InfluenceError(
            f"a chunk has {len(ids)} ids and features of shape {tuple(feats.shape)}; give (r,) ids and (r, d)"
        )
    if feats.shape[1] != targets.shape[1]:
        raise InfluenceError(
            f"training features are {feats.shape[1]}-d but targets {targets.shape[1]}-d; "
            "score features of the same projection"
        )
    return ids, feats


def _tensor(array: np.ndarray | Tensor) -> Tensor:
    """A tensor sharing `array`'s memory; read-only arrays (e.g. from Arrow) are only read here."""
    if isinstance(array, Tensor):
        return array
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.as_tensor(np.asarray(array))


def _target_ids(target_ids: np.ndarray | Tensor, m: int) -> np.ndarray:
    target_ids = np.asarray(target_ids).astype(np.int64, copy=False).ravel()
    if len(target_ids) != m:
        raise InfluenceError(f"target_ids has {len(target_ids)} ids for {m} targets; give one id per target")
    return target_ids


def _whole_groups(scores: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """`scores` (b, r) and `ids` (r,) padded to whole groups of 64 columns (-inf, `NO_ID`)."""
    pad = -scores.shape[1] % GROUP
    if pad == 0:
        return scores, ids
    scores = torch.nn.functional.pad(scores, (0, pad), value=-torch.inf)
    return scores, torch.cat([ids, ids.new_full((pad,), NO_ID)])


def _candidates(
    scores: Tensor, ids: Tensor, threshold: Tensor, threads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of `scores` (b, r_pad) that reach their row's `threshold` (b,): rows, scores, ids (c,).

    One `amax` per group of 64 columns (the one pass over the block) finds the groups worth a look;
    only those are copied out and compared, or the whole block when most groups are. Row-major order.
    """
    b, r_pad = scores.shape
    per_row = r_pad // GROUP
    flat = scores.view(b * per_row, GROUP)  # (b·G, 64)
    with _threads(threads):
        peaks = flat.amax(1).view(b, per_row)  # (b, G)
    hit = peaks >= threshold.unsqueeze(1)  # (b, G)
    if int(hit.sum()) * 2 > hit.numel():  # dense (the first blocks): compare every entry
        with _threads(threads):
            rows, columns = (scores >= threshold.unsqueeze(1)).nonzero().unbind(1)
            return rows, scores[rows, columns], ids[columns]
    hit = hit.view(-1).nonzero().squeeze(1)  # (h,) groups, row-major
    values = flat.index_select(0, hit)  # (h, 64)
    rows = hit // per_row
    keep = (values >= threshold[rows].unsqueeze(1)).view(-1).nonzero().squeeze(1)  # (c,)
    group = keep // GROUP
    columns = (hit[group] % per_row) * GROUP + keep % GROUP
    return rows[group], values.view(-1)[keep], ids[columns]


def _kth_bound(scores: Tensor, k: int) -> Tensor:
    """A value ≤ each row's k-th best score of `scores` (b, r_pad), k ≤ r_pad: (b,).

    The k-th best of the maxima of k or more disjoint groups of columns is at most the row's k-th best
    (k distinct entries reach it), and much cheaper than `torch.topk` over the whole row; with 4k groups
    or more (when the row is that long) it lets few more than k entries through.
    """
    b, r_pad = scores.shape
    size = 1 << max(0, min(GROUP.bit_length() - 1, (r_pad // (4 * k)).bit_length() - 1))  # ≥ 4k groups
    peaks = scores.view(b, r_pad // size, size).amax(2) if size > 1 else scores  # (b, r_pad / size)
    return torch.topk(peaks, k, dim=1, sorted=False).values.amin(1)


def _select(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's top k of (b, W ≥ k) by score descending, ties by the smaller id: (b, k) each, unordered.

    `torch.topk` picks arbitrarily among scores equal to the k-th; rows where such ties cross the
    boundary are re-selected by stable sorts.
    """
    top, index = torch.topk(values, k, dim=1, sorted=False)  # (b, k)
    kth = top.amin(1, keepdim=True)
    tied = ((values == kth).sum(1) != (top == kth).sum(1)).nonzero().squeeze(1)
    if len(tied):
        index[tied] = _ranked(values[tied], ids[tied])[:, :k]
        top[tied] = values[tied].gather(1, index[tied])
    return top, ids.gather(1, index)


def _ranked(values: Tensor, ids: Tensor) -> Tensor:
    """(b, W) column order of each row by score descending, then id ascending (two stable sorts)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    by_score = torch.sort(values.gather(1, by_id), dim=1, descending=True, stable=True).indices
    return by_id.gather(1, by_score)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _add(seconds: dict[str, float], phase: str, since: float) -> None:
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - since
