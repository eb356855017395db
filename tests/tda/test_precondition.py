"""Preconditioners of gradient features against their definitions: identity features with the identity
preconditioner are GradDot; full-rank (identity) features with the Fisher preconditioner are the
Gauss–Newton influence of a small family; K-FAC and EK-FAC equal their explicit Kronecker forms."""

from __future__ import annotations

import pytest
import torch

from tda.errors import InfluenceError
from tda.influence import example_scores
from tda.influence.features import Projection, featurize
from tda.influence.precondition import Layout, fit_preconditioner, self_influence
from tda.models import LogisticRegression


@pytest.fixture(scope="module")
def small():
    """A fitted logistic regression on random data: (family, θ, train X, y, target X, y)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * torch.randn(60, generator=g, dtype=torch.float64) > 0).long()
    family = LogisticRegression(5, 2)
    theta = family.fit(X[:50], y[:50], l2_sum=0.5).theta
    return family, theta, X[:50], y[:50], X[50:], y[50:]


def _chunks(phi: torch.Tensor, size: int = 7):
    return lambda: (phi[i : i + size] for i in range(0, len(phi), size))


def test_identity_features_with_the_identity_preconditioner_are_graddot(small):
    family, theta, X, y, Xt, yt = small
    phi = featurize(family, theta, X, y, Projection("identity"))
    phi_t = featurize(family, theta, Xt, yt, Projection("identity"))
    P = fit_preconditioner("identity", Layout.single(phi.shape[1]), _chunks(phi), n=len(phi))
    scores = P.apply(phi_t) @ phi.T  # (m, n)
    frame, _ = example_scores("graddot", family, theta, X, y, Xt, yt, l2=0.0)
    expected = torch.tensor(frame.sort("target_id", "example_id")["score"].to_numpy()).reshape(10, 50)
    assert torch.allclose(scores.double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_full_rank_features_with_the_fisher_preconditioner_are_the_gauss_newton_influence(small):
    family, theta, X, y, Xt, yt = small
    G, T = family.per_example_grads(theta, X, y), family.per_example_grads(theta, Xt, yt)  # (n, d), (m, d)
    phi = featurize(family, theta, X, y, Projection("identity"))
    P = fit_preconditioner("fisher", Layout.single(phi.shape[1]), _chunks(phi), n=50, damping=0.01)
    F = G.T @ G / 50
    lam = 0.01 * float(torch.diagonal(F).mean())
    expected = T @ torch.linalg.solve(F + lam * torch.eye(len(F), dtype=F.dtype), G.T) / 50  # (m, n)
    got = P.apply(T.float()).double() @ G.T
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    si = self_influence(P, phi.float())
    assert torch.allclose(
        si.double(),
        torch.einsum("nd,dn->n", G, torch.linalg.solve(F + lam * torch.eye(len(F), dtype=F.dtype), G.T)) / 50,
        rtol=1e-4,
    )


def _kron_case(seed: int = 0):
    """One layer of features V_z (k_out=3, k_in=4) and Kronecker factor sums A (4×4), S (3×3)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(20, 3, 4, generator=g, dtype=torch.float64)
    a, s = (
        torch.randn(9, 4, generator=g, dtype=torch.float64),
        torch.randn(7, 3, generator=g, dtype=torch.float64),
    )
    return V, {"l": a.T @ a}, {"l": s.T @ s}, 9


def test_kfac_equals_the_explicit_kronecker_inverse():
    V, A, S, tokens = _kron_case()
    layout = Layout((("l", 3, 4),))
    phi = V.reshape(20, -1).float()
    P = fit_preconditioner("kfac", layout, _chunks(phi), n=20, damping=0.05, factors=(A, S, tokens))
    A_bar, S_bar = A["l"] / tokens, S["l"] / 20
    kron = torch.kron(S_bar, A_bar)  # row-major vec of (k_out, k_in): S ⊗ A
    eig = torch.linalg.eigvalsh(S_bar)[:, None] * torch.linalg.eigvalsh(A_bar)[None, :]
    lam = 0.05 * float(eig.mean()) + 1e-12
    expected = torch.linalg.solve(kron + lam * torch.eye(12, dtype=kron.dtype), phi.double().T).T / 20
    assert torch.allclose(P.apply(phi).double(), expected, rtol=1e-4, atol=1e-7)


def test_ekfac_uses_the_corrected_eigenvalues_in_the_kfac_eigenbasis():
    V, A, S, tokens = _kron_case(1)
    phi = V.reshape(20, -1).float()
    P = fit_preconditioner(
        "ekfac", Layout((("l", 3, 4),)), _chunks(phi, 6), n=20, damping=0.1, factors=(A, S, tokens)
    )
    _, q_a = torch.linalg.eigh(A["l"] / tokens)
    _, q_s = torch.linalg.eigh(S["l"] / 20)
    Q = torch.kron(q_s, q_a)  # eigenbasis of S ⊗ A, row-major vec
    lam = ((q_s.T @ V @ q_a) ** 2).mean(0).reshape(-1)  # Λ
    diag = lam + 0.1 * float(lam.mean()) + 1e-12
    expected = (Q @ torch.diag(1 / diag) @ Q.T @ phi.double().T).T / 20
    assert torch.allclose(P.apply(phi).double(), expected, rtol=1e-4, atol=1e-7)


def test_kronecker_preconditioners_need_logra_features():
    with pytest.raises(InfluenceError, match="ekfac needs LoGra features"):
        fit_preconditioner("ekfac", Layout.single(5), _chunks(torch.zeros(3, 5)), n=3)
    with pytest.raises(InfluenceError, match="preconditioner 'newton' is unknown"):
        fit_preconditioner("newton", Layout.single(5), _chunks(torch.zeros(3, 5)), n=3)


def test_feature_group_influence_follows_its_formulas():
    from tda.influence.group import feature_group_influence

    g = torch.Generator().manual_seed(2)
    Phi, T = (
        torch.randn(40, 6, generator=g, dtype=torch.float64),
        torch.randn(3, 6, generator=g, dtype=torch.float64),
    )
    groups = [torch.arange(0, 4), torch.arange(10, 30)]
    out = feature_group_influence(Phi, T, groups, relative_damping=0.2)
    F = Phi.T @ Phi / 40
    A = F + 0.2 * float(torch.diagonal(F).mean()) * torch.eye(6, dtype=F.dtype)
    for j, idx in enumerate(groups):
        g_u, H_u, p = Phi[idx].sum(0), Phi[idx].T @ Phi[idx], len(idx) / 40
        first = T @ torch.linalg.solve(A, g_u) / 40
        second = (1 - 2 * p) / (1 - p) ** 2 * first + T @ torch.linalg.solve(
            A, H_u @ torch.linalg.solve(A, g_u)
        ) / ((1 - p) ** 2 * 1600)
        newton = T @ torch.linalg.solve(40 * A - H_u, g_u)
        assert torch.allclose(out["if-order1"][:, j], first)
        assert torch.allclose(out["if-order2"][:, j], second)
        assert torch.allclose(out["newton"][:, j], newton)
    # second order tracks Newton more closely than first order for the large group
    gap = lambda key: float((out[key][:, 1] - out["newton"][:, 1]).abs().max())  # noqa: E731
    assert gap("if-order2") < gap("if-order1")
