"""specs/corpus_metadata.yaml end to end on a real embedded Ray: a shipped corpus with extra columns
and a split column → tokenizer → GPT-2 → GradDot top-5, and the README's join of the top-scored
training examples back to their metadata; a bad split value fails the step in one line; YAML's
number and boolean keys of `split_values` match the text of the values."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

import pipelines
from pipelines import load_spec

SPEC = Path(__file__).resolve().parents[2] / "specs" / "corpus_metadata.yaml"
JOIN = """
SELECT g.target_id, g.example_id, c.source, c.license, c.url, ROUND(CAST(g.score AS DOUBLE), 1) AS score
FROM graddot g JOIN corpus c USING (example_id)
ORDER BY g.target_id, g.score DESC
"""


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory, tracking_uri):
    store = tmp_path_factory.mktemp("corpus_metadata") / "store"
    return pipelines.run(load_spec(SPEC), store=str(store), tracking_uri=tracking_uri, progress=False)


def test_the_corpus_keeps_its_columns_and_split(run):
    corpus = run.table("corpus").collect()
    assert corpus.columns == [
        *("example_id", "prompt", "response", "group", "split"),
        *("source", "url", "license", "year"),
    ]
    assert corpus["example_id"].to_list() == list(range(10_000, 10_360))
    assert corpus["split"].value_counts().sort("split").rows() == [("target", 40), ("train", 320)]
    assert corpus.schema["year"] == pl.Int64
    metrics = run.output("corpus").manifest["metrics"]
    assert metrics["extra_columns"] == 4 and metrics["train"] == 320 and metrics["targets"] == 40


def test_top_scored_examples_join_back_to_their_metadata(run):
    joined = run.sql(JOIN)
    assert joined.height == 40 * 5 and joined.null_count().sum_horizontal().item() == 0
    assert joined["url"].to_list() == [
        f"https://data.example.org/{source}/{example}"
        for source, example in joined.select("source", "example_id").iter_rows()
    ]
    corpus = run.table("corpus").collect()
    train = set(corpus.filter(pl.col("split") == "train")["example_id"])
    assert set(joined["example_id"]) <= train
    assert set(joined["target_id"]) == set(corpus.filter(pl.col("split") == "target")["example_id"])
    assert set(joined["license"]) <= {"CC-BY-4.0", "MIT", "CC-BY-SA-4.0", "proprietary"}


def test_an_unknown_split_value_fails_the_step_in_one_line(failed_error, tmp_path):
    rows = [{"prompt": "p", "response": "r", "fold": fold} for fold in ("train", "holdout")]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = "version: 1\nname: c\nsteps:\n  c:\n    kind: load_corpus\n    path: c.jsonl\n"
    error = failed_error(spec + "    split_column: fold\n", "c")
    assert error.startswith("DataError: ") and "c.jsonl:2: split column 'fold' holds 'holdout'" in error
    assert "split_values" in error


def test_yaml_number_and_boolean_keys_of_split_values(tmp_path):
    import yaml

    from tda.data.corpus import load_corpus
    from tda.steps.load_corpus import LoadCorpusParams

    rows = [
        {"prompt": "p", "response": "r", "fold": 0, "held": False},
        {"prompt": "q", "response": "s", "fold": 1, "held": True},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for column, values in [("fold", "{0: train, 1: target}"), ("held", "{false: train, true: target}")]:
        fields = yaml.safe_load(f"path: c.jsonl\nsplit_column: {column}\nsplit_values: {values}\n")
        params = LoadCorpusParams.model_validate(fields)
        corpus = load_corpus(tmp_path / params.path, split_column=column, split_values=params.split_values)
        assert corpus["split"].to_list() == ["train", "target"]
