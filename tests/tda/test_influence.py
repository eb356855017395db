"""Influence: the solvers against a dense inverse, group influence against its formulas and against
retraining, and per-example scores against a direct dense computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from tda.errors import InfluenceError
from tda.influence import (
    HessianOperator,
    InverseHVP,
    SolverOptions,
    cholesky_factor,
    example_scores,
    group_influence,
    lissa,
    parameter_changes,
    power_iteration,
    solve,
)
from tda.models.least_squares import LeastSquares


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls in deep loops: one thread avoids OpenMP hand-offs that crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FastLeastSquares(LeastSquares):
    """Least squares with closed-form gradients and HVPs, so deep LiSSA runs stay fast."""

    def per_example_grads(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return (X @ theta - y)[:, None] * X  # (n, d)

    def hvp(self, theta: Tensor, X: Tensor, y: Tensor, V: Tensor) -> Tensor:
        return X.T @ (X @ V)

    def hessian(self, theta: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return X.T @ X


class Logistic(LeastSquares):
    """Binary logistic regression through the generic torch.func paths: a non-quadratic family."""

    name = "test_logistic"

    def example_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ theta, y)


def regression(n: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(d, generator=gen, dtype=torch.float64) + torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    return X, y


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- solvers ----------------------------------------------------------------------------------------
@pytest.fixture
def well_conditioned() -> tuple[HessianOperator, Tensor]:
    X, y = regression(200, 10)
    family = FastLeastSquares(10)
    theta = family.fit(X, y, l2_sum=200 * 0.5).theta
    op = HessianOperator(family, theta, X, y, l2_sum=200 * 0.5)
    B = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return op, B


class TestSolvers:
    def test_exact_solves_the_dense_system(self, well_conditioned):
        op, B = well_conditioned
        X, info = solve(op, B, SolverOptions("exact"))
        assert torch.allclose(X, torch.linalg.solve(op.dense(), B), rtol=1e-12, atol=1e-14)
        assert set(info) >= {"solver", "iterations", "residual", "seconds"}

    def test_cg_and_lissa_match_exact(self, well_conditioned):
        op, B = well_conditioned
        exact = solve(op, B, SolverOptions("exact"))[0]
        X_cg, info_cg = solve(op, B, SolverOptions("cg"))
        X_lissa, info_lissa = solve(op, B, SolverOptions("lissa", depth=200))
        assert relative(X_cg, exact) < 1e-3 and info_cg["residual"] <= 1e-9
        assert relative(X_lissa, exact) < 1e-3 and info_lissa["iterations"] == 200

    def test_minibatch_lissa(self, well_conditioned):
        op, B = well_conditioned
        exact = solve(op, B, SolverOptions("exact"))[0]
        full = solve(op, B, SolverOptions("lissa", depth=100))[0]
        # a minibatch of all 200 rows is a permutation of every row
        all_rows = solve(op, B, SolverOptions("lissa", depth=100, batch_size=200))[0]
        assert relative(all_rows, full) < 1e-10
        noisy, info = solve(op, B, SolverOptions("lissa", depth=100, batch_size=100, repeats=4, seed=3))
        assert relative(noisy, exact) < 0.1 and info["iterations"] == 400

    def test_exact_factorises_once(self, well_conditioned):
        op, B = well_conditioned
        inverse = InverseHVP(op, SolverOptions("exact"))
        inverse(B)
        factor = inverse.factor
        X, _ = inverse(B[:, 0])
        assert inverse.factor is factor and X.shape == (10,)

    def test_power_iteration_finds_the_largest_eigenvalue(self, well_conditioned):
        op, _ = well_conditioned
        assert power_iteration(op, 200) == pytest.approx(
            float(torch.linalg.eigvalsh(op.dense())[-1]), rel=1e-6
        )

    def test_cg_warns_when_it_runs_out_of_iterations(self, well_conditioned):
        op, B = well_conditioned
        with pytest.warns(RuntimeWarning, match="raise max_iter"):
            solve(op, B, SolverOptions("cg", max_iter=1))


class TestInvalidSolves:
    def test_singular_hessian_needs_damping(self):
        X, y = regression(5, 8)  # fewer rows than parameters and no ridge: Σ xxᵀ is singular
        op = HessianOperator(LeastSquares(8), torch.zeros(8, dtype=torch.float64), X, y, l2_sum=0.0)
        B = torch.randn(8, 2, dtype=torch.float64)
        with pytest.raises(
            InfluenceError, match=r"smallest eigenvalue .*set damping > 0 \(e.g. 1e-3\) or l2 > 0"
        ):
            solve(op, B, SolverOptions("exact"))
        damped = HessianOperator(
            LeastSquares(8), torch.zeros(8, dtype=torch.float64), X, y, 0.0, damping=1e-3
        )
        solution, _ = solve(damped, B, SolverOptions("exact"))
        assert relative(damped.matvec(solution), B) < 1e-8

    def test_nearly_singular_matrix_that_cholesky_accepts(self):
        A = torch.diag(torch.tensor([1.0, 1e-13, 2.0], dtype=torch.float64))
        with pytest.raises(InfluenceError, match="smallest eigenvalue 1e-13, largest 2"):
            cholesky_factor(A)

    def test_singular_newton_system_names_the_group(self):
        X, y = regression(6, 4)  # full data spans the parameters, the rows left after group 1 do not
        groups = [torch.tensor([0]), torch.arange(4)]
        with pytest.raises(InfluenceError, match="Newton system of group 1: the Hessian is singular"):
            parameter_changes(LeastSquares(4), torch.zeros(4, dtype=torch.float64), X, y, groups, l2=0.0)

    def test_unknown_solver_and_option(self, well_conditioned):
        op, B = well_conditioned
        with pytest.raises(InfluenceError, match="unknown solver 'newton'; choose one of exact, cg, lissa"):
            SolverOptions("newton")
        with pytest.raises(InfluenceError, match="solver 'cg' takes no option depth"):
            SolverOptions("cg", depth=3)
        with pytest.raises(InfluenceError, match="lissa needs depth >= 1"):
            SolverOptions("lissa", depth=0)

    def test_negative_damping(self, well_conditioned):
        op, _ = well_conditioned
        with pytest.raises(InfluenceError, match="damping must be >= 0"):
            HessianOperator(op.family, op.theta, op.X, op.y, 1.0, damping=-1.0)
        with pytest.raises(InfluenceError, match="damping must be >= 0"):
            SolverOptions(damping=-1.0)


class TestLissaMemory:
    def test_no_graph_is_built(self):
        X, y = regression(30, 4)
        theta = LeastSquares(4).fit(X, y, 3.0).theta.requires_grad_(True)
        op = HessianOperator(LeastSquares(4), theta, X, y, l2_sum=3.0)
        seen: list[bool] = []
        plain = op.matvec

        def recording(V: Tensor, rows: Tensor | None = None) -> Tensor:
            seen.append(torch.is_grad_enabled() or V.requires_grad)
            return plain(V, rows)

        op.matvec = recording  # type: ignore[method-assign]
        B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        X_full, _ = lissa(op, B, depth=10)
        X_mini, _ = lissa(op, B, depth=10, batch_size=10, repeats=2)
        assert seen and not any(seen)
        assert not X_full.requires_grad and not X_mini.requires_grad

    @pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for the resident size")
    def test_resident_memory_stays_flat(self):
        """A matvec that would keep a (d, 2) copy per step (3.2 MB) alive if a graph were built: ~380 MB
        over 100 steps with grad enabled, a few MB of allocator noise without."""
        d = 200_000
        diagonal = torch.linspace(1.0, 2.0, d, dtype=torch.float64).requires_grad_(True)
        rss: list[int] = []

        class GraphKeeping:  # applies no no_grad of its own, unlike FunctionOperator
            dim, dtype = d, torch.float64

            def matvec(self, V: Tensor) -> Tensor:
                rss.append(int(Path("/proc/self/statm").read_text().split()[1]) * 4096)
                return diagonal[:, None] * V.clone()

        B = torch.ones(d, 2, dtype=torch.float64, requires_grad=True)
        X, _ = lissa(GraphKeeping(), B, depth=100, scale=2.1)
        assert max(rss[5:]) - min(rss[5:]) < 64 * 2**20
        assert not X.requires_grad
        assert torch.allclose(X, (1.0 / diagonal.detach())[:, None].expand(d, 2), rtol=1e-3)


# --- group influence --------------------------------------------------------------------------------
class TestGroupInfluence:
    def test_second_order_equals_newton_when_the_group_hessian_is_proportional(self):
        """k copies of a block (own labels each), l2 = 0, groups made of whole copies: H_U = p·n·H̄."""
        k, block, d = 4, 8, 3
        gen = torch.Generator().manual_seed(5)
        B = torch.randn(block, d, generator=gen, dtype=torch.float64)
        X, y = B.repeat(k, 1), torch.randn(k * block, generator=gen, dtype=torch.float64)
        family = LeastSquares(d)
        theta = family.fit(X, y, 0.0).theta
        groups = [torch.arange(block), torch.arange(block, 3 * block)]  # one copy, two copies
        changes = parameter_changes(family, theta, X, y, groups, l2=0.0)
        assert torch.allclose(changes["if-order2"], changes["newton"], rtol=0, atol=1e-10)
        assert not torch.allclose(changes["if-order1"], changes["newton"], atol=1e-3)
        effects = group_influence(family, theta, X, y, X[:5], y[:5], groups, l2=0.0)
        assert torch.allclose(effects["if-order2"], effects["newton"], rtol=0, atol=1e-10)

    def test_newton_equals_retraining_for_least_squares(self):
        X, y = regression(40, 5, seed=2)
        l2, family = 0.05, LeastSquares(5)
        theta = family.fit(X, y, 40 * l2).theta
        groups = [torch.arange(0, 6), torch.tensor([7, 11, 30]), torch.arange(20, 40)]
        X_t, y_t = regression(3, 5, seed=9)
        changes = parameter_changes(family, theta, X, y, groups, l2, orders=())
        effects = group_influence(family, theta, X, y, X_t, y_t, groups, l2, orders=())
        T = family.per_example_grads(theta, X_t, y_t)  # (3, d)
        for g, idx in enumerate(groups):
            keep = torch.ones(40, dtype=torch.bool)
            keep[idx] = False
            retrained = family.fit(X[keep], y[keep], 40 * l2).theta  # same λ_sum = n_full · l2
            assert torch.allclose(changes["newton"][g], retrained - theta, rtol=0, atol=1e-8)
            assert torch.allclose(effects["newton"][:, g], T @ (retrained - theta), rtol=0, atol=1e-8)

    @pytest.mark.parametrize("n_targets", [1, 6])  # fewer targets than groups, or more: both paths
    def test_matches_the_formulas_on_a_nonquadratic_model(self, n_targets):
        gen = torch.Generator().manual_seed(3)
        X = torch.randn(50, 4, generator=gen, dtype=torch.float64)
        y = (torch.rand(50, generator=gen) < 0.5).to(torch.float64)
        family, l2, n = Logistic(4), 0.02, 50
        theta = torch.randn(4, generator=gen, dtype=torch.float64)  # any θ: the formulas are algebra
        groups = [torch.arange(0, 10), torch.tensor([3, 17, 41, 42])]
        H_bar = (family.hessian(theta, X, y) + n * l2 * torch.eye(4, dtype=torch.float64)) / n
        T = family.per_example_grads(theta, X[:n_targets], y[:n_targets])
        got = group_influence(family, theta, X, y, X[:n_targets], y[:n_targets], groups, l2)
        changes = parameter_changes(family, theta, X, y, groups, l2)
        for g, idx in enumerate(groups):
            p = len(idx) / n
            g_U = family.per_example_grads(theta, X[idx], y[idx]).sum(0)
            H_U = family.hessian(theta, X[idx], y[idx])
            first = torch.linalg.solve(H_bar, g_U) / n
            second = (1 - 2 * p) / (1 - p) ** 2 * first + 1 / (1 - p) ** 2 / n**2 * torch.linalg.solve(
                H_bar, H_U @ torch.linalg.solve(H_bar, g_U)
            )
            newton = torch.linalg.solve(n * H_bar - H_U, g_U)
            for key, want in (("if-order1", first), ("if-order2", second), ("newton", newton)):
                assert torch.allclose(changes[key][g], want, rtol=1e-10, atol=1e-13), key
                assert torch.allclose(got[key][:, g], T @ want, rtol=1e-10, atol=1e-13), key

    def test_iterative_solvers_agree_with_exact(self):
        X, y = regression(60, 6, seed=4)
        family, l2 = FastLeastSquares(6), 0.1
        theta = family.fit(X, y, 60 * l2).theta
        groups = [torch.arange(0, 12), torch.arange(30, 33)]
        exact = group_influence(family, theta, X, y, X[:4], y[:4], groups, l2)
        by_cg = group_influence(
            family, theta, X, y, X[:4], y[:4], groups, l2, newton_dense_max_d=0, options=SolverOptions("cg")
        )
        by_lissa = group_influence(
            family, theta, X, y, X[:4], y[:4], groups, l2, options=SolverOptions("lissa", depth=300)
        )
        for key in exact:
            assert relative(by_cg[key], exact[key]) < 1e-8, key
            assert relative(by_lissa[key], exact[key]) < 1e-3, key

    def test_newton_by_block_cg_matches_dense(self):
        """Groups of different sizes converge at different CG iterations; each column keeps its H_U."""
        X, y = regression(80, 30, seed=8)
        family, l2 = FastLeastSquares(30), 0.02
        theta = family.fit(X, y, 80 * l2).theta
        groups = [torch.arange(0, 2), torch.arange(10, 40), torch.tensor([5, 50, 70])]
        dense = parameter_changes(family, theta, X, y, groups, l2, orders=())["newton"]
        by_cg = parameter_changes(family, theta, X, y, groups, l2, orders=(), newton_dense_max_d=0)["newton"]
        assert relative(by_cg, dense) < 1e-8

    def test_info_reports_timings(self):
        X, y = regression(20, 3)
        info: dict = {}
        group_influence(FastLeastSquares(3), torch.zeros(3, dtype=torch.float64), X, y, X[:2], y[:2],
                        [torch.arange(4)], 0.1, info=info)  # fmt: skip
        assert {"seconds_grads", "seconds_group_hvps", "seconds_newton"} <= set(info)
        assert info["solver"]["solver"] == "exact"


class TestInvalidGroups:
    @pytest.mark.parametrize(
        ("groups", "message"),
        [
            ([torch.tensor([], dtype=torch.long)], "group 0 is empty"),
            ([torch.arange(3), torch.tensor([2, 99])], r"group 1 has row indices outside \[0, 10\)"),
            ([torch.tensor([1, 1])], "group 0 repeats a training row"),
            ([torch.arange(10)], "group 0 holds all 10 training rows"),
            ([], "no groups given"),
        ],
    )
    def test_bad_groups(self, groups, message):
        X, y = regression(10, 3)
        with pytest.raises(InfluenceError, match=message):
            group_influence(LeastSquares(3), torch.zeros(3, dtype=torch.float64), X, y, X, y, groups, 0.1)

    def test_nothing_requested(self):
        X, y = regression(10, 3)
        with pytest.raises(InfluenceError, match="nothing to compute"):
            parameter_changes(LeastSquares(3), torch.zeros(3, dtype=torch.float64), X, y, [torch.arange(2)],
                              0.1, orders=(), newton=False)  # fmt: skip


# --- per-example scores -----------------------------------------------------------------------------
@pytest.fixture
def scoring() -> dict:
    X, y = regression(40, 5, seed=6)
    X_t, y_t = regression(7, 5, seed=7)
    family, l2 = FastLeastSquares(5), 0.1
    theta = family.fit(X, y, 40 * l2).theta
    return {
        "family": family,
        "theta": theta,
        "X_train": X,
        "y_train": y,
        "X_target": X_t,
        "y_target": y_t,
        "l2": l2,
    }


def score_matrix(frame) -> np.ndarray:
    """The (targets, examples) matrix of an all-pairs scores frame."""
    frame = frame.sort("target_id", "example_id")
    n_targets = frame["target_id"].n_unique()
    return frame["score"].to_numpy().reshape(n_targets, -1)


class TestExampleScores:
    def test_exact_influence_equals_a_dense_computation(self, scoring):
        frame, info = example_scores("if-exact", **scoring)
        s = scoring
        G = s["family"].per_example_grads(s["theta"], s["X_train"], s["y_train"])
        T = s["family"].per_example_grads(s["theta"], s["X_target"], s["y_target"])
        H_bar = (s["X_train"].T @ s["X_train"] + 40 * s["l2"] * torch.eye(5, dtype=torch.float64)) / 40
        want = (T @ torch.linalg.solve(H_bar, G.T) / 40).numpy()  # (7, 40)
        assert frame.height == 7 * 40 and frame.columns == ["method", "target_id", "example_id", "score"]
        assert np.allclose(score_matrix(frame), want, rtol=1e-5, atol=1e-7)
        assert info["seconds"] >= info["seconds_grads"] >= 0

    def test_iterative_methods_agree_with_exact(self, scoring):
        exact = score_matrix(example_scores("if-exact", **scoring)[0])
        by_cg = score_matrix(example_scores("if-cg", **scoring)[0])
        lissa = SolverOptions("lissa", depth=300)
        by_lissa = score_matrix(example_scores("if-lissa", options=lissa, **scoring)[0])
        assert np.allclose(by_cg, exact, rtol=1e-5, atol=1e-7)
        assert np.linalg.norm(by_lissa - exact) / np.linalg.norm(exact) < 1e-3

    def test_top_k_keeps_the_highest_scores_per_target(self, scoring):
        full = score_matrix(example_scores("graddot", **scoring)[0])
        top, _ = example_scores("graddot", top_k=3, **scoring)
        assert top.height == 7 * 3
        for t, rows in top.group_by("target_id"):
            want = np.sort(full[t[0]])[::-1][:3]
            assert np.allclose(rows["score"].to_numpy(), want)
            assert np.allclose(full[t[0], rows["example_id"].to_numpy()], want)

    def test_gradcos_is_a_cosine(self, scoring):
        frame, _ = example_scores("gradcos", **scoring)
        scores = frame["score"].to_numpy()
        assert scores.min() >= -1 and scores.max() <= 1
        s = scoring
        G = s["family"].per_example_grads(s["theta"], s["X_train"], s["y_train"])
        T = s["family"].per_example_grads(s["theta"], s["X_target"], s["y_target"])
        want = torch.nn.functional.cosine_similarity(T[:, None, :], G[None, :, :], dim=2).numpy()
        assert np.allclose(score_matrix(frame), want, atol=1e-6)

    @pytest.mark.parametrize("method", ["if-exact", "gradcos"])
    def test_block_size_does_not_change_results(self, scoring, method):
        one = example_scores(method, block_size=1, top_k=5, **scoring)[0]
        three = example_scores(method, block_size=3, top_k=5, **scoring)[0]
        whole = example_scores(method, block_size=256, top_k=5, **scoring)[0]
        assert one.equals(three) and one.equals(whole)

    def test_ids_are_passed_through(self, scoring):
        frame, _ = example_scores("graddot", train_ids=np.arange(40) + 1000, target_ids=torch.arange(7) * 10,
                                  top_k=2, **scoring)  # fmt: skip
        assert set(frame["example_id"].to_list()) <= set(range(1000, 1040))
        assert sorted(set(frame["target_id"].to_list())) == list(range(0, 70, 10))

    def test_invalid_arguments(self, scoring):
        with pytest.raises(InfluenceError, match="unknown scoring method 'trak'"):
            example_scores("trak", **scoring)
        with pytest.raises(InfluenceError, match="takes no solver options"):
            example_scores("graddot", options=SolverOptions("lissa", depth=3), **scoring)
        with pytest.raises(InfluenceError, match="method 'if-cg' solves with 'cg'"):
            example_scores("if-cg", options=SolverOptions("lissa"), **scoring)
        with pytest.raises(InfluenceError, match="train_ids has 3 ids for 40 rows"):
            example_scores("graddot", train_ids=[1, 2, 3], **scoring)
