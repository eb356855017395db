"""The influence study end to end on a real embedded Ray: tabular data → model → groups → group
influence vs retraining; subsets → effects → scores → LDS. Table contracts of DESIGN.md."""

from __future__ import annotations

import polars as pl
import pytest

import pipelines
from pipelines import load_spec

STUDY = """
version: 1
name: tabular_study
seed: 3
steps:
  iris:
    kind: tabular_dataset
    source: sklearn:iris
  data:
    kind: split
    data: iris
    n_targets: 30
    stratify_by: label
  model:
    kind: train_model
    data: data
    l2: 0.01
  neighbors:
    kind: make_groups
    data: data
    strategy: neighbors
    fractions: [0.05, 0.2]
    n_per_size: 6
  random:
    kind: make_groups
    data: data
    strategy: random
    fractions: [0.05, 0.2]
    n_per_size: 6
  groups:
    kind: sql
    inputs: [neighbors, random]
    query: SELECT * FROM neighbors UNION ALL SELECT * FROM random
  predicted:
    kind: group_influence
    model: model
    data: data
    groups: groups
  truth:
    kind: retrain_without_groups
    model: model
    data: data
    groups: groups
    groups_per_task: 6
  fidelity:
    kind: evaluate_group_influence
    predicted: predicted
    truth: truth
    groups: groups
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 40
    fraction: 0.5
    eval_fraction: 0.5
  effects:
    kind: subset_effects
    model: model
    data: data
    subsets: subsets
    subsets_per_task: 10
  if_exact:
    kind: influence_scores
    model: model
    data: data
    method: if-exact
  graddot:
    kind: influence_scores
    model: model
    data: data
    method: graddot
    top_k: 20
  lds:
    kind: evaluate_lds
    scores: [if_exact, graddot]
    subsets: subsets
    effects: effects
"""


@pytest.fixture(scope="module")
def study(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    (root / "spec.yaml").write_text(STUDY)
    return pipelines.run(load_spec(root / "spec.yaml"), store=str(root / "store"), progress=False)


def schema(run, step) -> dict[str, str]:
    return {k: str(v) for k, v in run.table(step).collect_schema().items()}


def test_tables_follow_the_contract(study):
    assert schema(study, "iris") == {
        "example_id": "Int64",
        "x_0": "Float64",
        "x_1": "Float64",
        "x_2": "Float64",
        "x_3": "Float64",
        "label": "Int64",
        "group": "String",
    }
    split = study.table("data").collect()
    assert split.height == 150 and (split["split"] == "target").sum() == 30
    assert {"group_id": "String", "example_id": "Int64"}.items() <= schema(study, "groups").items()
    assert schema(study, "predicted") == {
        "method": "String",
        "order": "Int8",
        "target_id": "Int64",
        "group_id": "String",
        "score": "Float64",
    }
    assert schema(study, "truth") == {"target_id": "Int64", "group_id": "String", "actual": "Float64"}
    assert schema(study, "effects") == {"subset_id": "Int32", "target_id": "Int64", "loss": "Float32"}
    assert schema(study, "if_exact") == {
        "method": "String",
        "target_id": "Int64",
        "example_id": "Int64",
        "score": "Float32",
    }
    assert schema(study, "lds") == {
        "method": "String",
        "aggregation": "String",
        "target_id": "Int64",
        "spearman": "Float64",
    }


def test_group_influence_tracks_retraining(study):
    predicted = study.table("predicted").collect()
    assert set(predicted["method"]) == {"if-order1", "if-order2", "newton"}
    n_groups = study.table("groups").select(pl.col("group_id").n_unique()).collect().item()
    assert n_groups == 24 and study.table("truth").collect().height == 30 * 24
    fidelity = study.table("fidelity").collect()
    newton = fidelity.filter(pl.col("method") == "newton")
    assert newton["pearson"].min() > 0.9  # the Newton step is the reference the orders approximate
    assert fidelity.filter(pl.col("method") == "if-order2")["pearson_pooled"].min() > 0.8
    artifacts = study.output("fidelity").dir / "artifacts"
    assert {p.name for p in artifacts.glob("*.png")} == {
        "scatter-if-order1.png",
        "scatter-if-order2.png",
        "scatter-newton.png",
    }


def test_effects_scores_and_lds(study):
    assert study.table("effects").collect().height == 40 * 30
    assert study.table("if_exact").collect().height == 30 * 120  # all pairs
    graddot = study.table("graddot").collect()
    assert graddot.group_by("target_id").len()["len"].max() == 20  # top-k per target
    lds = study.table("lds").collect().group_by("method").agg(pl.col("spearman").mean()).sort("method")
    means = dict(lds.iter_rows())
    assert set(means) == {"if-exact", "graddot"}
    assert means["if-exact"] > 0.5  # influence functions are near exact on this convex model
    assert study.output("lds").manifest["metrics"]["lds.if-exact.sum"] == pytest.approx(means["if-exact"])


BAD = """
version: 1
name: bad
steps:
  iris:
    kind: tabular_dataset
    source: sklearn:iris
  data:
    kind: split
    data: iris
    n_targets: 30
"""


def test_subset_larger_than_the_training_split(failed_error, tmp_path):
    error = failed_error(
        BAD
        + """
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 3
    subset_size: 500
""",
        "subsets",
    )
    assert error == (
        "DataError: sample_subsets: subset_size 500 is larger than the training split (120 rows); "
        "lower subset_size or fraction"
    )


def test_group_with_ids_outside_the_training_split(failed_error, tmp_path):
    error = failed_error(
        BAD
        + """
  model:
    kind: train_model
    data: data
  groups:
    kind: sql
    inputs: [data]
    query: SELECT 'g1' AS group_id, example_id FROM data WHERE split = 'target'
  predicted:
    kind: group_influence
    model: model
    data: data
    groups: groups
""",
        "predicted",
    )
    assert error.startswith("DataError: group 'g1': example_id") and "is not in the training split" in error


def test_singular_hessian_without_damping(failed_error, tmp_path):
    error = failed_error(
        BAD
        + """
  model:
    kind: train_model
    data: data
    l2: 0
    max_iter: 200
  scores:
    kind: influence_scores
    model: model
    data: data
    method: if-exact
""",
        "scores",
    )
    assert error.startswith("InfluenceError: ") and "damping" in error


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("a,b,target\n1,2,0\n3,4,1\n", "no label column 'label'"),
        ("a,b,label\n1,x,0\n3,4,1\n", "non-numeric"),
        ("a,b,label\n1,,0\n3,4,1\n", "b"),
    ],
)
def test_bad_tabular_files(failed_error, tmp_path, csv, message):
    (tmp_path / "d.csv").write_text(csv)
    error = failed_error(
        "version: 1\nname: t\nsteps:\n  d:\n    kind: tabular_dataset\n    source: d.csv\n",
        "d",
    )
    assert error.startswith("DataError: ") and "d.csv" in error and message in error
