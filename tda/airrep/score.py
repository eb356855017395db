"""Scores tables from embeddings: s(t, z) = e(t)·e(z) per pair, and attention-pooled group scores.

Both functions work on targets in blocks, so memory stays bounded however many targets there are:

- `score_frame` scores through the streaming kernel of `tda.influence.topk`: every pair, a
  (block, n_train) float32 matrix per block of targets, or the top k per target (ties by the smaller
  example id) through score blocks of at most 16 MiB, so with top_k memory is bounded by the blocks
  and the output, never n_target × n_train.
- `group_score_frame` pads the groups' member positions into a (G, kmax) index + mask, scores a block
  of targets against the distinct member rows once, gathers (block, G, kmax) and pools each group with
  `tda.airrep.model.group_scores` (attention = Σ softmax(|s|)_i s_i, or sum).

The outputs follow the `scores` and `group_scores` tables of the design.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

from tda.airrep.model import group_scores
from tda.errors import DataError, ModelError
from tda.influence.topk import SCORES_SCHEMA, stream_scores, stream_topk

GROUP_SCORES_SCHEMA = {
    "method": pl.String,
    "order": pl.Int8,
    "target_id": pl.Int64,
    "group_id": pl.String,
    "score": pl.Float64,
}
GROUP_AGGREGATIONS = ("attention", "sum")
GROUP_BLOCK_ELEMENTS = 1 << 24  # targets per block × G × kmax when group_score_frame picks the block


def score_frame(
    method: str,
    target_ids: np.ndarray,
    target_emb: Tensor,
    train_ids: np.ndarray,
    train_emb: Tensor,
    *,
    top_k: int | None = None,
    block_size: int = 256,
    cosine: bool = False,
) -> pl.DataFrame:
    """The scores table of one method: e(t)·e(z) (or the cosine) for all pairs or the top k per target.

    Args:
        method: the value of the `method` column.
        target_ids: (m,) ids of the targets, one per row of target_emb.
        target_emb: (m, d) target embeddings.
        train_ids: (n,) ids of the training examples, one per row of train_emb.
        train_emb: (n, d) training embeddings.
        top_k: keep the k highest scores per target (k clipped to n; ties by the smaller example id);
            None keeps all n × m pairs.
        block_size: targets scored per block; with all pairs memory ≈ block_size × n float32, with top_k
            the score block is at most `tda.influence.topk.BLOCK_BYTES`.
        cosine: divide each dot product by the two norms.

    Returns:
        method str, target_id int64, example_id int64, score float32: target-major, and with top_k
        each target's rows in descending score.
    """
    t_ids, z_ids = _ids(target_ids, target_emb, "target"), _ids(train_ids, train_emb, "train")
    _same_dim(target_emb, train_emb)
    if block_size < 1:
        raise DataError(f"block_size {block_size}: must be at least 1; give a positive number of targets")
    if top_k is not None and top_k < 1:
        raise DataError(f"top_k {top_k}: must be at least 1; give a positive k or null for all pairs")
    targets = target_emb.detach().cpu().float()  # (m, d)
    if cosine:
        targets = targets / targets.norm(dim=1, keepdim=True).clamp_min(1e-12)
    train = [(z_ids, train_emb.detach().cpu())]  # one chunk: the kernel scores it in bounded blocks
    if top_k is None:
        frames = list(
            stream_scores(method, t_ids, targets, train, target_block=block_size, normalize_train=cosine)
        )
        return pl.concat(frames) if frames else pl.DataFrame(schema=SCORES_SCHEMA)
    top = stream_topk(targets, train, top_k, target_block=block_size, normalize_train=cosine)
    return top.frame(method, t_ids)


def group_score_frame(
    method: str,
    target_ids: np.ndarray,
    target_emb: Tensor,
    train_ids: np.ndarray,
    train_emb: Tensor,
    group_ids: list[str],
    members: list[Tensor],
    aggregation: str,
    *,
    block_size: int | None = None,
) -> pl.DataFrame:
    """The group_scores table of one method: each group's member scores e(t)·e(z_i) pooled per target.

    Args:
        method: the value of the `method` column.
        target_ids: (m,) ids of the targets, one per row of target_emb.
        target_emb: (m, d) target embeddings.
        train_ids: (n,) ids of the training examples, one per row of train_emb.
        train_emb: (n, d) training embeddings.
        group_ids: G distinct group names.
        members: G integer tensors of row positions into train_emb (a group's members; sizes differ).
        aggregation: "attention" (Σ softmax(|s|)_i s_i) or "sum"; a group without members scores 0.
        block_size: targets per block; None picks one so block × G × kmax ≤ 2^24 elements.

    Returns:
        method str, order int8 (0), target_id int64, group_id str, score float64: target-major, the
        groups in the given order.
    """
    t_ids = _ids(target_ids, target_emb, "target")
    _ids(train_ids, train_emb, "train")
    _same_dim(target_emb, train_emb)
    if aggregation not in GROUP_AGGREGATIONS:
        raise ModelError(f"aggregation {aggregation!r} is unknown; choose {' or '.join(GROUP_AGGREGATIONS)}")
    if len(group_ids) != len(members):
        raise DataError(
            f"group_ids has {len(group_ids)} names but members {len(members)} groups; give one name per group"
        )
    names = pl.Series("group_id", [str(g) for g in group_ids], dtype=pl.String)
    if names.is_duplicated().any():
        raise DataError(f"group_ids repeats {names.filter(names.is_duplicated())[0]!r}; name each group once")
    train = train_emb.detach().float()
    index, mask, rows = _padded(members, train.shape[0])  # (G, kmax), (G, kmax), (u,)
    member_emb = train[rows.to(train.device)]  # (u, d): only the rows some group uses
    if len(rows) == 0:  # no group has members: one zero row keeps the gather valid (all masked)
        member_emb = train.new_zeros(1, train.shape[1])
    index, mask = index.to(train.device), mask.to(train.device)
    G, kmax = index.shape
    if block_size is None:
        block_size = max(1, GROUP_BLOCK_ELEMENTS // max(1, G * kmax))
    elif block_size < 1:
        raise DataError(f"block_size {block_size}: must be at least 1; give a positive number of targets")
    pooled = []
    for start in range(0, len(t_ids) if G else 0, block_size):
        block = target_emb[start : start + block_size].detach().to(train.device, torch.float32)
        scores = (block @ member_emb.T)[:, index]  # (b, G, kmax)
        pooled.append(group_scores(scores, mask, aggregation).cpu().numpy())  # (b, G)
    score = np.concatenate(pooled).astype(np.float64).ravel() if pooled else np.empty(0)
    return _frame(
        method,
        {
            "order": np.zeros(len(score), dtype=np.int8),
            "target_id": np.repeat(t_ids, G),
            "group_id": names.gather(np.tile(np.arange(G), len(t_ids))),
            "score": score,
        },
        GROUP_SCORES_SCHEMA,
    )


def _ids(ids: np.ndarray, emb: Tensor, name: str) -> np.ndarray:
    """`ids` as int64 (N,), checked against the rows of `emb` (N, d)."""
    ids = np.asarray(ids).astype(np.int64, copy=False).ravel()
    if emb.ndim != 2:
        raise DataError(f"{name}_emb has shape {tuple(emb.shape)}; give a 2-d (rows, dim) tensor")
    if len(ids) != emb.shape[0]:
        raise DataError(
            f"{name}_ids has {len(ids)} ids but {name}_emb {emb.shape[0]} rows; give one id per row"
        )
    return ids


def _same_dim(target_emb: Tensor, train_emb: Tensor) -> None:
    if target_emb.shape[1] != train_emb.shape[1]:
        raise ModelError(
            f"target_emb is {target_emb.shape[1]}-d but train_emb {train_emb.shape[1]}-d; "
            "embed targets and training examples with the same model"
        )


def _padded(members: list[Tensor], n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Members as positions into their distinct rows: index (G, kmax) long, mask (G, kmax), rows (u,)."""
    flat = [torch.as_tensor(m, dtype=torch.long).reshape(-1) for m in members]
    sizes = torch.tensor([len(m) for m in flat], dtype=torch.long)
    every = torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)
    if len(every) and (every.min() < 0 or every.max() >= n):
        bad = every[(every < 0) | (every >= n)][0].item()
        raise DataError(f"members holds row {bad}, outside train_emb's {n} rows; give positions 0..{n - 1}")
    rows, inverse = torch.unique(every, return_inverse=True)  # (u,), (Σ sizes,)
    kmax = max(1, int(sizes.max())) if len(sizes) else 1
    mask = torch.arange(kmax).unsqueeze(0) < sizes.unsqueeze(1)  # (G, kmax)
    index = torch.zeros(len(flat), kmax, dtype=torch.long)
    index[mask] = inverse  # row-major order of mask matches the concatenation of members
    return index, mask, rows


def _frame(method: str, columns: dict[str, object], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """A frame of `columns` with a constant `method` column, in `schema`'s column order and types."""
    frame = pl.DataFrame(columns).with_columns(pl.lit(method, dtype=pl.String).alias("method"))
    return frame.select([pl.col(c).cast(t) for c, t in schema.items()])
