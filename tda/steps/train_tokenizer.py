"""`train_tokenizer`: a byte-level BPE tokenizer trained on a corpus → a transformers tokenizer folder."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from pipelines import StepContext, StepKind, StepParams, StepRef


class TrainTokenizerParams(StepParams):
    """Train a BPE tokenizer (the `tokenizers` library) on the prompts and responses of a corpus."""

    kind: Literal["train_tokenizer"] = "train_tokenizer"
    corpus: StepRef = Field(description="A corpus or split corpus (only `train` rows are used if split).")
    vocab_size: int = Field(1000, ge=64, description="Vocabulary size (1–4k keeps tiny LMs fast).")
    min_frequency: int = Field(2, ge=1, description="Pairs seen fewer times are not merged.")


def train_tokenizer_step(params: TrainTokenizerParams, ctx: StepContext) -> None:
    from tda.models.tokenizer import train_tokenizer

    table = ctx.table(params.corpus)
    if "split" in table.collect_schema().names():
        table = table.filter(pl.col("split") == "train")
    rows = table.select("prompt", "response").collect()
    texts = (f"{p}\n{r}" for p, r in rows.iter_rows())
    tokenizer = train_tokenizer(texts, params.vocab_size, ctx.model_dir, params.min_frequency)
    ctx.log_metrics({"vocab_size": len(tokenizer), "texts": rows.height})


STEP = StepKind("train_tokenizer", TrainTokenizerParams, train_tokenizer_step, version="1")
