"""Language-model experiments end to end on a real embedded Ray, at toy size: synthetic corpus →
tokenizer → GPT-2 → subset fine-tunes → effects → GradDot → LDS; corpus loading; bad input."""

from __future__ import annotations

import json

import polars as pl
import pytest

import pipelines
from pipelines import load_spec

LM = """
version: 1
name: lm_small
seed: 1
steps:
  corpus:
    kind: synthetic_instructions
    n_examples: 260
  data:
    kind: split
    data: corpus
    n_targets: 20
    stratify_by: group
  tokenizer:
    kind: train_tokenizer
    corpus: data
    vocab_size: 300
  base:
    kind: train_model
    data: data
    family: causal_lm
    tokenizer: tokenizer
    n_layer: 1
    n_embd: 32
    n_head: 2
    max_len: 48
    epochs: 2
    l2: 0
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 12
    subset_size: 40
    eval_fraction: 0.5
  effects:
    kind: subset_effects
    model: base
    data: data
    subsets: subsets
    recipe: {epochs: 1}
    subsets_per_task: 4
  graddot:
    kind: influence_scores
    model: base
    data: data
    method: graddot
  lds:
    kind: evaluate_lds
    scores: [graddot]
    subsets: subsets
    effects: effects
"""


@pytest.fixture(scope="module")
def lm_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "spec.yaml").write_text(LM)
    return pipelines.run(load_spec(root / "spec.yaml"), store=str(root / "store"), progress=False)


def test_lm_study_tables(lm_run):
    corpus = lm_run.table("corpus").collect()
    assert corpus.columns == ["example_id", "prompt", "response", "group"] and corpus.height == 260
    assert corpus["group"].n_unique() >= 12
    effects = lm_run.table("effects").collect()
    assert effects.height == 12 * 20  # exactly n_subsets × n_targets
    assert (lm_run.output("effects").dir / "base_losses.parquet").is_file()
    assert "same_group_signal" in lm_run.output("effects").manifest["metrics"]
    assert lm_run.table("graddot").collect().height == 20 * 240
    lds = lm_run.table("lds").collect()
    assert lds.height == 20 and lds["method"].unique().to_list() == ["graddot"]
    model_dir = lm_run.output("base").model_dir  # a transformers folder with its tokenizer
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tda_model.json"} <= files


PAPER = (
    LM.replace(
        """  tokenizer:
    kind: train_tokenizer
    corpus: data
""",
        """  pre_corpus:
    kind: synthetic_instructions
    n_examples: 200
    seed: 7
    exclude: corpus
  pre_data:
    kind: split
    data: pre_corpus
    n_targets: 10
  tokenizer:
    kind: train_tokenizer
    corpus: pre_data
""",
    )
    .replace(
        """  base:
    kind: train_model
    data: data
""",
        """  pretrained:
    kind: train_model
    data: pre_data
""",
    )
    .replace(
        """  subsets:
""",
        """  base:
    kind: train_model
    data: data
    family: causal_lm
    init: pretrained
    max_len: 48
    epochs: 1
    l2: 0
  subsets:
""",
    )
    .replace(
        "    recipe: {epochs: 1}\n", "    recipe: {epochs: 1}\n    protocol: paper\n    base: pretrained\n"
    )
)


def test_the_paper_protocol_fine_tunes_each_subset_from_the_base_with_its_own_order(
    ray_session, tmp_path, tracking_uri
):
    from tda.steps.subset_effects import subset_seeds

    (tmp_path / "spec.yaml").write_text(PAPER)
    spec = load_spec(tmp_path / "spec.yaml")
    run = pipelines.run(spec, store=str(tmp_path / "store"), tracking_uri=tracking_uri, progress=False)
    pool = run.table("corpus").select("prompt", "response").collect()
    pre = run.table("pre_corpus").collect()
    assert pre.height == 200 and pre.join(pool, on=["prompt", "response"], how="semi").is_empty()
    assert run.output("effects").manifest["params"]["protocol"] == "paper"
    effects = run.table("effects").collect()
    assert effects.height == 12 * 20 and effects["loss"].is_finite().all()
    assert run.table("lds").collect().height == 20
    seeds = subset_seeds(1, range(12))
    assert len(set(seeds)) == 12 and seeds == subset_seeds(1, range(12))


def test_load_corpus_alpaca_jsonl_and_parquet_shards(ray_session, tmp_path, tracking_uri):
    rows = [
        {
            "instruction": f"Add {i} and {i}",
            "input": "" if i % 2 else "quickly",
            "output": str(2 * i),
            "task": "add",
        }
        for i in range(6)
    ]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        pl.DataFrame({"prompt": [f"p{i}a", f"p{i}b"], "response": ["r", "s"]}).write_parquet(
            shards / f"part-{i:02d}.parquet"
        )
    (tmp_path / "spec.yaml").write_text("""
version: 1
name: corpora
steps:
  alpaca:
    kind: load_corpus
    path: alpaca.jsonl
    columns: {instruction: instruction, input: input, output: output, group: task}
  sharded:
    kind: load_corpus
    path: shards
""")
    run = pipelines.run(
        load_spec(tmp_path / "spec.yaml"),
        store=str(tmp_path / "store"),
        tracking_uri=tracking_uri,
        progress=False,
    )
    alpaca = run.table("alpaca").collect()
    assert alpaca["prompt"][0] == "Add 0 and 0\n\nquickly" and alpaca["response"][3] == "6"
    assert set(alpaca["group"]) == {"add"}
    sharded = run.table("sharded").collect().sort("example_id")
    assert sharded["example_id"].to_list() == list(range(6)) and sharded["prompt"][2] == "p1a"


def corpus_spec(path: str, extra: str = "") -> str:
    return f"version: 1\nname: c\nsteps:\n  c:\n    kind: load_corpus\n    path: {path}\n{extra}"


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (b'{"question": "a", "response": "b"}\n', "", "no column 'prompt'"),
        (b"", "", "empty"),
        (b'{"prompt": "caf\xe9", "response": "b"}\n', "", "not valid UTF-8"),
    ],
)
def test_bad_corpora(failed_error, tmp_path, content, extra, message):
    (tmp_path / "c.jsonl").write_bytes(content)
    error = failed_error(corpus_spec("c.jsonl", extra), "c")
    assert error.startswith("DataError: ") and "c.jsonl" in error and message in error


def test_target_id_not_in_the_corpus(failed_error, tmp_path):
    error = failed_error(
        """
version: 1
name: t
steps:
  corpus:
    kind: synthetic_instructions
    n_examples: 30
  data:
    kind: split
    data: corpus
    target_ids: [1, 2, 999]
""",
        "data",
    )
    assert error.startswith("DataError: split: target example_id 999") and "not in the data" in error
