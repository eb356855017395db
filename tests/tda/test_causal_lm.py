"""The causal-LM family and its tokenizer: tiny models, a few examples, one thread."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tda.errors import ModelError  # noqa: E402
from tda.models import FAMILIES, load_model, save_model  # noqa: E402
from tda.models.causal_lm import CausalLM  # noqa: E402
from tda.models.tokenizer import IGNORE_INDEX, encode_examples, load_tokenizer, train_tokenizer  # noqa: E402

torch.set_num_threads(1)

WORDS = ["the", "cat", "dog", "bird", "sat", "ran", "on", "a", "mat", "red", "blue", "green", "plus", "is"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def synthetic_examples(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Short prompts and responses: sums spelled out, and word lists copied back."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for i in range(count):
        if i % 2:
            a, b = rng.randrange(5), rng.randrange(5)
            prompts.append(f"what is {NUMBERS[a]} plus {NUMBERS[b]}")
            responses.append(NUMBERS[a + b])
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(3))
            prompts.append(f"repeat {words}")
            responses.append(words)
    return prompts, responses


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    prompts, responses = synthetic_examples(200)
    train_tokenizer([f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)], 300, folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder: Path):
    return load_tokenizer(tokenizer_folder)


@pytest.fixture(scope="module")
def data(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    prompts, responses = synthetic_examples(40, seed=1)
    return encode_examples(tokenizer, prompts, responses, max_len=32)


def tiny(tokenizer, **overrides) -> CausalLM:
    args = {"vocab_size": len(tokenizer), "pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id}
    args |= {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "epochs": 2, "batch_size": 8}
    return CausalLM(**(args | overrides))


@pytest.fixture(scope="module")
def family(tokenizer) -> CausalLM:
    return tiny(tokenizer, lr=3e-3)


class TestTokenizer:
    def test_round_trip_through_auto_tokenizer(self, tokenizer_folder: Path) -> None:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
        assert len(loaded) == 300
        assert loaded.convert_ids_to_tokens([0, 1]) == ["<|pad|>", "<|eos|>"]
        text = "what is two plus three\nfive ünïcode"
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text

    def test_training_is_deterministic(self, tmp_path: Path, tokenizer_folder: Path) -> None:
        prompts, responses = synthetic_examples(200)
        train_tokenizer([f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)], 300, tmp_path)
        assert (tmp_path / "tokenizer.json").read_bytes() == (
            tokenizer_folder / "tokenizer.json"
        ).read_bytes()

    def test_encode_masks_prompt_and_pads(self, tokenizer) -> None:
        X, y = encode_examples(tokenizer, ["what is one plus one", "a"], ["two", "the cat sat"], max_len=32)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        prompt = tokenizer("what is one plus one\n", add_special_tokens=False)["input_ids"]
        response = tokenizer("two", add_special_tokens=False)["input_ids"]
        end = len(prompt) + len(response) + 1
        assert X.dtype == y.dtype == torch.int64 and X.shape == y.shape
        assert X[0, :end].tolist() == prompt + response + [eos]
        assert (y[0, : len(prompt)] == IGNORE_INDEX).all()
        assert y[0, len(prompt) : end].tolist() == response + [eos]
        assert (X[0, end:] == pad).all() and (y[0, end:] == IGNORE_INDEX).all()
        assert tokenizer.decode(X[1][y[1] != IGNORE_INDEX]) == "the cat sat<|eos|>"

    def test_truncation_keeps_a_response_token(self, tokenizer) -> None:
        X, y = encode_examples(tokenizer, ["repeat " + "one two three " * 10], ["five"], max_len=6)
        assert X.shape == (1, 6)
        assert (y[0, :5] == IGNORE_INDEX).all() and y[0, 5] != IGNORE_INDEX

    def test_missing_folder_is_a_model_error(self, tmp_path: Path) -> None:
        with pytest.raises(ModelError, match="no such tokenizer folder"):
            load_tokenizer(tmp_path / "absent")


class TestLosses:
    def test_example_loss_equals_batched_losses(self, family: CausalLM, data) -> None:
        X, y = data
        theta = family.init_params(0)
        looped = torch.stack([family.example_loss(theta, X[i], y[i]) for i in range(6)])
        assert torch.allclose(family.losses(theta, X[:6], y[:6]), looped, atol=1e-5)
        assert torch.allclose(family.losses(theta, X, y)[:6], looped, atol=1e-5)

    def test_loss_is_the_mean_response_cross_entropy(self, family: CausalLM, data) -> None:
        X, y = data
        theta = family.init_params(0)
        logits = family.logits(theta, X[:1])[0, :-1]  # (L-1, V)
        expected = torch.nn.functional.cross_entropy(logits, y[0, 1:], ignore_index=IGNORE_INDEX)
        assert torch.allclose(family.example_loss(theta, X[0], y[0]), expected, atol=1e-6)

    def test_more_padding_does_not_change_a_loss(self, family: CausalLM, data) -> None:
        X, y = data
        theta = family.init_params(0)
        X_long = torch.cat([X[:3], torch.full((3, 20), family.pad_id)], dim=1)  # (3, L+20)
        y_long = torch.cat([y[:3], torch.full((3, 20), IGNORE_INDEX)], dim=1)
        short = torch.stack([family.example_loss(theta, X[i], y[i]) for i in range(3)])
        long = torch.stack([family.example_loss(theta, X_long[i], y_long[i]) for i in range(3)])
        assert torch.allclose(short, long, atol=1e-5)

    def test_too_long_examples_are_a_model_error(self, family: CausalLM) -> None:
        X = torch.zeros(2, 65, dtype=torch.int64)
        with pytest.raises(ModelError, match="larger n_positions"):
            family.losses(family.init_params(0), X, X)


class TestGradients:
    def test_vmap_grads_match_autograd_and_include_the_embedding(self, family: CausalLM, data) -> None:
        X, y = data
        theta = family.init_params(0)
        G = family.per_example_grads(theta, X[:5], y[:5], chunk_size=2)  # (5, d)
        assert G.shape == (5, family.n_params)
        leaf = theta.clone().requires_grad_(True)
        for i in range(5):
            (expected,) = torch.autograd.grad(family.example_loss(leaf, X[i], y[i]), leaf)
            assert torch.allclose(G[i], expected, atol=1e-5)
        name, shape = family.specs[0]
        assert name == "transformer.wte.weight" and "lm_head.weight" not in dict(family.specs)
        assert G[:, : shape.numel()].abs().sum(dim=1).min() > 0  # the tied embedding has a gradient

    def test_losses_stay_differentiable_under_torch_func(self, family: CausalLM, data) -> None:
        X, y = data
        theta = family.init_params(0)
        total = torch.func.grad(lambda t: family.losses(t, X[:4], y[:4]).sum())(theta)
        assert torch.allclose(total, family.per_example_grads(theta, X[:4], y[:4]).sum(0), atol=1e-5)


class TestFit:
    def test_fit_is_deterministic_and_lowers_the_loss(self, family: CausalLM, data) -> None:
        X, y = data
        first, second = family.fit(X, y, l2_sum=0.0), family.fit(X, y, l2_sum=0.0)
        assert torch.equal(first.theta, second.theta)
        assert first.iterations == 2 * 5 and first.theta.dtype == torch.float32 and first.converged
        before = family.losses(family.init_params(0), X, y).mean()
        assert family.losses(first.theta, X, y).mean() < before - 0.1

    def test_warm_start_continues_from_theta(self, family: CausalLM, data) -> None:
        X, y = data
        theta = family.fit(X, y, l2_sum=0.0).theta
        again = family.fit(X[:16], y[:16], l2_sum=1.0, init=theta.to(torch.float64))
        assert family.losses(again.theta, X[:16], y[:16]).mean() < family.losses(theta, X[:16], y[:16]).mean()
        assert (again.theta - theta).norm() < (theta - family.init_params(0)).norm()

    def test_time_a_small_fine_tune(self, tokenizer) -> None:
        prompts, responses = synthetic_examples(100, seed=2)
        X, y = encode_examples(tokenizer, prompts, responses, max_len=64)
        family = CausalLM(vocab_size=1000, pad_id=0, eos_id=1)  # the defaults: ≈0.54M parameters
        theta = family.init_params(0)
        start = time.perf_counter()
        fit = family.fit(X, y, l2_sum=0.0, init=theta)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        family.per_example_grads(theta, X[:16], y[:16])
        rate = 16 / (time.perf_counter() - start)
        print(
            f"\nfine-tune of d={family.n_params}, 100 examples (L={X.shape[1]}) x 2 epochs, batch 16: "
            f"{seconds:.2f} s for {fit.iterations} steps; per-example gradients: {rate:.0f}/s"
        )


class TestGenericCode:
    def test_subset_losses_and_graddot_run_unchanged(self, family: CausalLM, data) -> None:
        from tda.effects.retrain import subset_losses
        from tda.influence.scores import example_scores

        X, y = data
        theta = family.init_params(0)
        subsets = [torch.arange(0, 8), torch.arange(8, 16)]
        effects = subset_losses(family, theta, X[:16], y[:16], X[30:], y[30:], l2_sum=0.0, subsets=subsets)
        assert effects.shape == (2, 10) and torch.isfinite(effects).all()
        frame, _ = example_scores("graddot", family, theta, X[:6], y[:6], X[30:32], y[30:32], l2=0.0)
        G = family.per_example_grads(theta, X[:6], y[:6])
        expected = (family.per_example_grads(theta, X[30:31], y[30:31]) @ G.T)[0]  # (6,)
        scores = torch.tensor(frame.filter(frame["target_id"] == 0)["score"].to_list())
        assert frame.height == 12 and torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)


class TestSavingAndArchitectures:
    def test_save_load_round_trip(self, family: CausalLM, data, tmp_path: Path) -> None:
        X, y = data
        theta = family.fit(X[:8], y[:8], l2_sum=0.0).theta
        save_model(tmp_path, family, theta, {"note": "test"})
        loaded, theta_back, meta = load_model(tmp_path)
        assert isinstance(loaded, CausalLM) and meta == {"note": "test"}
        assert loaded.config() == {**family.config(), "pretrained": str(tmp_path)}  # loaded in place
        assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
        assert torch.equal(loaded.losses(theta_back, X, y), family.losses(theta, X, y))

    def test_save_pretrained_loads_as_pretrained(self, family: CausalLM, data, tmp_path: Path) -> None:
        X, y = data
        theta = family.fit(X[:8], y[:8], l2_sum=0.0).theta
        family.save_pretrained(theta, tmp_path)
        again = CausalLM(vocab_size=family.vocab_size, pad_id=0, eos_id=1, pretrained=str(tmp_path))
        assert torch.equal(again.init_params(5), theta)
        assert torch.allclose(again.losses(again.init_params(0), X, y), family.losses(theta, X, y), atol=1e-6)

    def test_llama_builds_fits_and_differentiates(self, tokenizer, data) -> None:
        X, y = data
        family = tiny(tokenizer, architecture="llama", epochs=1)
        theta = family.init_params(0)
        G = family.per_example_grads(theta, X[:2], y[:2])
        (expected,) = torch.autograd.grad(family.example_loss(theta.requires_grad_(True), X[1], y[1]), theta)
        assert torch.allclose(G[1], expected, atol=1e-5)
        fit = family.fit(X[:16], y[:16], l2_sum=0.0)
        assert torch.isfinite(family.losses(fit.theta, X, y)).all()

    def test_registered_and_seeded(self, tokenizer) -> None:
        assert FAMILIES["causal_lm"] is CausalLM
        family = tiny(tokenizer)
        assert not torch.equal(family.init_params(0), family.init_params(1))
        assert torch.equal(family.init_params(1), tiny(tokenizer, seed=1).init_params(1))

    def test_folder_without_a_causal_lm_is_a_model_error(
        self, tmp_path: Path, tokenizer_folder: Path
    ) -> None:
        from transformers import BertConfig, BertModel

        encoder = BertModel(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
        )
        encoder.save_pretrained(str(tmp_path / "bert"))
        for folder in (tmp_path / "bert", tokenizer_folder, tmp_path / "absent"):
            with pytest.raises(ModelError, match="not a causal LM"):
                CausalLM(vocab_size=50, pad_id=0, eos_id=1, pretrained=str(folder))

    def test_bad_arguments_are_model_errors(self, tokenizer) -> None:
        with pytest.raises(ModelError, match="architecture"):
            tiny(tokenizer, architecture="bert")
        with pytest.raises(ModelError, match="multiple of n_head"):
            tiny(tokenizer, n_embd=33)
