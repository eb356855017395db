"""`load_corpus`: an instruction corpus with its own columns from JSONL, Parquet, CSV or Arrow (a file,
a folder of shards, or a `datasets` `save_to_disk` folder), optionally pre-split into train and target."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pipelines import InputPath, StepContext, StepKind, StepParams


class LoadCorpusParams(StepParams):
    """Read a corpus into the corpus table: example_id, prompt, response, group, [split], its own columns."""

    kind: Literal["load_corpus"] = "load_corpus"
    path: InputPath = Field(
        description="A .jsonl/.parquet/.csv/.arrow file, a folder of shards, or a `datasets` save_to_disk "
        "folder (state.json; or dataset_dict.json: all its splits) (relative to the spec)."
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Corpus field → file column: prompt, response, group, or instruction/input/output "
        "for the Alpaca layout (null = use those names as they are).",
    )
    format: Literal["jsonl", "parquet", "csv", "arrow"] | None = Field(
        None, description="null = from the suffix (or a save_to_disk folder's state.json)."
    )
    id_column: str | None = Field(None, description="A unique integer column to use as example_id.")
    keep_columns: list[str] | Literal["all"] = Field(
        "all",
        description="The source's columns kept after the corpus's own, with their types: all = every "
        "column not read as a text, group, id or split; a list = exactly these, in order ([] = none). "
        "Shards that lack one hold null; its type must agree across shards.",
    )
    split_column: str | None = Field(
        None,
        description="A column of split values (train → train; test/validation/dev/eval → target); "
        "adds `split`, so train_model and influence_scores need no split step. A DatasetDict's split "
        "names serve when null.",
    )
    split_values: dict[str, Literal["train", "target", "drop"]] | None = Field(
        None,
        description="Value → train, target or drop, over the defaults (case-insensitive), e.g. "
        "{train_sft: train, test_sft: target}.",
    )
    shard_rows: int = Field(100_000, gt=0, description="Rows per Parquet shard of the output.")

    @field_validator("split_values", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        """YAML reads `{0: train, true: target}` with number/boolean keys; the values they match are text."""
        return {str(key): v for key, v in value.items()} if isinstance(value, dict) else value


def load_corpus_step(params: LoadCorpusParams, ctx: StepContext) -> None:
    from tda.data.corpus import load_corpus

    corpus = load_corpus(
        str(params.path),
        params.columns,
        params.format,
        params.id_column,
        params.keep_columns,
        params.split_column,
        dict(params.split_values) if params.split_values is not None else None,
    )
    for i, start in enumerate(range(0, corpus.height, params.shard_rows)):
        corpus.slice(start, params.shard_rows).write_parquet(ctx.data_dir / f"part-{i:05d}.parquet")
    metrics = {"rows": corpus.height, "groups": corpus["group"].n_unique()}
    metrics["extra_columns"] = corpus.width - 4 - ("split" in corpus.columns)
    if "split" in corpus.columns:
        metrics |= {
            "train": int((corpus["split"] == "train").sum()),
            "targets": int((corpus["split"] == "target").sum()),
        }
    ctx.log_metrics(metrics)


STEP = StepKind("load_corpus", LoadCorpusParams, load_corpus_step, version="2")  # 2: keeps extra columns
