"""Scores from gradient features: a preconditioner fitted once, the targets preconditioned once, then
streamed top-k dot products against the training shards (`tda.influence.topk`).

    method   features it needs       preconditioner (tda.influence.precondition)
    graddot  any                     identity
    gradcos  any                     identity, both sides normalised (cosine)
    logra    logra                   fisher, per layer block (LoGra's projected Gauss–Newton inverse)
    trak     trak or identity        fisher over all features at once (TRAK's (ΦᵀΦ)⁻¹)
    kfac     logra                   K-FAC from the projected Kronecker factors
    ekfac    logra                   EK-FAC: K-FAC's eigenbasis, corrected eigenvalues

Memory: the targets (m × K), one shard of training features, the score block and the running top k;
never n × m nor n × d.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tda.errors import InfluenceError
from tda.influence.feature_store import FeatureSet, read_chunks, read_split
from tda.influence.precondition import Preconditioner, fit_preconditioner, self_influence
from tda.influence.topk import TopK, stream_topk

FEATURE_METHODS = {
    "graddot": ("identity", None),
    "gradcos": ("identity", None),
    "logra": ("fisher", ("logra",)),
    "trak": ("fisher", ("trak", "identity")),
    "kfac": ("kfac", ("logra",)),
    "ekfac": ("ekfac", ("logra",)),
}


def check_method(method: str, features: FeatureSet, where: str) -> None:
    """InfluenceError (one line) when `method` cannot use the features of step `where`."""
    if method not in FEATURE_METHODS:
        raise InfluenceError(
            f"method {method!r} does not score gradient features; use one of {', '.join(FEATURE_METHODS)}"
        )
    needs = FEATURE_METHODS[method][1]
    kind = features.meta["projection"]["kind"]
    if needs is not None and kind not in needs:
        raise InfluenceError(
            f"method {method} needs features with projection {' or '.join(needs)}, but step {where!r} made "
            f"{kind} features; featurise with projection: {needs[0]}"
        )


def fit(method: str, features: FeatureSet, damping: float) -> Preconditioner:
    """The method's preconditioner, fitted on the training features (one pass; two for EK-FAC)."""
    kind = FEATURE_METHODS[method][0]
    blocks = "all" if method == "trak" else "layer"
    return fit_preconditioner(
        kind, features.layout, features.chunks("train"), features.n_train, damping, features.factors, blocks
    )


def prepared_targets(method: str, features: FeatureSet, P: Preconditioner) -> tuple[np.ndarray, Tensor]:
    """(target ids, preconditioned target features (m, K) float32), unit rows for gradcos."""
    target_ids, T = read_split(features.files, "target")
    if method == "gradcos":
        return target_ids, F.normalize(T, dim=1)
    return target_ids, P.apply(T)


def shard_topk(files: list[Path], targets: Tensor, top_k: int, normalize: bool, threads: float = 1) -> TopK:
    """The top k over the training rows of some shards (one Ray task's share)."""
    torch.set_num_threads(max(1, int(threads)))
    return stream_topk(targets, read_chunks(files, "train"), top_k, normalize_train=normalize)


def self_influence_table(method: str, features: FeatureSet, P: Preconditioner) -> dict[str, np.ndarray]:
    """⟨P φ_z, φ_z⟩ of every training row (gradcos: 1; graddot: ‖φ_z‖²), streamed."""
    ids, scores = [], []
    for chunk_ids, feats in read_chunks(features.files, "train"):
        ids.append(chunk_ids)
        scores.append(torch.ones(len(feats)) if method == "gradcos" else self_influence(P, feats))
    return {
        "example_id": np.concatenate(ids) if ids else np.zeros(0, np.int64),
        "score": torch.cat(scores).double().numpy() if scores else np.zeros(0),
    }


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
