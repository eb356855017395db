"""What the fault tests share: the study, `tda` as a subprocess, processes found by their Ray title, and
tables compared with an uninterrupted run's."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from pipelines.store import Store
from tests.procs import ROOT, descendants, finish, kill, tda, title, wait_for  # noqa: F401 (shared)

UPSTREAM = """version: 1
name: faults
steps:
  corpus:
    kind: synthetic_instructions
    n_examples: 400
  data:
    kind: split
    data: corpus
    n_targets: 40
  tokenizer:
    kind: train_tokenizer
    corpus: data
    vocab_size: 300
  model:
    kind: train_model
    data: data
    family: causal_lm
    tokenizer: tokenizer
    n_layer: 1
    n_embd: 32
    max_len: 48
    epochs: 1
    l2: 0
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 24
    subset_size: 60
  scored_corpus:
    kind: synthetic_instructions
    n_examples: 3000
  scored:
    kind: split
    data: scored_corpus
    n_targets: 40
"""

# the three stages under fault: fine-tunes, gradient featurisation, AirRep scoring (of a larger corpus,
# so that its embedding lasts long enough, about 10 s, to be interrupted after its first part)
STAGES = {
    "effects": """  effects:
    kind: subset_effects
    model: model
    data: data
    subsets: subsets
    subsets_per_task: 2
""",
    "features": """  features:
    kind: gradient_features
    model: model
    data: data
    k_in: 4
    k_out: 4
    shard_rows: 20
""",
    "scores": """  scores:
    kind: influence_scores
    data: scored
    method: airrep
    encoder_path: {airrep}
    embed_batch_size: 8
""",
}
UPSTREAM_STEPS = ("corpus", "data", "tokenizer", "model", "subsets", "scored_corpus", "scored")
# the Ray process title of a worker doing each stage's work
WORKER_TITLE = {
    "effects": "ray::train_batch",
    "features": "ray::_featurise_shards",
    "scores": "ray::MapWorker(MapBatches(_Embedder)).submit",
}
# a unit of finished work in the step's scratch folder, and the metric counting units a re-run skipped
SCRATCH_UNIT = {
    "effects": "batch-*.parquet",
    "features": "part-*.parquet",
    "scores": "embeddings/part-*.parquet",
}
RESUMED = {"effects": "subsets_resumed", "features": "shards_resumed", "scores": "texts_resumed"}
ID_COLUMNS = {
    "effects": ["subset_id", "target_id"],
    "features": ["example_id"],
    "scores": ["target_id", "example_id"],
}


def spec_text(stages: list[str], airrep: Path) -> str:
    return UPSTREAM + "".join(STAGES[s] for s in stages).format(airrep=airrep)


def workers_titled(driver: int, prefix: str) -> list[int]:
    return [pid for pid in descendants(driver) if title(pid).startswith(prefix)]


def units_done(store: Path, key: str, stage: str) -> int:
    return len(list((store / "scratch" / key).glob(SCRATCH_UNIT[stage])))


def table(store: Path, key: str) -> pl.DataFrame:
    return pl.read_parquet(sorted((store / "objects" / key / "data").glob("*.parquet")))


def assert_same_table(got: pl.DataFrame, want: pl.DataFrame, stage: str) -> None:
    """Equal to the uninterrupted run's table: exactly for re-trained effects and re-computed
    features (the same tasks on the same inputs); scores to float32 rounding, since a re-embedded
    text may share its padded batch with other texts."""
    ids = ID_COLUMNS[stage]
    got, want = got.sort(ids), want.sort(ids)
    if stage == "scores":
        assert_frame_equal(got, want, check_exact=False, rel_tol=1e-4, abs_tol=1e-5)
    else:
        assert_frame_equal(got, want, check_exact=True)


def keys_of(store: Path) -> dict[str, str]:
    record = Store(store).read_run()
    return {name: info["key"] for name, info in record.steps.items()}


def seed_upstream(src: Path, dst: Path) -> None:
    """Copy the upstream steps' objects of a finished store into a new one (content-addressed: the
    new run finds them cached)."""
    import shutil

    (dst / "objects").mkdir(parents=True, exist_ok=True)
    keys = keys_of(src)
    for name in UPSTREAM_STEPS:
        shutil.copytree(src / "objects" / keys[name], dst / "objects" / keys[name])
