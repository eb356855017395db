"""Embedding a corpus split with an AirRep model (or the plain encoder, for RepSim) on Ray Data.

The split table's Parquet shards are read by Ray Data and embedded by `map_batches` on an actor pool
(`workers` actors, each loading the encoder once); the embeddings come back to the step in order of
example id and are written beside the step's table as `embeddings.parquet` (example_id, split, embedding).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from pydantic import model_validator

from pipelines import StepContext, StepParams


class EmbeddingStepParams(StepParams):
    """Base of step kinds with methods that embed on Ray Data (`embedding_methods`): for those methods
    the step's own task reserves no CPU by default and each of its `embed_workers` actors reserves one.
    Subclasses declare the fields `method` and `embed_workers`."""

    non_semantic = StepParams.non_semantic | {"embed_workers", "embed_batch_size", "embed_gpus", "device"}
    embedding_methods: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _driver_resources(cls, data: Any) -> Any:
        """A driver holding a CPU while it waits for its actors could starve them."""
        if isinstance(data, dict) and data.get("method") in cls.embedding_methods and "resources" not in data:
            return {**data, "resources": {"num_cpus": 0}}
        return data

    def demands(self) -> dict[str, tuple[float, str]]:
        out = super().demands()
        if self.method in self.embedding_methods:  # one CPU (and embed_gpus) per embedding actor
            out["CPU"] = (out["CPU"][0] + self.embed_workers, "embed_workers")
            gpus = getattr(self, "embed_gpus", 0.0)
            if gpus:
                out["GPU"] = (out["GPU"][0] + self.embed_workers * gpus, "embed_gpus")
        return out


@dataclass(frozen=True)
class EncoderSource:
    """Which encoder embeds: a saved AirRep folder (`airrep`) or an encoder folder (`repsim`, pooled
    features without projection)."""

    kind: str  # "airrep" | "airrep-untrained" (the start of a saved AirRep) | "repsim"
    path: str | None  # None = the shipped MiniLM (repsim)
    max_tokens: int = 64

    def load(self) -> Any:
        from tda.airrep.model import AirRep

        if self.kind == "airrep":
            return AirRep.load(self.path)
        if self.kind == "airrep-untrained":
            return AirRep.load_initial(self.path)
        return AirRep.from_encoder(self.path, self.max_tokens)


class _Embedder:
    """A Ray Data actor: the encoder is loaded once; each batch becomes (example_id, split, embedding)."""

    def __init__(
        self, source: EncoderSource, batch_size: int, threads: float, gpus: float, device: tuple[str, str]
    ) -> None:
        from tda.steps.common import resolve_device, set_threads

        set_threads(threads)
        self.device = resolve_device(device[0], gpus)
        self.bf16 = device[1] == "bf16" and self.device.type == "cuda"
        self.model = source.load().to(self.device)
        self.project = source.kind != "repsim"
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from tda.airrep.model import example_text

        t0 = time.perf_counter()
        texts = [example_text(p, r) for p, r in zip(batch["prompt"], batch["response"], strict=True)]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            emb = self.model.embed(texts, self.batch_size, project=self.project)
        emb = emb.float().cpu().numpy().astype(np.float32)
        share = np.full(len(texts), (time.perf_counter() - t0) / max(1, len(texts)))  # sums to compute time
        return {
            "example_id": batch["example_id"],
            "split": batch["split"],
            "embedding": emb,
            "seconds": share,
        }


@dataclass
class Embeddings:
    train_ids: np.ndarray
    train: Any  # torch.Tensor (n, d)
    target_ids: np.ndarray
    targets: Any  # torch.Tensor (m, d)
    seconds: float  # encoder compute, summed over actors
    wall_seconds: float  # Ray Data wall time, actor start and encoder loading included

    @property
    def count(self) -> int:
        return len(self.train_ids) + len(self.target_ids)


def embed_split(
    ctx: StepContext,
    data: str,
    source: EncoderSource,
    *,
    batch_size: int = 128,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    device: tuple[str, str] = ("auto", "fp32"),
    save_to: Path | None = None,
) -> Embeddings:
    """Embed the train and target rows of split step `data` on Ray Data; optionally save them."""
    import ray.data
    import torch
    from ray.util.debug import log_once

    ray_ctx = ray.data.DataContext.get_current()
    ray_ctx.enable_progress_bars = False
    ray_ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset info lines in the run's log
    log_once("ray_data_progress_manager_disabled")  # marks Ray Data's "progress bars disabled" as said
    files = sorted(str(f) for f in ctx.input(data).data_dir.glob("*.parquet"))
    t0 = time.perf_counter()
    # the shards become the dataset's blocks here, with no read tasks: Ray Data throttles new tasks
    # while the embedding actors hold every CPU, which stalled reads (2 actors on a 2-CPU cluster)
    columns = ["example_id", "prompt", "response", "split"]
    tables = [pq.read_table(f, columns=columns) for f in files]
    total = sum(t.num_rows for t in tables)
    ds = ray.data.from_arrow(tables)
    with warnings.catch_warnings():  # max_restarts as a map_batches kwarg is "deprecated" in Ray 2.60
        warnings.simplefilter("ignore")
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_args=(source, batch_size, cpus_per_worker, gpus_per_worker, device),
            batch_size=4 * batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            # no actor restarts: the engine retries the step, and a restartable actor whose constructor
            # arguments sit in the object store makes Ray log an error line on every run
            max_restarts=0,
            **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}),
        )
    ids, splits, parts, compute = [], [], [], 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        compute += float(batch["seconds"].sum())
        ids.append(batch["example_id"])
        splits.append(batch["split"])
        parts.append(batch["embedding"])
        ctx.progress(sum(len(i) for i in ids), total)  # texts embedded / total
    wall = time.perf_counter() - t0
    ids_all, splits_all, emb = np.concatenate(ids), np.concatenate(splits).astype(str), np.concatenate(parts)
    order = np.argsort(ids_all, kind="stable")
    ids_all, splits_all, emb = ids_all[order], splits_all[order], emb[order]
    if save_to is not None:
        pl.DataFrame(
            {"example_id": ids_all.astype(np.int64), "split": splits_all, "embedding": emb},
        ).write_parquet(save_to)
    train, target = splits_all == "train", splits_all == "target"
    return Embeddings(
        ids_all[train].astype(np.int64),
        torch.from_numpy(emb[train]),
        ids_all[target].astype(np.int64),
        torch.from_numpy(emb[target]),
        compute,
        wall,
    )
