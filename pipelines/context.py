"""What a step function receives, and how one step is executed into the store (no Ray here).

    def my_step(params: MyParams, ctx: StepContext) -> pl.DataFrame | None:
        corpus = ctx.table(params.corpus)            # an upstream table, as a LazyFrame
        results = ctx.map(train_one, subsets)        # fan out: one task per item
        ctx.log_metric("throughput", 123.0)          # an MLflow metric of the step's run
        return table                                 # written to data/part-00000.parquet

A step may instead write files itself under `ctx.data_dir` (Parquet shards), `ctx.model_dir` or
`ctx.artifacts_dir` (logged to MLflow). `ctx.scratch_dir` survives a failed attempt, for resumable
work; it is removed once the step's output is committed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.params import StepParams
from pipelines.store import Store, StoredObject, now_iso


class Executor:
    """Runs a step's fan-out; the runner supplies one backed by Ray, tests may use this serial one."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], **options: Any) -> list[Any]:
        return [fn(item) for item in items]

    def imap_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any], **options: Any) -> Iterable[Any]:
        return (fn(item) for item in items)

    def node_id(self) -> str:
        return platform.node()


@dataclass
class Reporter:
    """Sends a step's progress and metrics to the driver while the step runs.

    `channel` has `put_nowait(item)` (a `ray.util.queue.Queue` under the runner; None sends nowhere).
    It pickles, so the step's own Ray tasks and Ray Train workers can hold it. Progress is sent at most
    once per `interval` seconds, and always when done == total; sending is best effort (a lost event
    costs a progress line, never the step).
    """

    step: str = ""
    channel: Any = None
    interval: float = 1.0
    _last: float = field(default=0.0, repr=False)

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        self._send({"type": "progress", "done": int(done), "total": int(total)})

    def metrics(self, values: Sequence[tuple[str, float, int | None]]) -> None:
        """(name, value, step) triples, stamped now."""
        if values:
            self._send({"type": "metrics", "values": list(values), "time": time.time()})

    def _send(self, event: dict[str, Any]) -> None:
        if self.channel is None:
            return
        with contextlib.suppress(Exception):
            self.channel.put_nowait({"step": self.step, **event})


@dataclass
class StepContext:
    """A step's view of the run: its inputs, its output folders, metrics and fan-out."""

    name: str
    key: str
    store: Store
    output_dir: Path
    inputs: dict[str, str]  # upstream step name -> cache key
    executor: Executor = field(default_factory=Executor)
    metrics: list[tuple[str, float, int | None]] = field(default_factory=list)
    tracking_uri: str | None = None
    reporter: Reporter = field(default_factory=Reporter)
    _unsent: list[tuple[str, float, int | None]] = field(default_factory=list, repr=False)
    _sent_at: float = field(default=0.0, repr=False)

    @property
    def data_dir(self) -> Path:
        return _mkdir(self.output_dir / "data")

    @property
    def model_dir(self) -> Path:
        return _mkdir(self.output_dir / "model")

    @property
    def artifacts_dir(self) -> Path:
        return _mkdir(self.output_dir / "artifacts")

    @property
    def scratch_dir(self) -> Path:
        return self.store.scratch_dir(self.key)

    def input(self, step: str) -> StoredObject:
        """The stored output of an upstream step (by the name the params refer to)."""
        return self.store.get(self.inputs[step])

    def table(self, step: str) -> pl.LazyFrame:
        """An upstream step's table as a lazy Parquet scan."""
        return self.input(step).table()

    def mlflow_artifacts(self, run_id: str, path: str = "") -> Path:
        """Download artifacts `path` of MLflow run `run_id` from this run's tracking server (into the
        step's scratch folder) and return where they are."""
        from pipelines.tracking import download_artifacts

        if not self.tracking_uri:
            raise RuntimeError("this step runs without a tracking URI; MLflow artifacts are unavailable")
        return download_artifacts(self.tracking_uri, run_id, path, self.scratch_dir / "mlflow" / run_id)

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        self.log_metrics({name: value}, step)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Metrics of the step's MLflow run: streamed to it while the step runs (at most once a second;
        the rest when the step ends), and kept in the manifest (the last value of each)."""
        triples = [(name, float(value), step) for name, value in values.items()]
        self.metrics.extend(triples)
        self._unsent.extend(triples)
        if time.monotonic() - self._sent_at >= self.reporter.interval:
            self.reporter.metrics(self._unsent)
            self._unsent, self._sent_at = [], time.monotonic()

    def progress(self, done: int, total: int) -> None:
        """Report `done` of `total` units of work (shown live and as `name: done/total` log lines)."""
        self.reporter.progress(done, total)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], **options: Any) -> list[Any]:
        """`[fn(x) for x in items]`, one task per item (Ray options: num_cpus, num_gpus, …)."""
        return self.executor.map(fn, list(items), **options)

    def imap_unordered(
        self, fn: Callable[[Any], Any], items: Iterable[Any], *, progress: bool = True, **options: Any
    ) -> Iterator[Any]:
        """Like `map`, yielding results as tasks finish, so a step can persist them as they come. Reports
        tasks done/total as the step's progress, unless `progress=False` (a step counting its own units)."""
        items = list(items)
        if progress:
            self.progress(0, len(items))
        for done, result in enumerate(self.executor.imap_unordered(fn, items, **options), start=1):
            if progress:
                self.progress(done, len(items))
            yield result


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class StepJob:
    """Everything a worker needs to execute one step."""

    name: str
    kind: str
    key: str
    version: str
    fn: Callable[..., Any]
    params: StepParams
    inputs: dict[str, str]
    store_root: str
    replace: bool = False  # a forced re-run replaces the stored object of the same key
    tracking_uri: str | None = None
    run_id: str = "_"  # the run that executes it: owner of its staging folder
    reporter: Reporter = field(default_factory=Reporter)  # its progress and live metrics


@dataclass
class StepOutcome:
    """What the worker reports back to the runner."""

    name: str
    key: str
    ok: bool
    rows: int | None = None
    seconds: float = 0.0
    metrics: list[tuple[str, float, int | None]] = field(default_factory=list)
    artifacts: str | None = None
    error: str | None = None
    node: str | None = None


def write_table(table: Any, data_dir: Path) -> None:
    """Write a returned Polars/Arrow table as `data/part-00000.parquet`."""
    path = data_dir / "part-00000.parquet"
    if isinstance(table, pl.LazyFrame):
        table = table.collect()
    if isinstance(table, pl.DataFrame):
        table.write_parquet(path)
    elif isinstance(table, pa.Table):
        pq.write_table(table, path)
    else:
        raise TypeError(
            f"a step must return a polars DataFrame/LazyFrame, a pyarrow Table or None, "
            f"not {type(table).__name__}"
        )


def describe_table(data_dir: Path) -> tuple[int | None, list[dict[str, str]]]:
    """Rows and schema of the Parquet files in `data_dir`, from their footers only."""
    files = sorted(data_dir.glob("*.parquet")) if data_dir.is_dir() else []
    if not files:
        return None, []
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    schema = pq.read_schema(files[0])
    return rows, [{"name": f.name, "type": str(f.type)} for f in schema]


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("tda-pipelines", "ray", "polars", "pyarrow", "pydantic", "mlflow", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def execute_step(job: StepJob, executor: Executor | None = None) -> StepOutcome:
    """Run one step into a staging folder and commit it to the store; a step's error propagates."""
    store = Store.open(job.store_root)
    executor = executor or Executor()
    staging = store.staging_dir(job.key, job.run_id)
    ctx = StepContext(
        job.name,
        job.key,
        store,
        staging,
        job.inputs,
        executor,
        tracking_uri=job.tracking_uri,
        reporter=job.reporter,
    )
    started, t0 = now_iso(), time.perf_counter()
    try:
        result = job.fn(job.params, ctx)
        if result is not None:
            write_table(result, ctx.data_dir)
        rows, schema = describe_table(staging / "data")
        seconds = time.perf_counter() - t0
        manifest = {
            "kind": job.kind,
            "name": job.name,
            "key": job.key,
            "version": job.version,
            "params": job.params.model_dump(mode="json"),
            "inputs": job.inputs,
            "schema": schema,
            "rows": rows,
            "timings": {"started": started, "finished": now_iso(), "seconds": seconds},
            "metrics": {name: value for name, value, _ in ctx.metrics},
            "node": executor.node_id(),
            "pid": os.getpid(),
            "versions": library_versions(),
        }
        obj = store.commit(job.key, staging, manifest, replace=job.replace)
    except BaseException:
        store.discard(staging)  # nothing half-written; Ray retries the task if `retries` allows
        raise
    artifacts = obj.dir / "artifacts"
    return StepOutcome(
        job.name,
        job.key,
        ok=True,
        rows=rows,
        seconds=seconds,
        metrics=ctx.metrics,
        artifacts=str(artifacts) if artifacts.is_dir() else None,
        node=executor.node_id(),
    )
