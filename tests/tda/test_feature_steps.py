"""gradient_features → influence_scores / self_influence on a tiny LM: features of the identity projection
score exactly as GradDot on full gradients; LoGra features with every preconditioner; a featurisation
killed mid-way resumes from its finished shards; features of another model are one line."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines
from pipelines import load_spec
from pipelines.context import execute_step
from pipelines.runner import plan
from pipelines.store import Store
from tests.tda.test_effects_resume import LM_SPEC, Crash, CrashAfter, metric

FEATURES = (
    LM_SPEC.split("  subsets:")[0]
    + """  full:
    kind: gradient_features
    model: model
    data: data
    projection: identity
    dtype: float32
    shard_rows: 50
  logra:
    kind: gradient_features
    model: model
    data: data
    k_in: 4
    k_out: 4
    shard_rows: 50
  graddot:
    kind: influence_scores
    model: model
    data: data
    method: graddot
  graddot_features:
    kind: influence_scores
    features: full
    data: data
    method: graddot
  self:
    kind: self_influence
    features: logra
    method: ekfac
"""
    + "".join(
        f"""  score_{method}:
    kind: influence_scores
    features: logra
    data: data
    method: {method}
    top_k: 5
    score_tasks: 2
"""
        for method in ("logra", "kfac", "ekfac", "gradcos")
    )
)


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    (root / "spec.yaml").write_text(FEATURES)
    return pipelines.run(load_spec(root / "spec.yaml"), store=str(root / "store"), progress=False)


def test_identity_features_score_exactly_as_graddot_on_full_gradients(run):
    full = run.table("graddot").collect().sort("target_id", "example_id")
    features = run.table("graddot_features").collect().sort("target_id", "example_id")
    assert full.select("target_id", "example_id").equals(features.select("target_id", "example_id"))
    scale = float(full["score"].abs().max())
    assert float((full["score"] - features["score"]).abs().max()) <= 1e-5 * scale


def test_logra_features_with_every_preconditioner(run):
    features = run.table("logra").collect()
    assert features.height == 140 and set(features["split"]) == {"train", "target"}
    field = pq.read_schema(next(run.output("logra").data_dir.glob("*.parquet"))).field("features")
    assert field.type == pa.binary(64 * 2)  # K = 64 float16 values per row, one binary value
    assert field.metadata == {b"dtype": b"float16", b"dim": b"64"}
    for method in ("logra", "kfac", "ekfac", "gradcos"):
        scores = run.table(f"score_{method}").collect()
        assert scores.height == 20 * 5 and scores["method"].unique().to_list() == [method]
        assert scores.group_by("target_id").agg(pl.col("score").is_sorted(descending=True))["score"].all()
    self_influence = run.table("self").collect()
    assert self_influence.height == 120 and (self_influence["score"] > 0).all()
    assert (
        run.output("logra").manifest["metrics"]["dim"] == 4 * 4 * 4
    )  # 1 block × (c_attn, c_proj, c_fc, c_proj)


def test_a_featurisation_killed_mid_way_resumes_from_its_finished_shards(write_spec, tmp_path):
    store = Store(tmp_path / "store")
    _, planned = plan(load_spec(write_spec(FEATURES)), store)
    for name in ("wine", "data", "tokenizer", "model"):
        assert execute_step(planned[name].job).ok
    job = planned["logra"].job  # 140 rows in shards of 50: 3 shards, 2 per task
    with pytest.raises(Crash):
        execute_step(job, CrashAfter(1))
    assert len(list(store.scratch_dir(job.key).glob("part-*.parquet"))) == 2
    outcome = execute_step(job)
    assert metric(outcome, "shards_resumed") == 2 and metric(outcome, "shards_featurised") == 1
    assert store.get(job.key).table().collect().height == 140


def test_features_of_another_model_are_refused_when_the_spec_is_validated(tmp_path):
    from pipelines.errors import SpecError

    text = FEATURES.replace(
        "  graddot_features:\n    kind: influence_scores\n    features: full\n    data: data\n",
        "  graddot_features:\n    kind: influence_scores\n    features: full\n    model: other\n"
        "    data: data\n",
    ).replace(
        "  full:\n",
        "  other:\n    kind: train_model\n    data: data\n    family: causal_lm\n    tokenizer: tokenizer\n"
        "    n_layer: 1\n    n_embd: 32\n    max_len: 48\n    epochs: 2\n    l2: 0\n  full:\n",
    )
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError) as info:  # before Ray starts (the step re-checks its inputs' keys)
        load_spec(tmp_path / "spec.yaml")
    assert (
        "steps.graddot_features.features: features 'full' are made from model 'model', not from 'other'"
        in (str(info.value))
    )
