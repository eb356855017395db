"""What AirRep learns from: subset experiments as `Experiments` (texts, subsets, roles, labels).

Data. `Experiments` holds the training pool (example ids and texts), the targets, the fit subsets (as
row positions into the pool) and the labels: per target, the losses of the subsets it was measured on,
z-normalised over the train subsets, sign-flipped (higher = the subset helped) and clipped to ±10.

Which pairs are labels (`labels`). Targets are never in a pool, so a fine-tune on any subset measures
a valid effect on every target: `all` (the default) labels every (fit target, train subset) pair the
effects measured, across splits; `own_split` keeps only a split's subsets on that split's targets (the
AirRep paper's layout, three quarters fewer labels with 4 splits).

Roles. Targets are split into `fit` (trained on), `val` (model selection) and `heldout` (never seen:
the reported LDS); the fit subsets into `train` and `val` subsets, by `role_seed`, which nothing else
uses: the training seed (episodes) can change while the roles stay put. The experiments' `eval`
subsets are not touched here; they stay held out for the LDS step. Validation LDS = val targets × val
subsets (see `tda.airrep.train`, which trains on these experiments).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import polars as pl

from tda.airrep.model import example_text
from tda.errors import DataError

LABEL_CLIP = 10.0
LABEL_SETS = ("all", "own_split")  # which (subset, target) pairs are labels (see the module docstring)
_COLUMNS = {
    "data": ("example_id", "prompt", "response", "split"),
    "subsets": ("subset_id", "example_id", "purpose"),
    "effects": ("subset_id", "target_id", "loss"),
}


@dataclass
class Experiments:
    """What AirRep learns from; rows index `texts` = pool examples followed by targets."""

    example_ids: np.ndarray  # (n,) pool examples
    target_ids: np.ndarray  # (m,)
    texts: list[str]  # n + m texts
    subset_ids: np.ndarray  # (J,) fit subsets
    members: list[np.ndarray]  # J arrays of pool rows
    subset_split: np.ndarray  # (J,) split of each subset
    subset_role: np.ndarray  # (J,) "train" | "val"
    target_split: np.ndarray  # (m,)
    target_role: np.ndarray  # (m,) "fit" | "val" | "heldout"
    labels: np.ndarray  # (J, m) float32, NaN where not measured (or, with own_split, other split)
    measured: np.ndarray | None = None  # (J, m) −loss of every measured pair, any split (validation)

    @property
    def n(self) -> int:
        return len(self.example_ids)

    def target_rows(self, positions: np.ndarray) -> np.ndarray:
        return self.n + positions


def assign_roles(
    ids: np.ndarray, splits: np.ndarray, fractions: dict[str, float], default: str, seed: int
) -> np.ndarray:
    """A role per id: within each split, round(fraction·count) ids get each named role, the rest
    `default`; the draw depends on the ids and the seed only."""
    rng = np.random.default_rng(seed)
    roles = np.full(len(ids), default, dtype=object)
    for s in np.unique(splits):
        where = np.flatnonzero(splits == s)
        where = where[rng.permutation(len(where))]
        start = 0
        for role, fraction in fractions.items():
            count = int(round(fraction * len(where)))
            roles[where[start : start + count]] = role
            start += count
    return roles.astype(str)


def normalised_labels(losses: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Per column: −(loss − mean)/std over the rows where `use` (and the loss is known), clipped ±10.

    losses: (J, m) with NaN where unmeasured; use: (J,) bool, the subsets whose statistics count.
    """
    ref = np.where(use[:, None], losses, np.nan)
    with np.errstate(invalid="ignore"), _quiet_nan_warnings():
        mean = np.nanmean(ref, axis=0)
        std = np.nanstd(ref, axis=0)
    std = np.where(std > 0, std, np.inf)  # a constant column gives 0 labels: nothing to rank
    return np.clip(-(losses - mean) / std, -LABEL_CLIP, LABEL_CLIP).astype(np.float32)


@contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    """No RuntimeWarning for the all-NaN columns of nanmean / nanstd (their NaN is the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def build_experiments(
    split_table: pl.DataFrame,
    subsets: pl.DataFrame,
    effects: pl.DataFrame,
    *,
    heldout_targets: float,
    val_fraction: float,
    seed: int,
    labels: str = "all",
) -> Experiments:
    """Experiments from a split corpus table, a subsets table and an effects table (see the tables).

    Only `fit` subsets are used. `seed` draws the roles (and only them). `labels`: `all` labels every
    measured (fit subset, target) pair; `own_split` (in the AirRep layout, a `split_id` column) only a
    split's subsets on that split's targets.
    """
    _check_tables(labels, {"data": split_table, "subsets": subsets, "effects": effects})
    train = split_table.filter(pl.col("split") == "train").sort("example_id")
    targets = split_table.filter(pl.col("split") == "target").sort("example_id")
    example_ids = train["example_id"].to_numpy()
    target_ids = targets["example_id"].to_numpy()
    subset_ids, members, subset_split = _fit_subsets(subsets, example_ids)
    target_split = _target_splits(subsets, target_ids)
    losses = _loss_matrix(effects, subset_ids, target_ids)  # (J, m)
    measured = -losses.astype(np.float32)  # validation ranks subsets of every split
    if labels == "own_split":
        losses[subset_split[:, None] != target_split[None, :]] = np.nan
    subset_role, target_role = _roles(
        subset_ids, subset_split, target_ids, target_split, heldout_targets, val_fraction, seed
    )
    label_matrix = normalised_labels(losses, subset_role == "train")
    texts = [example_text(p, r) for p, r in zip(train["prompt"], train["response"], strict=True)]
    texts += [example_text(p, r) for p, r in zip(targets["prompt"], targets["response"], strict=True)]
    exp = Experiments(
        example_ids,
        target_ids,
        texts,
        subset_ids,
        members,
        subset_split,
        subset_role,
        target_split,
        target_role,
        label_matrix,
        measured,
    )
    check_rankable(exp, losses)
    return exp


def _roles(
    subset_ids: np.ndarray,
    subset_split: np.ndarray,
    target_ids: np.ndarray,
    target_split: np.ndarray,
    heldout_targets: float,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The subsets' roles (train | val) and the targets' (fit | val | heldout | unused: no split)."""
    subset_role = assign_roles(subset_ids, subset_split, {"val": val_fraction}, "train", seed)
    target_role = assign_roles(
        target_ids, target_split, {"heldout": heldout_targets, "val": val_fraction}, "fit", seed + 1
    )
    target_role = np.where(target_split < 0, "unused", target_role)  # not in place: "<U3" would truncate
    return subset_role, target_role


def _check_tables(labels: str, frames: dict[str, pl.DataFrame]) -> None:
    """A known label set and every column the tables need (DataError naming what is missing)."""
    if labels not in LABEL_SETS:
        raise DataError(f"labels {labels!r} is unknown; choose all or own_split")
    for name, frame in frames.items():
        missing = [c for c in _COLUMNS[name] if c not in frame.columns]
        if missing:
            raise DataError(
                f"{name}: lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}"
            )


def _fit_subsets(
    subsets: pl.DataFrame, example_ids: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The `fit` subsets in id order: (subset ids (J,), member pool rows per subset, split (J,))."""
    has_split = "split_id" in subsets.columns
    fit = subsets.filter(pl.col("purpose") == "fit")
    if fit.is_empty():
        raise DataError("subsets: no `fit` subsets to learn from; sample subsets with eval_fraction < 1")
    pos = {int(e): i for i, e in enumerate(example_ids)}
    grouped = fit.group_by("subset_id").agg(
        pl.col("example_id"), (pl.col("split_id").first() if has_split else pl.lit(0)).alias("split_id")
    )
    grouped = grouped.sort("subset_id")
    subset_ids = grouped["subset_id"].to_numpy()
    members = []
    for sid, ids in zip(subset_ids, grouped["example_id"].to_list(), strict=True):
        try:
            members.append(np.array([pos[int(e)] for e in ids], dtype=np.int64))
        except KeyError as exc:
            raise DataError(
                f"subsets: subset {sid} has example_id {exc.args[0]}, which is not a training row of `data`; "
                "sample the subsets from the same split step"
            ) from None
    return subset_ids, members, grouped["split_id"].to_numpy().astype(np.int64)


def _target_splits(subsets: pl.DataFrame, target_ids: np.ndarray) -> np.ndarray:
    """The split of each target (m,): from the `target` rows of a `split_id` layout, −1 where a target
    has none; all 0 without one."""
    target_split = np.zeros(len(target_ids), dtype=np.int64)
    if "split_id" in subsets.columns:
        tmap = subsets.filter(pl.col("purpose") == "target").select("example_id", "split_id")
        if tmap.height:
            lookup = dict(zip(tmap["example_id"].to_list(), tmap["split_id"].to_list(), strict=True))
            target_split = np.array([lookup.get(int(t), -1) for t in target_ids], dtype=np.int64)
    return target_split


def _loss_matrix(effects: pl.DataFrame, subset_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """The mean loss of every (subset, target) pair the effects measured: (J, m), NaN elsewhere."""
    rows = effects.filter(pl.col("subset_id").is_in(subset_ids) & pl.col("target_id").is_in(target_ids))
    rows = rows.group_by("subset_id", "target_id").agg(pl.col("loss").cast(pl.Float64).mean())
    losses = np.full((len(subset_ids), len(target_ids)), np.nan)
    losses[np.searchsorted(subset_ids, rows["subset_id"]), np.searchsorted(target_ids, rows["target_id"])] = (
        rows["loss"].to_numpy()
    )
    return losses


def check_rankable(exp: Experiments, losses: np.ndarray) -> None:
    """Every fit target needs losses on ≥ 2 train subsets (a ranking needs two things to order)."""
    train = exp.subset_role == "train"
    fit = np.flatnonzero(exp.target_role == "fit")
    if len(fit) == 0:
        raise DataError(
            "train_airrep: no fit targets are left after heldout_targets and val_fraction; lower them"
        )
    counts = np.isfinite(losses[train][:, fit]).sum(axis=0)
    if counts.min() < 2:
        worst = fit[int(np.argmin(counts))]
        raise DataError(
            f"effects: target {exp.target_ids[worst]} has losses for {int(counts.min())} train subset(s); "
            "AirRep ranks subsets per target, so measure every target on at least 2 fit subsets "
            "(more n_subsets, or a lower val_fraction)"
        )
