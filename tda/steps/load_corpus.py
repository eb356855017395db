"""`load_corpus`: an instruction corpus from JSONL, Parquet or CSV (a file or a folder of shards)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines import InputPath, StepContext, StepKind, StepParams


class LoadCorpusParams(StepParams):
    """Read a corpus into the corpus table (example_id, prompt, response, group), written in shards."""

    kind: Literal["load_corpus"] = "load_corpus"
    path: InputPath = Field(
        description="A .jsonl/.parquet/.csv file or a folder of shards (relative to the spec)."
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Corpus field → file column: prompt, response, group, or instruction/input/output "
        "for the Alpaca layout (null = use those names as they are).",
    )
    format: Literal["jsonl", "parquet", "csv"] | None = Field(None, description="null = from the suffix.")
    id_column: str | None = Field(None, description="A unique integer column to use as example_id.")
    shard_rows: int = Field(100_000, gt=0, description="Rows per Parquet shard of the output.")


def load_corpus_step(params: LoadCorpusParams, ctx: StepContext) -> None:
    from tda.data.corpus import load_corpus

    corpus = load_corpus(str(params.path), params.columns, params.format, params.id_column)
    for i, start in enumerate(range(0, corpus.height, params.shard_rows)):
        corpus.slice(start, params.shard_rows).write_parquet(ctx.data_dir / f"part-{i:05d}.parquet")
    ctx.log_metrics({"rows": corpus.height, "groups": corpus["group"].n_unique()})


STEP = StepKind("load_corpus", LoadCorpusParams, load_corpus_step, version="1")
