"""`tda report`: the page of a run, from a hand-made store (no Ray) and from a real study (embedded Ray),
checked in headless Chromium (tests/tda/report_browser.py) and as HTML."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import pipelines
from pipelines.cli import main
from pipelines.store import RunRecord, Store
from tda.report.build import build_report, write_report
from tests.tda.report_browser import EXTERNAL, check_page, chromium_missing

RUN_ID = "20260101-000000-abcdef"
NASTY = "</script><script>alert(1)</script> & <b>"


def _commit(store: Store, name: str, kind: str, frame: pl.DataFrame, params: dict | None = None) -> dict:
    key = f"{name}-key"
    staging = store.staging_dir(key)
    (staging / "data").mkdir()
    frame.write_parquet(staging / "data" / "part-0.parquet")
    schema = [{"name": c, "type": str(t)} for c, t in frame.schema.items()]
    store.commit(key, staging, {"name": name, "kind": kind, "schema": schema, "rows": frame.height})
    return {"kind": kind, "key": key, "status": "done", "rows": frame.height} | {"params": params or {}}


def _tables(rng: np.random.Generator) -> dict[str, tuple[str, pl.DataFrame, dict]]:
    ids, targets = list(range(24)), list(range(24, 30))
    data = pl.DataFrame(
        {
            "example_id": ids + targets,
            "prompt": [f"prompt {i}" if i else NASTY for i in ids + targets],
            "response": [f"response {i}" for i in ids + targets],
            "group": [f"g{i % 3}" for i in ids + targets],
            "split": ["train"] * 24 + ["target"] * 6,
            "source": ["web"] * 30,
        }
    )

    def scores(method: str) -> pl.DataFrame:
        pairs = [(t, e) for t in targets for e in ids]
        frame = pl.DataFrame(pairs, schema=["target_id", "example_id"], orient="row")
        return frame.with_columns(
            method=pl.lit(method), score=pl.Series(rng.normal(size=len(pairs)), dtype=pl.Float32)
        )

    lds = pl.DataFrame(
        [(m, "sum", t, float(rng.uniform(-0.2, 0.8))) for m in ("graddot", "repsim") for t in targets],
        schema=["method", "aggregation", "target_id", "spearman"],
        orient="row",
    )
    groups = pl.DataFrame({"group_id": [f"G{j}" for j in range(4)], "strategy": "random", "fraction": 0.1})
    predicted = pl.DataFrame(
        [
            (m, o, t, f"G{j}", float(rng.normal()))
            for m, o in (("if-order1", 1), ("if-order2", 2))
            for t in targets
            for j in range(4)
        ],
        schema=["method", "order", "target_id", "group_id", "score"],
        orient="row",
    )
    truth = predicted.filter(pl.col("order") == 1).select(
        "target_id", "group_id", actual=pl.col("score") * 0.9
    )
    selection = pl.DataFrame(
        {
            "method": ["graddot", "graddot", "random", "random"],
            "strategy": "top",
            "budget": [5, 10, 5, 10],
            "loss": [1.0, 0.9, 1.2, 1.1],
            "gain": [0.2, 0.2, None, None],
            "gain_low": [0.1, 0.1, None, None],
            "gain_high": [0.3, 0.3, None, None],
        }
    )
    removal = pl.DataFrame(
        {
            "method": ["graddot", "random"],
            "k": [3, 3],
            "rise": [0.3, 0.1],
            "rise_low": [0.2, 0.0],
            "rise_high": [0.4, 0.2],
        }
    )
    return {
        "data": ("split", data, {}),
        "graddot": ("influence_scores", scores("graddot"), {"data": "data", "top_k": None}),
        "repsim": ("influence_scores", scores("repsim"), {"data": "data", "top_k": None}),
        "lds": ("evaluate_lds", lds, {}),
        "groups": ("make_groups", groups, {}),
        "group_scores": ("group_influence", predicted, {}),
        "group_truth": ("retrain_without_groups", truth, {}),
        "selection": ("select_and_train", selection, {}),
        "removal": ("removal_check", removal, {}),
    }


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    """A store with one hand-made run holding every table a report shows (no Ray, no MLflow)."""
    root = tmp_path_factory.mktemp("report") / "store"
    store = Store(root)
    store.prepare()
    steps, spec = {}, {}
    for name, (kind, frame, params) in _tables(np.random.default_rng(0)).items():
        info = _commit(store, name, kind, frame)
        steps[name] = {k: v for k, v in info.items() if k != "params"}
        spec[name] = {"kind": kind} | params
    record = RunRecord(RUN_ID, "toy", "toy.yaml", str(root), {"steps": spec}, status="succeeded", steps=steps)
    store.write_run(record)
    return root


def test_page_has_every_section_and_no_external_reference(toy_store):
    page = build_report(pipelines.open_run(str(toy_store)))
    assert not EXTERNAL.findall(page) and "http://" not in page and "https://" not in page
    figures = re.findall(r'data-figure="([^"]+)"', page)
    assert figures == ["lds", "lds-distribution", "groups-0", "curves-0", "curves-1"]
    assert set(re.findall(r'<tr data-method="([^"]+)"', page)) == {"graddot", "repsim"}
    assert "cost" not in figures  # no summary with seconds in this run: the cost figure is left out
    assert "<script>alert" not in page  # text goes into the page's JSON with every `<` escaped


def test_explorer_embeds_only_the_top_and_bottom_k(toy_store):
    page = build_report(pipelines.open_run(str(toy_store)), top=2, max_targets=3)
    data = json.loads(re.search(r'id="explorer-data">(.*?)</script>', page, re.DOTALL).group(1))
    assert [t["id"] for t in data["targets"]] == [24, 25, 26] and data["n_targets"] == 6
    assert data["methods"] == ["graddot", "repsim"] and data["k"] == 2
    pro, pro_scores, con, con_scores = data["top"]["graddot"]["24"]
    assert len(pro) == len(con) == 2 and pro_scores[0] >= pro_scores[1] >= con_scores[1] >= con_scores[0]
    named = {str(i) for cells in data["top"].values() for c in cells.values() for i in c[0] + c[2]}
    assert set(data["examples"]) == named | {"24", "25", "26"}
    assert data["columns"] == ["group", "source"] and data["examples"]["0"][0] == NASTY


def test_cli_writes_the_page_and_reports_a_bad_run_in_one_line(toy_store, tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["report", "--store", str(toy_store), "--out", str(out)]) == 0
    assert (out / f"{RUN_ID}.html").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    assert main(["report", "nope", "--store", str(toy_store), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no run matching 'nope'" in err and "\n" not in err and not (tmp_path / "bad").exists()
    assert main(["report", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2
    assert "no runs in this store" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_out_that_is_a_file_is_refused(toy_store, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["report", "--store", str(toy_store), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_broken_command_plugin_is_named_and_left_out(monkeypatch, capsys):
    import importlib.metadata

    broken = EntryPoint("broken", "no_such_module:COMMAND", "pipelines.commands")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    from pipelines.cli import parser

    assert parser().parse_args(["runs"]).command == "runs"
    assert "command 'broken' (no_such_module:COMMAND) left out" in capsys.readouterr().err


def test_attribution_summary_logs_the_report_figures(tmp_path):
    from tda.steps.attribution_summary import _figures

    summary = pl.DataFrame(
        {
            "method": ["a", "b", "a − b"],
            "aggregation": "sum",
            "targets": "heldout",
            "lds": [0.4, 0.2, 0.2],
            "lds_low": [0.3, 0.1, 0.1],
            "lds_high": [0.5, 0.3, 0.3],
            "seconds": [1.0, 10.0, None],
        }
    )
    lds = pl.DataFrame(
        {"method": ["a", "b"] * 5, "aggregation": "sum", "targets": "heldout", "target_id": range(10)}
    )
    _figures(summary, lds.with_columns(spearman=pl.Series(np.linspace(-0.5, 0.9, 10))), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost.png", "lds.png", "lds_distribution.png"]


@pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))
def test_toy_page_in_chromium(toy_store, tmp_path):
    path = write_report(pipelines.open_run(str(toy_store)), tmp_path)
    seen = check_page(path, {"graddot", "repsim"})
    assert len(seen["figures"]) == 5 and seen["proponent"]


# ---------------------------------------------------------------- a real study (embedded Ray)

STUDY = """
version: 1
name: report_study
seed: 3
steps:
  corpus: {kind: synthetic_instructions, n_examples: 200}
  data: {kind: split, data: corpus, n_targets: 16, stratify_by: group}
  tokenizer: {kind: train_tokenizer, corpus: data, vocab_size: 300}
  model:
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
  subsets: {kind: sample_subsets, data: data, n_subsets: 8, subset_size: 40, eval_fraction: 0.5}
  effects:
    kind: subset_effects
    model: model
    data: data
    subsets: subsets
    recipe: {epochs: 1}
    subsets_per_task: 4
  graddot: {kind: influence_scores, model: model, data: data, method: graddot}
  gradcos: {kind: influence_scores, model: model, data: data, method: gradcos}
  lds: {kind: evaluate_lds, scores: [graddot, gradcos], subsets: subsets, effects: effects}
  summary:
    kind: attribution_summary
    lds: [lds]
    scores: [graddot, gradcos]
    data: data
    compare: [[gradcos, graddot]]
"""


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_study")
    (root / "spec.yaml").write_text(STUDY)
    return pipelines.run(pipelines.load_spec(root / "spec.yaml"), store=str(root / "store"), progress=False)


def test_study_summary_logs_its_figures(study):
    artifacts = study.store.get(study.steps["summary"]["key"]).dir / "artifacts"
    assert {"lds.png", "lds_distribution.png", "cost.png"} <= {p.name for p in artifacts.iterdir()}


@pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))
def test_study_report_in_chromium(study, tmp_path):
    assert main(["report", study.run_id, "--store", study.store.location, "--out", str(tmp_path)]) == 0
    seen = check_page(tmp_path / f"{study.run_id}.html", {"graddot", "gradcos"})
    assert {f[0] for f in seen["figures"]} == {"lds", "lds-distribution", "cost"}
