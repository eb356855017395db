"""A battery of bad inputs: each is one line that names the file or field and the fix, exit status 2
from the CLI, no traceback, nothing written. Checks that can run when the spec is validated (model
folders, references between steps, types of `--set` values, resources the cluster lacks) stop the run
before anything is stored; checks that need the data (NaN losses, ids from another corpus) fail their
step in one line and commit nothing. See docs/failures.md, "Bad input is one line"."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import pipelines
from pipelines import load_spec
from pipelines.errors import SpecError
from tda.errors import DataError
from tests.tda.test_checkpoint import _corpus, _model, _tokenizer

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- model folders, at validation


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 (300 tokens) saved with its tokenizer, and a tokenizer of a larger vocabulary."""
    root = tmp_path_factory.mktemp("bad_models")
    texts = [f"{p}\n{r}" for p, r in _corpus().select("prompt", "response").iter_rows()]
    tokenizer = _tokenizer(root / "gpt2", texts, 300, False)
    _model("gpt2", len(tokenizer)).save_pretrained(str(root / "gpt2"))
    big = _tokenizer(root / "big_tokenizer", texts * 4, 700, False)
    assert len(big) > 300
    return {"gpt2": root / "gpt2", "big_tokenizer": root / "big_tokenizer"}


def _config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _shard(folder: Path, index: object = None) -> None:
    """The weights as one shard named by an index (or by `index`, written as it is)."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    text = (
        index
        if isinstance(index, str)
        else json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    (folder / "model.safetensors.index.json").write_text(text)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


MODEL_CASES = {
    # case: (make the folder bad, the tokenizer given, what the one line says)
    "truncated safetensors": (
        lambda f: _truncate(f / "model.safetensors"),
        None,
        "model.safetensors: truncated or damaged:",
    ),
    "safetensors cut inside its header": (
        lambda f: _truncate(f / "model.safetensors", 0.0005),
        None,
        "model.safetensors: not a safetensors file",
    ),
    "an empty safetensors file": (
        lambda f: (f / "model.safetensors").write_bytes(b""),
        None,
        "model.safetensors: not a safetensors file",
    ),
    "a pickle named model.safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64),
        None,
        "model.safetensors: not a safetensors file",
    ),
    "a config without weights": (
        lambda f: [p.unlink() for p in f.iterdir() if p.name != "config.json"],
        None,
        "no weights (model.safetensors)",
    ),
    "config.json that is not JSON": (
        lambda f: (f / "config.json").write_text("{model_type: gpt2,"),
        None,
        "config.json: unreadable (",
    ),
    "config.json that is a list": (
        lambda f: (f / "config.json").write_text("[1, 2]"),
        None,
        "config.json: not a JSON object",
    ),
    "an unknown causal architecture": (
        lambda f: _config(f, model_type="mystery", architectures=["MysteryForCausalLM"]),
        None,
        "model_type 'mystery' (architecture MysteryForCausalLM) is not a causal LM that this "
        "transformers knows",
    ),
    "an unknown model_type without architectures": (
        lambda f: _config(f, model_type="mystery", architectures=None),
        None,
        "model_type 'mystery' is not a causal LM that transformers knows",
    ),
    "a config without vocab_size": (
        lambda f: _config(f, vocab_size=None),
        None,
        "config.json: no integer vocab_size",
    ),
    "a shard index that is not JSON": (
        lambda f: _shard(f, "{weight_map"),
        None,
        "model.safetensors.index.json: unreadable index",
    ),
    "a shard index without weight_map": (
        lambda f: _shard(f, json.dumps({"metadata": {}})),
        None,
        "model.safetensors.index.json: unreadable index",
    ),
    "a shard index naming a file outside the folder": (
        lambda f: _shard(f, json.dumps({"weight_map": {"w": "../model.safetensors"}})),
        None,
        "model.safetensors.index.json: unreadable index",
    ),
    "a truncated shard": (
        lambda f: (_shard(f), _truncate(f / "model-00001-of-00001.safetensors")),
        None,
        "model-00001-of-00001.safetensors: truncated or damaged",
    ),
    "a tokenizer of a larger vocabulary": (
        lambda f: None,
        "big_tokenizer",
        "but the model",
    ),
    "a tokenizer folder whose tokenizer.json is not JSON": (
        lambda f: (
            (f.parent / "broken_tokenizer").mkdir(exist_ok=True)
            or (f.parent / "broken_tokenizer" / "tokenizer.json").write_text("{not json")
        ),
        "broken_tokenizer",
        "not a tokenizer folder",
    ),
    "a file where the folder should be": (
        lambda f: (shutil.rmtree(f), f.write_text("weights")),
        None,
        "no such folder",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_bad_model_folder_is_one_line_at_validation(gpt2, tmp_path, case):
    breaks, tokenizer, message = MODEL_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(gpt2["gpt2"], folder)
    breaks(folder)
    extra = ""
    if tokenizer == "big_tokenizer":
        extra = f"    tokenizer: {gpt2['big_tokenizer']}\n"
    elif tokenizer:
        extra = f"    tokenizer: {tmp_path / tokenizer}\n"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\nname: bad\nsteps:\n  lm:\n    kind: checkpoint\n    max_len: 48\n"
        f"{extra}    path: {folder}\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    (line,) = str(info.value).splitlines()
    line_no = 8 if tokenizer else 7
    assert line.startswith(f"{spec}:{line_no}:5: steps.lm.path: "), line
    assert message in line, line


# ---------------------------------------------------------------- tables of another model, run or subsets


TABULAR = """
version: 1
name: bad
steps:
  digits:
    kind: tabular_dataset
    source: sklearn:iris
  data:
    kind: split
    data: digits
    n_targets: 10
  other_data:
    kind: split
    data: digits
    n_targets: 20
  model:
    kind: train_model
    data: data
  other_model:
    kind: train_model
    data: data
    l2: 0.1
  features:
    kind: gradient_features
    model: model
    data: data
    projection: identity
  subsets:
    kind: sample_subsets
    data: data
    n_subsets: 8
    fraction: 0.5
    eval_fraction: 1.0
  other_subsets:
    kind: sample_subsets
    data: data
    n_subsets: 8
    fraction: 0.5
    eval_fraction: 1.0
    seed: 7
  effects:
    kind: subset_effects
    model: model
    data: data
    subsets: subsets
"""

REFERENCE_CASES = {
    "influence_scores on features of another model": (
        "  s:\n    kind: influence_scores\n    model: other_model\n    data: data\n    features: features\n"
        "    method: graddot\n",
        "steps.s.features: features 'features' are made from model 'model', not from 'other_model'",
    ),
    "influence_scores on features of another split": (
        "  s:\n    kind: influence_scores\n    data: other_data\n    features: features\n"
        "    method: graddot\n",
        "steps.s.features: features 'features' are made from data 'data', not from 'other_data'",
    ),
    "features that name a train_model step": (
        "  s:\n    kind: influence_scores\n    data: data\n    features: model\n    method: trak\n",
        "steps.s.features: step 'model' is a train_model step, not gradient_features",
    ),
    "ekfac on identity features": (
        "  s:\n    kind: influence_scores\n    data: data\n    features: features\n    method: ekfac\n",
        "steps.s.method: method ekfac needs features with projection logra, but step 'features' makes "
        "identity features",
    ),
    "self_influence logra on identity features": (
        "  s:\n    kind: self_influence\n    features: features\n    method: logra\n",
        "steps.s.method: method logra needs features with projection logra",
    ),
    "group_influence on features of another model": (
        "  groups:\n    kind: make_groups\n    data: data\n    strategy: random\n    fractions: [0.1]\n"
        "  s:\n    kind: group_influence\n    model: other_model\n    features: features\n    data: data\n"
        "    groups: groups\n",
        "steps.s.features: features 'features' are made from model 'model', not from 'other_model'",
    ),
    "evaluate_lds with effects of other subsets": (
        "  s:\n    kind: evaluate_lds\n    scores: [effects]\n    subsets: other_subsets\n"
        "    effects: effects\n",
        "steps.s.effects: effects 'effects' measured the subsets of 'subsets', not 'other_subsets'",
    ),
    "train_airrep with effects of other subsets": (
        "  s:\n    kind: train_airrep\n    data: data\n    subsets: other_subsets\n    effects: effects\n",
        "steps.s.effects: effects 'effects' measured the subsets of 'subsets', not 'other_subsets'",
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_a_table_of_another_model_or_subsets_is_refused_at_validation(tmp_path, case):
    step, message = REFERENCE_CASES[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(TABULAR.lstrip() + step)
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    (line,) = str(info.value).splitlines()
    assert line.startswith(str(spec)) and message in line, line


# ---------------------------------------------------------------- resources the cluster lacks


GPU_CASES = {
    "subset_effects task_gpus": (
        "effects",
        "    task_gpus: 1\n",
        "steps.effects.task_gpus: the step needs 1 GPU",
    ),
    "subset_effects task_cpus": (
        "effects",
        "    task_cpus: 64\n",
        "steps.effects.task_cpus: the step needs 64 CPU",
    ),
    "removal_check task_gpus (device cuda)": (
        "removal",
        "    device: cuda\n    task_gpus: 0.5\n",
        "steps.removal.task_gpus: the step needs 0.5 GPU",
    ),
    "select_and_train task_cpus": (
        "select",
        "    task_cpus: 32\n",
        "steps.select.task_cpus: the step needs 32 CPU",
    ),
    "gradient_features device cuda": (
        "features",
        "    device: cuda\n    task_gpus: 1\n",
        "steps.features.task_gpus: the step needs 1 GPU",
    ),
    "influence_scores resources.num_gpus": (
        "scores",
        "    resources: {num_gpus: 2}\n",
        "steps.scores.resources.num_gpus: the step needs 2 GPU",
    ),
}

GPU_SPEC = (
    TABULAR.lstrip()
    + "  scores:\n    kind: influence_scores\n    model: model\n    data: data\n    method: graddot\n"
    + "  removal:\n    kind: removal_check\n    model: model\n    data: data\n    scores: [scores]\n"
    + "  select:\n    kind: select_and_train\n    model: model\n    data: data\n    budgets: [10]\n"
    + "    scores: [scores]\n"
)


def _with_fields(text: str, step: str, fields: str) -> str:
    head, sep, tail = text.partition(f"  {step}:\n")
    return head + sep + fields + tail


@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_resources_the_cluster_lacks_stop_the_run_before_any_step(ray_session, tmp_path, tracking_uri, case):
    step, fields, message = GPU_CASES[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(_with_fields(GPU_SPEC, step, fields))
    with pytest.raises(SpecError) as info:
        pipelines.run(
            load_spec(spec), store=str(tmp_path / "store"), tracking_uri=tracking_uri, progress=False
        )
    (line,) = str(info.value).splitlines()
    assert line.startswith(str(spec)) and message in line and "the Ray cluster has" in line, line
    assert not list((tmp_path / "store" / "objects").glob("*"))  # no step ran


@pytest.mark.parametrize(
    ("kind", "step"),
    [("subset_effects", "effects"), ("removal_check", "removal"), ("gradient_features", "features")],
)
def test_device_cuda_without_gpus_is_refused_at_validation(tmp_path, kind, step):
    spec = tmp_path / "spec.yaml"
    spec.write_text(_with_fields(GPU_SPEC, step, "    device: cuda\n"))
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    (line,) = str(info.value).splitlines()
    assert f"steps.{step}: device cuda needs task_gpus > 0" in line, line


# ---------------------------------------------------------------- tables that need the data


def _parquet(path: Path, frame: pl.DataFrame) -> Path:
    frame.write_parquet(path)
    return path


def _lds_inputs(tmp_path: Path, loss: float, target_ids=(100, 101), example_ids=range(10)) -> dict[str, Path]:
    """Scores, eval subsets and effects as Parquet files (one loss replaced by `loss`)."""
    rng = np.random.default_rng(0)
    examples = list(example_ids)
    scores = pl.DataFrame(
        {
            "method": "m",
            "target_id": np.repeat(np.array(target_ids, dtype=np.int64), len(examples)),
            "example_id": np.tile(np.array(examples, dtype=np.int64), len(target_ids)),
            "score": rng.normal(size=len(examples) * len(target_ids)).astype(np.float32),
        }
    )
    subsets = pl.DataFrame(
        {
            "subset_id": np.repeat(np.arange(6, dtype=np.int32), 5),
            "example_id": np.concatenate([rng.choice(10, 5, replace=False) for _ in range(6)]).astype(
                np.int64
            ),
            "purpose": "eval",
        }
    )
    losses = rng.uniform(1, 2, size=12).astype(np.float32)
    losses[3] = loss
    effects = pl.DataFrame(
        {
            "subset_id": np.repeat(np.arange(6, dtype=np.int32), 2),
            "target_id": np.tile(np.array([100, 101], dtype=np.int64), 6),
            "loss": losses,
        }
    )
    return {
        "scores": _parquet(tmp_path / "scores.parquet", scores),
        "subsets": _parquet(tmp_path / "subsets.parquet", subsets),
        "effects": _parquet(tmp_path / "effects.parquet", effects),
    }


LDS_CASES = {
    "a NaN loss": ({"loss": float("nan")}, "effects: the loss of subset 1 on target 101 is nan (1 of 12"),
    "an infinite loss": ({"loss": float("inf")}, "effects: the loss of subset 1 on target 101 is inf"),
    "a -inf loss": ({"loss": float("-inf")}, "is -inf"),
    "scores of targets of another corpus": (
        {"loss": 1.0, "target_ids": (7, 8)},
        "scores of method 'm' share no target_id with the effects (e.g. 7 is not measured)",
    ),
    "scores of examples of another corpus": (
        {"loss": 1.0, "example_ids": range(1000, 1010)},
        "scores of method 'm' name no example_id of the subsets",
    ),
}


@pytest.mark.parametrize("case", sorted(LDS_CASES))
def test_lds_refuses_effects_and_scores_it_cannot_rank(tmp_path, case):
    from tda.evaluation.lds import lds

    options, message = LDS_CASES[case]
    paths = _lds_inputs(tmp_path, **options)
    with pytest.raises(DataError) as info:
        lds(*(pl.read_parquet(paths[name]) for name in ("scores", "subsets", "effects")))
    assert message in str(info.value) and "\n" not in str(info.value), info.value


READ_SPEC = """
version: 1
name: bad
steps:
  scores:
    kind: read
    path: {scores}
  subsets:
    kind: read
    path: {subsets}
  effects:
    kind: read
    path: {effects}
  lds:
    kind: evaluate_lds
    scores: [scores]
    subsets: subsets
    effects: effects
"""


def test_nan_effects_fail_evaluate_lds_in_one_line_and_commit_nothing(failed_error, tmp_path):
    paths = _lds_inputs(tmp_path, float("nan"))
    error = failed_error(READ_SPEC.format(**paths), "lds")
    assert error.startswith("DataError: effects: the loss of subset 1 on target 101 is nan"), error
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "store" / "objects").glob("*/manifest.json")]
    assert sorted(m["kind"] for m in manifests) == ["read", "read", "read"]  # evaluate_lds stored nothing


def test_nan_effects_fail_train_airrep_before_any_worker(failed_error, tmp_path):
    paths = _lds_inputs(tmp_path, float("nan"))
    corpus = pl.DataFrame(
        {
            "example_id": np.r_[np.arange(10), [100, 101]].astype(np.int64),
            "prompt": [f"p{i}" for i in range(12)],
            "response": [f"r{i}" for i in range(12)],
            "group": None,
            "split": ["train"] * 10 + ["target"] * 2,
        }
    )
    subsets = pl.read_parquet(paths["subsets"]).with_columns(pl.lit("fit").alias("purpose"))
    text = READ_SPEC.split("  lds:")[0].format(
        scores=_parquet(tmp_path / "corpus.parquet", corpus),
        subsets=_parquet(tmp_path / "fit.parquet", subsets),
        effects=paths["effects"],
    )
    text += (
        "  airrep:\n    kind: train_airrep\n    data: scores\n    subsets: subsets\n    effects: effects\n"
    )
    text += "    num_workers: 1\n    episodes_per_step: 1\n"
    error = failed_error(text, "airrep")
    assert error.startswith("DataError: effects 'effects': the loss of subset 1 on target 101 is nan"), error


def test_subsets_naming_examples_not_in_the_corpus_fail_subset_effects(failed_error, tmp_path):
    subsets = pl.DataFrame(
        {
            "subset_id": np.zeros(3, np.int32),
            "example_id": np.array([0, 1, 99_999], np.int64),
            "purpose": "eval",
        }
    )
    path = _parquet(tmp_path / "subsets.parquet", subsets)
    text = TABULAR.lstrip().split("  other_data:")[0]
    text += "  model:\n    kind: train_model\n    data: data\n"
    text += f"  subsets:\n    kind: read\n    path: {path}\n"
    text += "  effects:\n    kind: subset_effects\n    model: model\n    data: data\n    subsets: subsets\n"
    error = failed_error(text, "effects")
    assert "example_id 99999" in error and "is not in the training split" in error, error
    kinds = [
        json.loads(p.read_text())["kind"] for p in (tmp_path / "store" / "objects").glob("*/manifest.json")
    ]
    assert "subset_effects" not in kinds


def test_the_science_refuses_non_finite_effects_it_is_given():
    from tda.effects import check_finite_losses

    effects = pl.DataFrame({"subset_id": [0, 1], "target_id": [5, 5], "loss": [1.0, None]})
    with pytest.raises(DataError, match=r"^e: the loss of subset 1 on target 5 is None \(1 of 2 .*; fix it$"):
        check_finite_losses(effects, "e", "fix it")
    check_finite_losses(effects.head(1), "e", "fix it")  # finite: no error


# ---------------------------------------------------------------- end to end: the CLI


def test_the_cli_prints_one_line_exits_2_and_writes_nothing(gpt2, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(gpt2["gpt2"], folder)
    _truncate(folder / "model.safetensors")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nname: bad\nsteps:\n  lm:\n    kind: checkpoint\n    path: {folder}\n")
    store = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(spec), "--store", str(store), "--set", "seed=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{spec}:6:5: steps.lm.path: {folder}/model.safetensors: truncated"), lines
    assert not store.exists()
