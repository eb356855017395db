"""The Python example (examples/top_proponents.py) runs a small LM study and joins scores to text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl

from tests.tda.test_lm_steps import LM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "top_proponents.py"


def _example():
    spec = importlib.util.spec_from_file_location("top_proponents", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_joins_top_scores_to_the_corpus_text(ray_session, tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(
        LM.replace("    scores: [graddot]", "    scores: [graddot, gradcos]")
        + "  gradcos:\n    kind: influence_scores\n    model: base\n    data: data\n    method: gradcos\n"
    )
    example = _example()
    run = example.main([str(tmp_path / "spec.yaml"), "--store", str(tmp_path / "store"), "--top", "3"])
    out = capsys.readouterr().out
    assert "graddot" in out and "gradcos" in out and "target_prompt" in out
    top = example.top_proponents(run, targets=2, top=3)
    assert top.height == 2 * 2 * 3 and set(top["method"]) == {"graddot", "gradcos"}
    corpus = run.table("data").collect()
    texts = dict(zip(corpus["example_id"], corpus["prompt"], strict=True))
    assert all(texts[e] == p for e, p in zip(top["example_id"], top["prompt"], strict=True))
    assert all(texts[t] == p for t, p in zip(top["target_id"], top["target_prompt"], strict=True))
    scores = run.table("graddot").collect()
    for target in top["target_id"].unique():
        best = scores.filter(pl.col("target_id") == target).sort("score", descending=True).head(3)
        shown = top.filter((pl.col("method") == "graddot") & (pl.col("target_id") == target))
        assert shown["example_id"].to_list() == best["example_id"].to_list()
    lds = example.lds_by_method(run)
    assert set(lds["method"]) == {"graddot", "gradcos"} and lds["lds"].is_between(-1, 1).all()
