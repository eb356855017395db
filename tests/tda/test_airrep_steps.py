"""AirRep as step kinds on a real embedded Ray: train_airrep on Ray Train (1 vs 2 workers, a worker
killed mid-training), airrep/repsim scores through Ray Data, attention LDS, the summary; bad input."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

import pipelines
from pipelines import SpecError, load_spec, loads_spec

STUDY = """
version: 1
name: airrep_small
seed: 3
steps:
  corpus:
    kind: synthetic_instructions
    n_examples: 200
  data:
    kind: split
    data: corpus
    n_targets: 40
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
    max_len: 40
    epochs: 1
    l2: 0
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 24
    subset_size: 40
    eval_fraction: 0.25
  effects:
    kind: subset_effects
    model: base
    data: data
    subsets: subsets
    recipe: {epochs: 1}
    subsets_per_task: 6
  airrep:
    kind: train_airrep
    data: data
    subsets: subsets
    effects: effects
    max_tokens: 32
    trainable: projection
    steps: STEPS
    warmup_steps: 2
    episodes_per_step: 2
    subsets_per_episode: 6
    targets_per_episode: 8
    projection_lr: 1.0e-3
    eval_every: 5
    checkpoint_every: 2
    num_workers: WORKERS
"""

SCORING = """
  airrep_scores:
    kind: influence_scores
    data: data
    method: airrep
    encoder: airrep
  airrep_untrained:
    kind: influence_scores
    data: data
    method: airrep
    encoder: airrep
    untrained: true
    label: airrep-untrained
  repsim:
    kind: influence_scores
    data: data
    method: repsim
    max_tokens: 32
  groups:
    kind: make_groups
    data: data
    strategy: column
    column: group
  group_scores:
    kind: group_influence
    method: airrep
    data: data
    groups: groups
    encoder: airrep
  lds:
    kind: evaluate_lds
    scores: [airrep_scores, airrep_untrained, repsim]
    subsets: subsets
    effects: effects
    aggregation: [attention, sum]
  summary:
    kind: attribution_summary
    lds: [lds]
    scores: [airrep_scores, airrep_untrained, repsim]
    data: data
    roles: airrep
    compare: [[airrep, airrep-untrained], [airrep, repsim]]
"""


def study(steps: int, workers: int, scoring: bool = False) -> str:
    text = STUDY.replace("STEPS", str(steps)).replace("WORKERS", str(workers))
    return text + (SCORING if scoring else "")


def run_study(root: Path, text: str, tracking_uri: str, **options) -> pipelines.Run:
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(text)
    return pipelines.run(
        load_spec(root / "spec.yaml"),
        store=str(root / "store"),
        tracking_uri=tracking_uri,
        progress=False,
        **options,
    )


def history(run: pipelines.Run) -> dict:
    return json.loads((run.output("airrep").model_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory, tracking_uri):
    return run_study(tmp_path_factory.mktemp("airrep1"), study(12, 1, scoring=True), tracking_uri)


def test_study_tables(one_worker):
    roles = one_worker.table("airrep").collect()
    assert roles.height == 40 and set(roles["role"]) == {"fit", "val", "heldout"}
    assert (roles["role"] == "heldout").sum() == 20
    model = one_worker.output("airrep").model_dir
    assert (model / "projection.safetensors").is_file() and (model / "encoder" / "config.json").is_file()
    airrep = one_worker.table("airrep_scores").collect()
    assert airrep.height == 40 * 160 and set(airrep["method"]) == {"airrep"}
    embeddings = pl.read_parquet(one_worker.output("airrep_scores").dir / "embeddings.parquet")
    assert embeddings.height == 200 and embeddings["embedding"].to_numpy().shape == (200, 384)
    repsim = one_worker.table("repsim").collect()
    assert repsim["score"].max() <= 1.0 + 1e-5  # cosine
    lds = one_worker.table("lds").collect()
    assert set(zip(lds["method"], lds["aggregation"], strict=True)) == {
        (m, a) for m in ("airrep", "airrep-untrained", "repsim") for a in ("attention", "sum")
    }
    # the untrained start: MiniLM's pooled features (τ = 1, identity projection), plain dot products
    untrained = one_worker.table("airrep_untrained").collect()
    assert set(untrained["method"]) == {"airrep-untrained"} and untrained.height == 40 * 160
    assert untrained["score"].max() > 1.5  # unnormalised dot products, not cosines
    both = airrep.join(untrained, on=["target_id", "example_id"], suffix="_untrained")
    assert (both["score"] - both["score_untrained"]).abs().max() > 1e-3  # not the trained model
    groups = one_worker.table("group_scores").collect()
    assert set(groups["method"]) == {"airrep-attention", "airrep-sum"}
    assert groups.height == 2 * 40 * groups["group_id"].n_unique()
    summary = one_worker.table("summary").collect()
    assert set(summary["targets"]) == {"fit", "val", "heldout"}
    assert summary.filter(pl.col("method") == "airrep")["examples_per_second"].min() > 0
    methods = summary.filter(~pl.col("method").str.contains(" − "))
    assert methods["type_at_1"].is_between(0, 1).all()
    # every LDS has its bootstrap interval; the compared pairs have paired rows
    with_lds = summary.filter(pl.col("lds").is_not_null())
    assert (with_lds["lds_low"] <= with_lds["lds"] + 1e-12).all()
    assert (with_lds["lds"] <= with_lds["lds_high"] + 1e-12).all()
    pairs = summary.filter(pl.col("method").str.contains(" − "))
    assert set(pairs["method"]) == {"airrep − airrep-untrained", "airrep − repsim"}
    assert set(zip(pairs["aggregation"], pairs["targets"], strict=True)) == {
        (a, t) for a in ("attention", "sum") for t in ("fit", "val", "heldout")
    }
    lds_roles = lds.join(roles.select("target_id", "role"), on="target_id")
    for row in pairs.filter(pl.col("method") == "airrep − repsim").iter_rows(named=True):
        per = lds_roles.filter(
            (pl.col("aggregation") == row["aggregation"]) & (pl.col("role") == row["targets"])
        )
        a = per.filter(pl.col("method") == "airrep").sort("target_id")["spearman"]
        b = per.filter(pl.col("method") == "repsim").sort("target_id")["spearman"]
        diff = (a - b).fill_nan(None).drop_nulls()
        assert row["lds"] == pytest.approx(diff.mean()) and row["n_targets"] == len(diff)
    metrics = one_worker.output("airrep").manifest["metrics"]
    assert metrics["heldout_targets"] == 20 and "best_val_lds" in metrics


def test_airrep_training_streams_its_curves_to_mlflow(one_worker, tracking_uri):
    """The loss and validation LDS reach the step's MLflow run while it trains, each step once."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = one_worker.record.mlflow["run_id"]
    (run,) = client.search_runs(
        [one_worker.record.mlflow["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.step = 'airrep'",
    )
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 13))  # every step, none twice
    assert min(m.timestamp for m in loss) < run.info.end_time - 1000  # logged during training
    val = client.get_metric_history(run.info.run_id, "val_lds")
    assert sorted(m.step for m in val) == [0, 5, 10, 12]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 12  # live only: not in the manifest


def test_airrep_artifact_loads_back_by_mlflow_run_id(one_worker, tmp_path, tracking_uri):
    """The trained model is an MLflow artifact of the step's run; `mlflow_run` scores with it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = one_worker.record.mlflow["run_id"]
    runs = client.search_runs(
        [one_worker.record.mlflow["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.step = 'airrep'",
    )
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    text = (one_worker.store.root.parent / "spec.yaml").read_text()
    head = "    encoder: airrep\n  airrep_untrained:"
    assert head in text
    text = text.replace(head, f"    mlflow_run: {run_id}\n  airrep_untrained:")
    again = run_study(one_worker.store.root.parent, text, tracking_uri)
    assert not again.steps["airrep_scores"]["cached"]
    a = again.table("airrep_scores").collect().sort("target_id", "example_id")
    b = one_worker.table("airrep_scores").collect().sort("target_id", "example_id")
    assert (a["score"] - b["score"]).abs().max() < 1e-5


def test_two_workers_match_one_worker(one_worker, tmp_path, tracking_uri):
    """Same global batch (episodes_per_step 2): the 2-worker loss curve equals the 1-worker one."""
    two = run_study(tmp_path / "two", study(12, 2), tracking_uri)
    h1 = [r["loss"] for r in history(one_worker)["history"] if "loss" in r]
    h2 = [r["loss"] for r in history(two)["history"] if "loss" in r]
    assert len(h1) == len(h2) == 12
    assert max(abs(a - b) for a, b in zip(h1, h2, strict=True)) < 1e-5


def _train_workers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in cmd:
                pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_killed_worker_resumes_from_latest_checkpoint(one_worker, tmp_path, tracking_uri):
    """SIGKILL a Ray Train worker after the first checkpoint: the group restarts, resumes from the
    latest checkpoint, and the loss curve equals an uninterrupted run's."""
    root = tmp_path / "killed"
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(run=run_study(root, study(24, 2), tracking_uri)), daemon=True
    )
    thread.start()
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and killed is None and thread.is_alive():
        if list(root.glob("store/scratch/*/checkpoints/step-*/state.json")):
            workers = _train_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "no checkpoint appeared while training ran"
    run = result["run"]
    summary = history(run)
    assert summary["resumed_from"] and summary["resumed_from"][0] >= 2
    assert [r["step"] for r in summary["history"]] == list(range(0, 25))  # step 0: validation only
    reference = run_study(tmp_path / "reference", study(24, 2), tracking_uri)
    a = [r["loss"] for r in summary["history"] if "loss" in r]
    b = [r["loss"] for r in history(reference)["history"] if "loss" in r]
    assert len(a) == len(b) == 24
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_num_workers_above_cluster_cpus_is_refused_before_any_step(ray_session, tmp_path, tracking_uri):
    with pytest.raises(SpecError) as err:
        run_study(tmp_path, study(4, 8).replace("episodes_per_step: 2", "episodes_per_step: 8"), tracking_uri)
    message = str(err.value)
    assert "steps.airrep.num_workers" in message and "needs 8 CPU" in message and "\n" not in message
    assert not (tmp_path / "store" / "objects").exists() or not any(
        (tmp_path / "store" / "objects").iterdir()
    )


def test_encoder_folder_that_is_not_an_encoder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "lm")
    text = study(4, 1).replace(
        "    max_tokens: 32\n", f"    max_tokens: 32\n    encoder: {tmp_path / 'lm'}\n"
    )
    with pytest.raises(SpecError) as err:
        loads_spec(text, str(tmp_path / "spec.yaml"))
    (line,) = str(err.value).splitlines()
    assert "steps.airrep.encoder" in line and "not a text encoder" in line


def test_one_subset_per_target_is_nothing_to_rank(failed_error):
    text = (
        study(4, 1)
        .replace("n_subsets: 24", "n_subsets: 1")
        .replace("eval_fraction: 0.25", "eval_fraction: 0")
    )
    error = failed_error(text, "airrep")
    assert "AirRep ranks subsets per target" in error and "at least 2 fit subsets" in error


def test_embedding_steps_reserve_their_actors_not_their_driver():
    """The driver of an embedding step holds no CPU; its actors' CPUs count against the cluster."""
    from tda.steps.influence_scores import InfluenceScoresParams

    params = InfluenceScoresParams(data="data", method="repsim", embed_workers=3)
    assert params.resources.num_cpus == 0
    assert params.demands()["CPU"] == (3.0, "embed_workers")
    graddot = InfluenceScoresParams(data="data", model="base", method="graddot", embed_workers=3)
    assert graddot.demands()["CPU"] == (1.0, "resources.num_cpus")
