"""Infinitely wide models (``inf-mlp``, ``inf-cnn``) and kernel gradient descent, in float64.

Oracles are computed from scratch: the analytic NTK straight from a stax ``kernel_fn`` built here
(not through ``service_core.models.KernelModel``), kernel ridge regression by scipy's dense solve for squared
error, and a numpy damped Newton with Armijo line search on the dual risk of docs/maths.md for
cross-entropy. Training and forgetting go through the engine's ``dual.newton`` and
``influence.deletion_step`` on a trace-form ``DualProblem``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from service_core import KernelModel, ModelConfig, load_digits
from service_core._nt import stax
from service_core.dual import DualProblem, kernel_gradient_descent, newton, stationarity
from service_core.influence import Refinement, deletion_step
from service_core.kernels import purge_cache
from service_core.layout import KernelLayout
from service_core.linalg import SolveOptions, canonical_method

LAM = 1e-2
N_TRAIN = 90
W_STD, B_STD = math.sqrt(2.0), 0.1
SOLVER = SolveOptions("auto", 1e-12, 2000, 4096)


@pytest.fixture(scope="module")
def digits():
    ds = load_digits(seed=0)
    return (
        ds.x[:N_TRAIN].astype(np.float64),
        ds.y[:N_TRAIN],
        ds.x_test[:25].astype(np.float64),
        ds.y_test[:25],
    )


def stax_mlp_ntk(x1, x2, depth=3):
    """The analytic NTK of ``depth`` × [Dense → ReLU] → Dense, straight from stax."""
    layers = []
    for _ in range(depth):
        layers += [stax.Dense(512, W_std=W_STD, b_std=B_STD, parameterization="ntk"), stax.Relu()]
    layers.append(stax.Dense(1, W_std=W_STD, b_std=B_STD, parameterization="ntk"))
    return np.asarray(stax.serial(*layers)[2](x1, x2, "ntk"), np.float64)


def krr(k, y, lam):
    """Kernel ridge regression α = (K + λN I)⁻¹ Y, the optimum of the squared-error dual risk."""
    n = len(k)
    return scipy.linalg.solve(k + lam * n * np.eye(n), y, assume_a="pos")


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def dual_newton_ce(k, y, lam):
    """argmin_α (1/n) Σ CE((Kα)_i, y_i) + (λ/2) tr(αᵀ K α), K (n, n) trace form, α (n, d).

    Damped Newton with Armijo backtracking. The gradient is K G with G = P − Y over n plus λα; the
    Newton step δ solves K (W K/n + λ I) δ = K G, i.e. (W K/n + λ I) δ = G (K nonsingular), built
    densely as an (n·d) × (n·d) matrix.
    """
    n, d = y.shape
    alpha = np.zeros((n, d))
    kd = np.kron(k, np.eye(d))

    def risk(a):
        f = k @ a
        z = f - f.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.sum(y * logp) / n + 0.5 * lam * np.sum(a * f)

    for _ in range(200):
        p = softmax(k @ alpha)
        grad_dir = (p - y) / n + lam * alpha  # G; the true gradient is K G
        w = np.zeros((n * d, n * d))
        for i in range(n):
            w[i * d : (i + 1) * d, i * d : (i + 1) * d] = np.diag(p[i]) - np.outer(p[i], p[i])
        step = np.linalg.solve(w @ kd / n + lam * np.eye(n * d), grad_dir.reshape(-1)).reshape(n, d)
        if np.linalg.norm(step) <= 1e-13 * (1.0 + np.linalg.norm(alpha)):
            return alpha - step  # converged: the risk is too flat here for a line search to compare
        t, r0, slope = 1.0, risk(alpha), float(np.sum((k @ grad_dir) * step))
        while t > 1e-12 and risk(alpha - t * step) > r0 - 1e-4 * t * slope:
            t *= 0.5
        alpha = alpha - t * step
    raise AssertionError("oracle Newton did not converge")


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def predict(km: KernelModel, alpha, xt, x):
    """f(X_t) = f_0 + K(X_t, X) α of the kernel machine (Eq. 14; with α := Δα, Eq. 8)."""
    return np.asarray(km.offset(xt)) + km.kernel(xt, x) @ np.asarray(alpha)


def train_kernel(km: KernelModel, x, **kwargs):
    return km.train_kernel(x, **kwargs)[0]


def forget_step(problem, alpha, forget_mask, solver, refine: bool, tol: float, max_steps: int):
    """The engine's deletion step on the current layout (F masked), refined when asked."""
    refinement = Refinement(tol, max_steps, solver) if refine else None
    return deletion_step(problem, alpha, forget_mask, solver, refinement)


def problem_for(km: KernelModel, k, y, loss, mask=None):
    n = len(k)
    return DualProblem(
        jnp.asarray(k),
        KernelLayout("trace", np.shape(y)[1]),
        km.offset(np.zeros((n, 1))),
        jnp.asarray(y),
        jnp.ones(n, bool) if mask is None else jnp.asarray(mask),
        LAM,
        loss,
    )


def test_kernel_model_basics(digits, tmp_path):
    x, _, xt, _ = digits
    km = KernelModel(ModelConfig(kind="inf-mlp", depth=3), (64,), 10, jnp.float64)
    assert km.n_params is None and km.kernel_form == "trace" and km.output_dim == 10
    k, report = km.train_kernel(
        x, cache_dir=tmp_path, progress=False, block_size=32
    )  # 3×3 blocks, padded
    assert not report["cached"] and k.shape == (N_TRAIN, N_TRAIN) and k.dtype == np.float64
    # Not to 1e-12: near the diagonal the ReLU arc-cosine (arccos(1 − δ) ≈ √(2δ)) turns rounding
    # differences of the cosine between jit-fused and eager evaluation into ~1e-9 relative ones.
    assert np.allclose(k, stax_mlp_ntk(x, x), rtol=1e-7, atol=0)
    assert np.array_equal(k, k.T)  # mirrored blocks
    again, report = km.train_kernel(x, cache_dir=tmp_path, progress=False)
    assert report["cached"] and np.array_equal(again, k)
    assert purge_cache(tmp_path) == 1 and not list(tmp_path.glob("*.npy"))
    cross = km.kernel(xt, x, block_size=16)
    assert cross.shape == (25, N_TRAIN) and np.allclose(
        cross, stax_mlp_ntk(xt, x), rtol=1e-7, atol=0
    )
    assert np.array_equal(np.asarray(km.offset(xt)), np.zeros((25, 10)))
    # the analytic NTK ignores width and seed; depth changes it
    wide = KernelModel(
        ModelConfig(kind="inf-mlp", depth=3, width=7, seed=5), (64,), 10, jnp.float64
    )
    assert np.allclose(wide.kernel(x[:10]), k[:10, :10], rtol=1e-12, atol=0)
    assert not np.allclose(
        KernelModel(ModelConfig(kind="inf-mlp", depth=1), (64,), 10, jnp.float64).kernel(x[:10]),
        k[:10, :10],
    )
    with pytest.raises(ValueError, match="inf-mlp"):
        KernelModel(ModelConfig(kind="mlp"), (64,), 10)


@pytest.mark.parametrize("method", ["cg", "cholesky"])
def test_inf_mlp_mse_training_and_forgets_equal_kernel_ridge(digits, method):
    x, labels, xt, _ = digits
    y = np.eye(10)[labels]
    km = KernelModel(ModelConfig(kind="inf-mlp", depth=3), (64,), 10, jnp.float64)
    k = train_kernel(km, x, progress=False, block_size=32)
    k_o, kt_o = stax_mlp_ntk(x, x), stax_mlp_ntk(xt, x)  # the oracle's own kernels
    solver = SOLVER.replace(method=canonical_method(method))
    problem = problem_for(km, k, y, "mse")
    alpha, info = newton(problem, jnp.zeros_like(problem.y), 1e-12, 50, solver)
    assert info.converged
    alpha_o = krr(k_o, y, LAM)
    assert rel(alpha, alpha_o) < 1e-8
    assert rel(predict(km, alpha, xt, x), kt_o @ alpha_o) < 1e-8

    # two sequential forgets, each checked against kernel ridge regression on what remains
    active = np.ones(N_TRAIN, bool)
    for forget_index in (np.arange(0, N_TRAIN, 4), np.arange(1, N_TRAIN, 5)):
        forget = np.zeros(N_TRAIN, bool)
        forget[forget_index] = True
        forget &= active
        before = predict(km, alpha, xt, x)
        deletion = forget_step(problem, alpha, jnp.asarray(forget), solver, True, 1e-12, 5)
        delta_step, step_info = deletion.delta_alpha, deletion.step
        assert step_info.converged and deletion.residual <= 1e-12
        active &= ~forget
        alpha_o = np.zeros_like(y)
        alpha_o[active] = krr(k_o[np.ix_(active, active)], y[active], LAM)
        assert rel(deletion.alpha, alpha_o) < 1e-8
        assert rel(alpha + delta_step, alpha_o) < 1e-8  # squared error: the single step is exact
        assert np.all(np.asarray(deletion.alpha)[~active] == 0)
        after_o = kt_o @ alpha_o
        assert rel(predict(km, deletion.alpha, xt, x), after_o) < 1e-8
        # Eq. 8: Δf(X_t) = K(X_t, X) Δα is the actual change
        assert rel(predict(km, delta_step, xt, x), after_o - before) < 1e-8
        assert rel(before, after_o) > 1e-3  # and the forget moved the model
        alpha, problem = deletion.alpha, problem._replace(mask=jnp.asarray(active))


def test_inf_mlp_ce_refined_forget_equals_retrained_kernel_machine(digits):
    x, labels, xt, _ = digits
    keep = labels < 3  # three classes keep the oracle's dense Newton small
    x, labels = x[keep], labels[keep]
    n = len(x)
    y = np.eye(3)[labels]
    km = KernelModel(ModelConfig(kind="inf-mlp", depth=3), (64,), 3, jnp.float64)
    k = train_kernel(km, x, progress=False)
    k_o = stax_mlp_ntk(x, x)
    solver = SOLVER.replace(method="alpha-cholesky")
    problem = problem_for(km, k, y, "ce")
    alpha, info = newton(problem, jnp.zeros_like(problem.y), 1e-12, 50, solver)
    assert info.converged
    assert rel(alpha, dual_newton_ce(k_o, y, LAM)) < 1e-8

    forget = np.zeros(n, bool)
    forget[np.random.default_rng(0).choice(n, size=n // 3, replace=False)] = True
    retain = ~forget
    alpha_o = np.zeros_like(y)
    alpha_o[retain] = dual_newton_ce(k_o[np.ix_(retain, retain)], y[retain], LAM)
    step_only = forget_step(problem, alpha, jnp.asarray(forget), solver, False, 1e-12, 0)
    refined = forget_step(problem, alpha, jnp.asarray(forget), solver, True, 1e-12, 10)
    assert (
        1e-6 < rel(step_only.alpha, alpha_o) < 1e-1
    )  # one Newton step: close, not exact (docs/maths.md)
    assert refined.refine.converged and refined.residual <= 1e-12
    assert rel(refined.alpha, alpha_o) < 1e-6
    kt_o = stax_mlp_ntk(xt, x)
    assert rel(predict(km, refined.alpha, xt, x), kt_o @ alpha_o) < 1e-6


@pytest.mark.parametrize("pool", [True, False])
def test_inf_cnn_kernel_and_mse_training(pool):
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(24, 8, 8, 3))
    y = np.where(rng.uniform(size=(24, 1)) < 0.5, -1.0, 1.0)
    cfg = ModelConfig(kind="inf-cnn", depth=2, pool=pool)
    km = KernelModel(cfg, (8, 8, 3), 1, jnp.float64)
    layers = []
    for _ in range(2):
        layers += [
            stax.Conv(1, (3, 3), padding="SAME", W_std=W_STD, b_std=B_STD, parameterization="ntk"),
            stax.Relu(),
        ]
        if pool:
            layers.append(stax.AvgPool((2, 2), strides=(2, 2)))
    layers += [stax.Flatten(), stax.Dense(1, W_std=W_STD, b_std=B_STD, parameterization="ntk")]
    k_o = np.asarray(stax.serial(*layers)[2](x, x, "ntk"))
    k = train_kernel(km, x, progress=False, block_size=10)
    assert np.allclose(k, k_o, rtol=1e-7, atol=0)  # see test_kernel_model_basics for the tolerance
    assert np.array_equal(km.kernel(x.reshape(24, -1), block_size=10), k)  # flat rows are reshaped
    problem = problem_for(km, k, y, "mse")
    alpha, info = newton(
        problem, jnp.zeros_like(problem.y), 1e-12, 5, SOLVER.replace(method="alpha-cholesky")
    )
    assert info.converged and rel(alpha, krr(k_o, y, LAM)) < 1e-8
    with pytest.raises(ValueError, match="image inputs"):
        KernelModel(cfg, (192,), 1)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kernel_gradient_descent_reaches_the_newton_optimum(digits, loss, capsys):
    x, labels, _, _ = digits
    y = np.eye(10)[labels]
    lam = 1e-1
    km = KernelModel(ModelConfig(kind="inf-mlp", depth=3), (64,), 10, jnp.float64)
    k = train_kernel(km, x, progress=False)
    problem = problem_for(km, k, y, loss)._replace(lam=lam)
    alpha_n, info_n = newton(
        problem, jnp.zeros_like(problem.y), 1e-12, 50, SOLVER.replace(method="alpha-cholesky")
    )
    alpha_k, info_k = kernel_gradient_descent(
        problem, jnp.zeros_like(problem.y), tol=1e-11, max_steps=20_000
    )
    assert info_n.converged and info_k.converged and info_k.residual <= 1e-11
    assert (
        abs(info_k.residual - stationarity(problem, alpha_k)[1]) < 1e-13
    )  # the reported residual is true
    assert rel(alpha_k, alpha_n) < 1e-8
    # the default step is 2/(L + λ) from the top eigenvalue of K; the step count respects the
    # contraction bound ((L − λ)/(L + λ))^t of the K-metric analysis
    mu = float(np.linalg.eigvalsh(k)[-1])
    assert abs(info_k.top_eigenvalue - mu) < 1e-5 * mu
    big = (1.0 if loss == "mse" else 0.5) * mu / N_TRAIN + lam
    assert info_k.lr == pytest.approx(2.0 / (big + lam))
    with capsys.disabled():
        print(
            f"\n  KGD {loss}: {info_k.steps} steps to residual {info_k.residual:.1e} (η = {info_k.lr:.3f}, "
            f"μ_max = {mu:.1f}); Newton: {info_n.steps} steps, residual {info_n.residual:.1e}"
        )
    assert 10 < info_k.steps < 20_000
    # and on a retain set: KGD retraining after a forget equals the refined deletion
    forget = np.zeros(N_TRAIN, bool)
    forget[::3] = True
    deletion = forget_step(
        problem,
        alpha_n,
        jnp.asarray(forget),
        SOLVER.replace(method="alpha-cholesky"),
        True,
        1e-12,
        10,
    )
    retain_problem = problem._replace(mask=jnp.asarray(~forget))
    alpha_r, info_r = kernel_gradient_descent(
        retain_problem, jnp.zeros_like(problem.y), tol=1e-11, max_steps=20_000
    )
    assert info_r.converged and rel(alpha_r, deletion.alpha) < 1e-8
    assert np.all(np.asarray(alpha_r)[forget] == 0)


def test_kernel_gradient_descent_reports_non_convergence(digits):
    x, labels, _, _ = digits
    km = KernelModel(ModelConfig(kind="inf-mlp", depth=3), (64,), 10, jnp.float64)
    problem = problem_for(km, train_kernel(km, x, progress=False), np.eye(10)[labels], "ce")
    _, info = kernel_gradient_descent(problem, jnp.zeros_like(problem.y), tol=1e-12, max_steps=5)
    assert info.steps == 5 and not info.converged and info.residual > 1e-12
    assert info.as_solve_info().method == "kgd"


def test_warm_up_does_not_evaluate_an_infinitely_wide_models_kernel(monkeypatch):
    """``serve``'s start-up warm-up compiles the θ-space prediction program; an infinitely wide
    model has none (its prediction is K(x, X) α, minutes for an inf-cnn over a few hundred
    images), so it evaluates nothing, and start-up does not wait for it."""
    from service_core import SolverConfig, TrainConfig, Unlearner

    u = Unlearner.build(
        load_digits(seed=0).subset(slice(0, 30)),
        ModelConfig(kind="inf-mlp", depth=1),
        TrainConfig(loss="mse", lam=LAM, dtype="float64"),
        SolverConfig(),
        progress=False,
    )
    calls = []
    monkeypatch.setattr(KernelModel, "kernel", lambda self, *a, **k: calls.append(a))
    assert u.warm_up() == 0.0 and calls == []
