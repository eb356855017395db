"""Acting on attributions: the removal check and data selection, retrained for real on digits."""

from __future__ import annotations

import polars as pl
import pytest

import pipelines
from pipelines import load_spec

DIGITS = """
version: 1
name: act
seed: 0
steps:
  digits:
    kind: tabular_dataset
    source: sklearn:digits
  data:
    kind: split
    data: digits
    n_targets: 40
    n_train: 300
    stratify_by: label
  model:
    kind: train_model
    data: data
    family: logistic_regression
    l2: 1.0e-2
  if_exact:
    kind: influence_scores
    model: model
    data: data
    method: if-exact
  gradcos:
    kind: influence_scores
    model: model
    data: data
    method: gradcos
  removal:
    kind: removal_check
    model: model
    data: data
    scores: [if_exact, gradcos]
    ks: [5, 20]
    n_targets: 12
    n_random: 2
  selection:
    kind: select_and_train
    model: model
    data: data
    scores: [if_exact, gradcos]
    budgets: [60]
    n_random: 3
  pruning:
    kind: select_and_train
    model: model
    data: data
    scores: [if_exact]
    budgets: [30]
    strategy: prune
    n_random: 2
"""


@pytest.fixture(scope="module")
def act_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("act")
    (root / "spec.yaml").write_text(DIGITS)
    return pipelines.run(load_spec(root / "spec.yaml"), store=str(root / "store"), progress=False)


def test_removing_top_proponents_raises_the_loss_more_than_random(act_run):
    table = act_run.table("removal").collect()
    assert set(zip(table["method"], table["k"], strict=True)) == {
        (m, k) for m in ("if-exact", "gradcos", "random") for k in (5, 20)
    }
    assert (table["targets"] == 12).all()
    exact = table.filter(pl.col("method") == "if-exact").sort("k")
    random = table.filter(pl.col("method") == "random").sort("k")
    assert (exact["rise"] > random["rise"]).all()  # the counterfactual test of an exact influence
    assert exact["rise"][1] > exact["rise"][0]  # removing more of the proponents hurts more
    assert exact["gain_low"][1] > 0  # the paired interval over targets excludes 0 at k = 20
    assert (table["rise_low"] <= table["rise"]).all() and (table["rise"] <= table["rise_high"]).all()
    assert random["gain"].is_null().all()
    per = pl.read_parquet(act_run.output("removal").dir / "per_target.parquet")
    assert per.height == 12 * 2 * (2 + 2)  # targets × ks × (methods + random draws)
    mean = per.filter((pl.col("method") == "if-exact") & (pl.col("k") == 20))["rise"].mean()
    assert exact["rise"][1] == pytest.approx(mean)
    assert per.group_by("target_id").agg(pl.col("full_loss").n_unique())["full_loss"].max() == 1
    assert (act_run.output("removal").dir / "artifacts" / "removal.png").stat().st_size > 0


def test_selection_by_score_against_random_choices(act_run):
    table = act_run.table("selection").collect()
    assert set(table["method"]) == {"if-exact", "gradcos", "random"}
    assert (table["budget"] == 60).all() and (table["kept"] == 60).all()
    assert (table["targets"] == 20).all()  # half the 40 targets judge; the other half chose
    chosen = table.filter(pl.col("method") != "random")
    assert chosen["gain"].to_numpy() == pytest.approx((chosen["random_loss"] - chosen["loss"]).to_numpy())
    assert (chosen["gain_low"] <= chosen["gain"]).all() and (chosen["gain"] <= chosen["gain_high"]).all()
    per = pl.read_parquet(act_run.output("selection").dir / "per_target.parquet")
    assert per.height == (2 + 3) * 20
    pruning = act_run.table("pruning").collect()
    assert set(pruning["strategy"]) == {"prune"} and (pruning["kept"] == 300 - 30).all()


def test_a_budget_beyond_the_training_set_is_one_line(act_run, tmp_path):
    text = DIGITS.replace("budgets: [60]", "budgets: [300]")
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(pipelines.RunFailed) as failed:
        pipelines.run(load_spec(tmp_path / "spec.yaml"), store=str(act_run.store.root), progress=False)
    assert "budget 300 is not below the 300 training examples" in failed.value.failed["selection"]


def test_round_robin_takes_every_targets_best_first():
    from tda.steps.select_and_train import _aggregate

    scores = pl.LazyFrame(
        {
            "method": ["m"] * 6,
            "target_id": [1, 1, 1, 2, 2, 2],
            "example_id": [10, 11, 12, 10, 11, 12],
            "score": [3.0, 2.0, 1.0, 0.0, 5.0, 4.0],
        }
    )
    order = _aggregate(scores, "round_robin").sort("value", descending=True).collect()["example_id"]
    assert order.to_list() == [11, 10, 12]  # the two targets' favourites (higher score first), then the rest
    mean = _aggregate(scores, "mean").sort("value", descending=True).collect()["example_id"]
    assert mean.to_list() == [11, 12, 10]
