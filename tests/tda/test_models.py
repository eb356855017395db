"""Model families: closed forms and torch.func derivatives against autograd, training, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tda.data.tabular import load_tabular, tabular_tensors
from tda.errors import ModelError
from tda.models import (
    MLP,
    LeastSquares,
    LogisticRegression,
    ModelFamily,
    family_from_config,
    load_model,
    save_model,
)

N, D, C = 12, 4, 3

FAMILIES = {
    "logistic": lambda: LogisticRegression(D, C),
    "mlp_tanh": lambda: MLP(D, C, hidden=[5, 3]),
    "mlp_gelu": lambda: MLP(D, C, hidden=[4], activation="gelu"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small problems run faster on one thread, and much faster on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> ModelFamily:
    return FAMILIES[request.param]()


@pytest.fixture
def toy() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=generator, dtype=torch.float64)  # (n, D)
    y = torch.randint(0, C, (N,), generator=generator)  # (n,)
    return X, y


def random_theta(family: ModelFamily, seed: int = 1) -> Tensor:
    d = family.init_params(0).numel()
    return 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def autograd_hessian(family: ModelFamily, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return torch.autograd.functional.hessian(lambda t: family.losses(t, X, y).sum(), theta)  # (d, d)


@pytest.fixture(scope="module")
def digits500() -> tuple[Tensor, Tensor]:
    _, X, y = tabular_tensors(load_tabular("sklearn:digits"))
    return X[:500], y[:500]


class TestDerivatives:
    def test_per_example_grads_match_autograd_loop(self, family, toy):
        X, y = toy
        theta = random_theta(family)
        expected = []
        for i in range(N):
            t = theta.clone().requires_grad_(True)
            expected.append(torch.autograd.grad(family.example_loss(t, X[i], y[i]), t)[0])
        got = family.per_example_grads(theta, X, y)  # (n, d)
        torch.testing.assert_close(got, torch.stack(expected), atol=1e-10, rtol=0)

    def test_losses_match_example_loss(self, family, toy):
        X, y = toy
        theta = random_theta(family)
        expected = torch.stack([family.example_loss(theta, X[i], y[i]) for i in range(N)])
        torch.testing.assert_close(family.losses(theta, X, y), expected, atol=1e-12, rtol=0)

    def test_hessian_matches_autograd(self, family, toy):
        X, y = toy
        theta = random_theta(family)
        torch.testing.assert_close(
            family.hessian(theta, X, y), autograd_hessian(family, theta, X, y), atol=1e-10, rtol=0
        )

    def test_logistic_hessian_is_the_same_in_small_row_chunks(self, toy, monkeypatch):
        X, y = toy
        family = LogisticRegression(D, C)
        theta = random_theta(family)
        whole = family.hessian(theta, X, y)
        monkeypatch.setattr("tda.models.logistic.HESSIAN_CHUNK_ELEMENTS", 3 * (D + 1) ** 2)  # 3 rows a chunk
        torch.testing.assert_close(family.hessian(theta, X, y), whole, atol=1e-12, rtol=0)

    @pytest.mark.parametrize("k", [None, 1, 3])
    def test_hvp_matches_hessian(self, family, toy, k):
        X, y = toy
        theta = random_theta(family)
        d = theta.numel()
        shape = (d,) if k is None else (d, k)
        V = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        got = family.hvp(theta, X, y, V)
        assert got.shape == V.shape
        torch.testing.assert_close(got, family.hessian(theta, X, y) @ V, atol=1e-10, rtol=0)
        torch.testing.assert_close(got, autograd_hessian(family, theta, X, y) @ V, atol=1e-10, rtol=0)

    def test_group_hvps_match_a_loop_over_groups(self, family, toy):
        X, y = toy
        theta = random_theta(family)
        groups = [
            torch.tensor([0, 1, 2]),
            torch.tensor([5]),
            torch.tensor([3, 7, 9, 11]),
            torch.tensor([0, 3]),
        ]
        V = torch.randn(
            len(groups), theta.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
        expected = torch.stack([family.hvp(theta, X[idx], y[idx], V[g]) for g, idx in enumerate(groups)])
        torch.testing.assert_close(family.group_hvps(theta, X, y, groups, V), expected, atol=1e-10, rtol=0)

    def test_logistic_per_example_grads_sum_to_the_objective_gradient(self, toy):
        X, y = toy
        family = LogisticRegression(D, C)
        theta = random_theta(family).requires_grad_(True)
        (expected,) = torch.autograd.grad(family.objective(theta, X, y, 2.0), theta)
        got = family.per_example_grads(theta.detach(), X, y).sum(0) + 2.0 * theta.detach()
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)

    def test_predict_proba_rows_sum_to_one(self, family, toy):
        X, _ = toy
        P = family.predict_proba(random_theta(family), X)  # (n, C)
        assert P.shape == (N, C)
        torch.testing.assert_close(P.sum(1), torch.ones(N, dtype=torch.float64))


class TestLogisticFit:
    def test_reaches_the_gradient_norm_on_digits(self, digits500):
        X, y = digits500
        family = LogisticRegression(64, 10)
        result = family.fit(X, y, l2_sum=500 * 1e-2)
        assert result.converged
        assert result.grad_norm <= 1e-6
        gradient = family.per_example_grads(result.theta, X, y).sum(0) + 5.0 * result.theta
        assert float(gradient.norm()) <= 1e-6

    def test_warm_start_from_the_optimum_stays_there(self, digits500):
        X, y = digits500
        family = LogisticRegression(64, 10)
        first = family.fit(X, y, l2_sum=5.0)
        again = family.fit(X, y, l2_sum=5.0, init=first.theta)
        assert again.iterations <= 3
        torch.testing.assert_close(again.theta, first.theta, atol=1e-8, rtol=0)

    def test_warm_and_cold_starts_agree_after_removing_rows(self, digits500):
        X, y = digits500
        family = LogisticRegression(64, 10)
        full = family.fit(X, y, l2_sum=5.0)
        keep = torch.arange(25, 500)
        warm = family.fit(X[keep], y[keep], l2_sum=5.0, init=full.theta)
        cold = family.fit(X[keep], y[keep], l2_sum=5.0)
        assert warm.converged and cold.converged
        torch.testing.assert_close(warm.theta, cold.theta, atol=1e-8, rtol=0)

    def test_rejects_examples_of_the_wrong_shape(self, toy):
        X, y = toy
        with pytest.raises(ModelError, match="n_features=4"):
            LogisticRegression(5, C).fit(X, y, 1.0)
        with pytest.raises(ModelError, match="n_classes=3"):
            LogisticRegression(D, 2).fit(X, y, 1.0)


class TestMLPFit:
    def test_decreases_the_objective_and_converges(self, toy):
        X, y = toy
        family = MLP(D, C, hidden=[6], seed=1)
        start = family.init_params(1)
        result = family.fit(X, y, l2_sum=0.5)
        assert result.converged
        assert result.grad_norm <= 1e-5
        assert family.objective(result.theta, X, y, 0.5) < family.objective(start, X, y, 0.5)

    def test_init_params_is_deterministic(self):
        family = MLP(D, C, hidden=[5, 3])
        torch.testing.assert_close(family.init_params(7), family.init_params(7))
        assert not torch.equal(family.init_params(7), family.init_params(8))
        assert family.init_params(0).numel() == family.n_params == 5 * 4 + 5 + 3 * 5 + 3 + 3 * 3 + 3

    def test_rejects_an_unknown_activation(self):
        with pytest.raises(ModelError, match="activation 'relu' is unknown"):
            MLP(D, C, activation="relu")


class TestSaveLoad:
    @pytest.mark.parametrize(
        "make",
        [
            lambda: LeastSquares(4),
            lambda: LogisticRegression(D, C, tol=1e-9),
            lambda: MLP(D, C, [3, 2], "gelu"),
        ],
    )
    def test_round_trip(self, tmp_path, make):
        family = make()
        theta = random_theta(family)
        save_model(tmp_path / "model", family, theta, {"n_train": 12, "l2": 0.1})
        loaded, loaded_theta, meta = load_model(tmp_path / "model")
        assert type(loaded) is type(family)
        assert loaded.config() == family.config()
        assert torch.equal(loaded_theta, theta)
        assert meta == {"n_train": 12, "l2": 0.1}

    def test_family_from_config_rebuilds_each_family(self):
        for family in (LeastSquares(3), LogisticRegression(D, C), MLP(D, C)):
            assert family_from_config(family.config()).config() == family.config()


class TestLoadErrors:
    @pytest.fixture
    def saved(self, tmp_path) -> Path:
        family = LogisticRegression(D, C)
        save_model(tmp_path / "model", family, random_theta(family), {})
        return tmp_path / "model"

    def test_missing_folder(self, tmp_path):
        with pytest.raises(ModelError, match="no such model folder"):
            load_model(tmp_path / "nowhere")

    @pytest.mark.parametrize("name", ["config.json", "params.safetensors"])
    def test_missing_file(self, saved, name):
        (saved / name).unlink()
        with pytest.raises(ModelError, match=rf"{name}: missing"):
            load_model(saved)

    def test_unknown_family(self, saved):
        (saved / "config.json").write_text(json.dumps({"family": {"family": "x"}, "meta": {}}))
        with pytest.raises(
            ModelError,
            match=r"config\.json: family 'x' is unknown; known: .*least_squares, logistic_regression, mlp",
        ):
            load_model(saved)

    def test_missing_config_field(self, saved):
        (saved / "config.json").write_text(json.dumps({"family": {"family": "logistic_regression"}}))
        with pytest.raises(ModelError, match="config lacks field 'n_features'"):
            load_model(saved)

    def test_wrong_theta_length(self, saved):
        config = json.loads((saved / "config.json").read_text())
        config["family"]["n_features"] = D + 1
        (saved / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelError, match=r"theta has shape \(15,\) but family 'logistic_regression'"):
            load_model(saved)

    def test_unreadable_files(self, saved):
        (saved / "params.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(ModelError, match="unreadable safetensors file"):
            load_model(saved)
        (saved / "config.json").write_text("{not json")
        with pytest.raises(ModelError, match="unreadable JSON"):
            load_model(saved)

    def test_errors_are_value_errors_of_one_line(self, tmp_path):
        with pytest.raises(ValueError) as info:
            load_model(tmp_path / "nowhere")
        assert "\n" not in str(info.value)
