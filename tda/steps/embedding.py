"""Embedding a corpus split with an AirRep model (or the plain encoder, for RepSim) on Ray Data.

The split table's Parquet shards are read by Ray Data and embedded by `map_batches` on an actor pool
(`workers` actors, each loading the encoder once); the embeddings come back to the step in order of
example id and are written beside the step's table as `embeddings.parquet` (example_id, split, embedding).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import model_validator

from pipelines import StepContext, StepParams

log = logging.getLogger(__name__)


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
    resumed: int = 0  # texts whose embedding an earlier, interrupted attempt of the step had kept

    @property
    def count(self) -> int:
        return len(self.train_ids) + len(self.target_ids)


SYSTEM_RETRIES = 3  # embedding passes after the first, each over the texts not yet embedded
MAX_BLOCKS = 200  # the most parts one pass writes into scratch (their rows grow past that)


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
    """Embed the train and target rows of split step `data` on Ray Data; optionally save them.

    Every batch is kept in the step's scratch folder as it arrives, so a run after a killed driver
    embeds only the texts not yet embedded, and an embedding actor that dies (a killed or crashed
    worker) costs one more pass over the remaining texts, not the step."""
    import ray.data
    import torch
    from ray.util.debug import log_once

    ray_ctx = ray.data.DataContext.get_current()
    ray_ctx.enable_progress_bars = False
    ray_ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset info lines in the run's log
    log_once("ray_data_progress_manager_disabled")  # marks Ray Data's "progress bars disabled" as said
    # a failed block is logged with its traceback before the error reaches us; we retry or raise it
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").setLevel(logging.CRITICAL)
    files = sorted(str(f) for f in ctx.input(data).data_dir.glob("*.parquet"))
    # the shards become the dataset's blocks here, with no read tasks: Ray Data throttles new tasks
    # while the embedding actors hold every CPU, which stalled reads (2 actors on a 2-CPU cluster)
    columns = ["example_id", "prompt", "response", "split"]
    tables = [pq.read_table(f, columns=columns) for f in files]
    total = sum(t.num_rows for t in tables)
    parts = ctx.scratch_dir / "embeddings"
    parts.mkdir(exist_ok=True)
    t0, compute = time.perf_counter(), 0.0
    resumed = total - sum(t.num_rows for t in _not_embedded(tables, parts))
    embed = (source, batch_size, cpus_per_worker, gpus_per_worker, device)
    for attempt in range(SYSTEM_RETRIES + 1):
        todo = _not_embedded(tables, parts)
        if sum(t.num_rows for t in todo) == 0:
            break
        try:
            compute += _embed_into(
                ctx, todo, parts, embed, workers, (total - sum(t.num_rows for t in todo), total)
            )
        except Exception as exc:
            if attempt == SYSTEM_RETRIES or not _worker_died(exc):
                raise
            log.warning("an embedding actor died (%s); embedding the texts left", type(exc).__name__)
    wall = time.perf_counter() - t0
    frame = pl.read_parquet(sorted(parts.glob("part-*.parquet"))).sort("example_id")
    ids_all, splits_all = frame["example_id"].to_numpy(), frame["split"].to_numpy().astype(str)
    emb = np.asarray(frame["embedding"].to_numpy(), dtype=np.float32)  # (n, d)
    if save_to is not None:
        frame.write_parquet(save_to)
    train, target = splits_all == "train", splits_all == "target"
    return Embeddings(
        ids_all[train].astype(np.int64),
        torch.from_numpy(emb[train]),
        ids_all[target].astype(np.int64),
        torch.from_numpy(emb[target]),
        compute,
        wall,
        resumed,
    )


def _not_embedded(tables: list[pa.Table], parts: Path) -> list[pa.Table]:
    """The rows of `tables` whose embedding is not yet in `parts`."""
    files = sorted(parts.glob("part-*.parquet"))
    if not files:
        return tables
    done = pa.concat_arrays(
        [pq.read_table(f, columns=["example_id"])["example_id"].combine_chunks() for f in files]
    )
    return [t.filter(pc.invert(pc.is_in(t["example_id"], value_set=done))) for t in tables]


def _embed_into(
    ctx: StepContext, tables: list[pa.Table], parts: Path, embed: tuple, workers: int, count: tuple[int, int]
) -> float:
    """Embed `tables` on an actor pool, writing each batch into `parts` as it comes; the encoder's
    seconds, summed over actors. `count` is (texts embedded before, all texts), for progress."""
    import ray.data

    source, batch_size, cpus_per_worker, gpus_per_worker, _device = embed
    # a block is the unit kept in scratch (an actor returns one output block per input block): blocks
    # of a few batches, at most MAX_BLOCKS of them
    rows = max(4 * batch_size, -(-sum(t.num_rows for t in tables) // MAX_BLOCKS))
    ds = ray.data.from_arrow([t.slice(i, rows) for t in tables for i in range(0, t.num_rows, rows)])
    with warnings.catch_warnings():  # max_restarts as a map_batches kwarg is "deprecated" in Ray 2.60
        warnings.simplefilter("ignore")
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_args=embed,
            batch_size=4 * batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            # no actor restarts: embed_split makes another pass over what is left, and a restartable
            # actor whose constructor arguments sit in the object store makes Ray log an error line
            max_restarts=0,
            **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}),
        )
    compute, (done, total) = 0.0, count
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        compute += float(batch["seconds"].sum())
        _save_part(parts, batch)
        done += len(batch["example_id"])
        ctx.progress(done, total)  # texts embedded / total
    return compute


def _save_part(parts: Path, batch: dict[str, np.ndarray]) -> None:
    """One batch of embeddings, renamed into place whole (a part that exists is complete)."""
    frame = pl.DataFrame(
        {
            "example_id": batch["example_id"].astype(np.int64),
            "split": batch["split"].astype(str),
            "embedding": batch["embedding"].astype(np.float32),
        }
    )
    name = f"part-{uuid.uuid4().hex[:12]}"
    tmp = parts / f".{name}.tmp"
    frame.write_parquet(tmp)
    os.replace(tmp, parts / f"{name}.parquet")


def _worker_died(exc: BaseException) -> bool:
    """Did `exc` come from a worker or actor process dying (not from the embedding code)?"""
    import ray.exceptions

    died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, died):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
