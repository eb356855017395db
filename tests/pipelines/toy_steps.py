"""Toy step kinds for the engine's tests (registered by tests/conftest.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef


class NumbersParams(StepParams):
    """A table x = start … start+n-1."""

    kind: Literal["numbers"] = "numbers"
    n: int = Field(gt=0, description="How many rows.")
    start: int = Field(0, description="First value.")
    seed: int | None = Field(None, description="Unused; shows the spec seed filling in.")


def numbers(params: NumbersParams, ctx: StepContext) -> pl.DataFrame:
    return pl.DataFrame({"x": range(params.start, params.start + params.n)})


class AddParams(StepParams):
    """x + amount of an upstream table."""

    kind: Literal["add"] = "add"
    data: StepRef = Field(description="Upstream table with a column x.")
    amount: int = Field(1, description="What to add.")


def add(params: AddParams, ctx: StepContext) -> pl.LazyFrame:
    return ctx.table(params.data).with_columns(pl.col("x") + params.amount)


class SleepyParams(StepParams):
    """Sleeps, and records when it ran."""

    kind: Literal["sleepy"] = "sleepy"
    seconds: float = Field(description="How long to sleep.")
    tag: str = Field("", description="Distinguishes otherwise equal steps.")


def sleepy(params: SleepyParams, ctx: StepContext) -> pl.DataFrame:
    start = time.time()
    time.sleep(params.seconds)
    return pl.DataFrame({"start": [start], "end": [time.time()], "pid": [os.getpid()]})


class CrashOnceParams(StepParams):
    """Kills its worker process on the first attempt (while `marker` does not exist)."""

    kind: Literal["crash_once"] = "crash_once"
    marker: str = Field(description="A file created by the first attempt.")


def crash_once(params: CrashOnceParams, ctx: StepContext) -> pl.DataFrame:
    marker = Path(params.marker)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    return pl.DataFrame({"first_pid": [int(marker.read_text())], "pid": [os.getpid()]})


class FailWhileParams(StepParams):
    """Raises while the file `flag` exists; otherwise passes its input through."""

    kind: Literal["fail_while"] = "fail_while"
    data: StepRef = Field(description="Upstream table.")
    flag: str = Field(description="While this file exists the step fails.")


def fail_while(params: FailWhileParams, ctx: StepContext) -> pl.LazyFrame:
    if Path(params.flag).exists():
        raise RuntimeError(f"flag {params.flag} is set")
    return ctx.table(params.data)


class FanoutParams(StepParams):
    """Squares 0..n-1, one Ray task per item, and logs a metric history and an artifact."""

    kind: Literal["fanout"] = "fanout"
    n: int = Field(gt=0, description="Items.")


def _square(i: int) -> tuple[int, int, int]:
    return i, i * i, os.getpid()


def fanout(params: FanoutParams, ctx: StepContext) -> pl.DataFrame:
    rows = ctx.map(_square, range(params.n), num_cpus=0.5)
    for step, (_, sq, _) in enumerate(rows):
        ctx.log_metric("square", sq, step=step)
    (ctx.artifacts_dir / "note.txt").write_text("hello from fanout")
    return pl.DataFrame(rows, schema=["i", "square", "pid"], orient="row")


class ShardsParams(StepParams):
    """Squares 0..n-1 with Ray Data, written by Ray Data as Parquet shards into the step's data dir."""

    kind: Literal["shards"] = "shards"
    n: int = Field(gt=0, description="Rows.")
    blocks: int = Field(4, gt=0, description="Ray Data blocks (one shard each).")


def shards(params: ShardsParams, ctx: StepContext) -> None:
    import ray.data

    ds = ray.data.range(params.n, override_num_blocks=params.blocks)
    ds = ds.map_batches(lambda b: {"id": b["id"], "square": b["id"] ** 2}, batch_format="numpy")
    ds.write_parquet(str(ctx.data_dir))
    ctx.log_metric("blocks", params.blocks)


class TickingParams(StepParams):
    """Reports progress and a metric after each of n ticks, as a long step does."""

    kind: Literal["ticking"] = "ticking"
    n: int = Field(gt=0, description="Ticks.")
    seconds: float = Field(description="Length of a tick.")


def ticking(params: TickingParams, ctx: StepContext) -> pl.DataFrame:
    for i in range(1, params.n + 1):
        time.sleep(params.seconds)
        ctx.log_metric("tick", i, step=i)
        ctx.progress(i, params.n)
    return pl.DataFrame({"tick": range(1, params.n + 1)})


STEPS = [
    StepKind("ticking", TickingParams, ticking),
    StepKind("numbers", NumbersParams, numbers),
    StepKind("add", AddParams, add),
    StepKind("sleepy", SleepyParams, sleepy),
    StepKind("crash_once", CrashOnceParams, crash_once),
    StepKind("fail_while", FailWhileParams, fail_while),
    StepKind("fanout", FanoutParams, fanout),
    StepKind("shards", ShardsParams, shards),
]
