"""Nonlinear networks with the proximal regulariser (service_core.nonlinear, paper §4.3).

Oracles: a separately written MLP forward and risk (plain jnp, not stax, not the module's risk)
differentiated by ``jax.grad``; the linearised twin against kernel ridge regression solved by numpy;
retraining the nonlinear network on the retain set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import nonlinear as nl
from service_core.config import ModelConfig

jax.config.update("jax_enable_x64", True)

N, D, WIDTH, EPOCHS = 40, 5, 64, 400
LAM = 1.0  # "large": the 2×64 GELU network stays within a few per cent of its linearisation


def _data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    y = np.sign(x[:, :1] + 0.3 * rng.standard_normal((n, 1)))
    return x, y


def independent_risk(theta, model, x, y, weights, lam):
    """(NL) written out by hand: Dense layers with NTK parameterisation, out = σ_w/√fan_in · x W
    + σ_b b, exact GELU x·Φ(x) (stax's default), mean of ½(f − y)² over the weighted rows."""
    params = model.unravel(theta)
    cfg = model.config
    h = jnp.asarray(x)
    dense = [p for p in params if p]
    for i, (w, b) in enumerate(dense):
        h = cfg.w_std / jnp.sqrt(h.shape[1]) * h @ w + cfg.b_std * b
        if i < len(dense) - 1:
            h = 0.5 * h * (1 + jax.scipy.special.erf(h / jnp.sqrt(2.0)))
    data = jnp.sum(weights * 0.5 * jnp.sum((h - y) ** 2, axis=1)) / jnp.sum(weights)
    return data + 0.5 * lam * jnp.sum((theta - model.theta0) ** 2)


@pytest.fixture(scope="module")
def setup():
    x, y = _data()
    xt, yt = _data(1, 30)
    model = nl.build_mlp(ModelConfig(kind="mlp", width=WIDTH, depth=2, seed=0), D, 1, "gelu")
    theta, theta_lin, trace = nl.train_pair(model, x, y, xt, yt, LAM, EPOCHS, record_every=10)
    polished, report = nl.newton_cg(model, theta, x, y, LAM, tol=1e-12, relative=False)
    return {
        "x": x, "y": y, "xt": xt, "yt": yt, "model": model, "theta_gd": theta,
        "theta_lin": theta_lin, "trace": trace, "theta": polished, "polish": report,
    }  # fmt: skip


def test_independent_forward_matches_the_network(setup):
    m, x = setup["model"], setup["x"]
    ones = np.ones(N)
    ours = nl.risk(m, setup["theta"], x, setup["y"], LAM)
    theirs = float(independent_risk(setup["theta"], m, x, setup["y"], ones, LAM))
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_training_reaches_its_stationary_point(setup):
    m, x, y = setup["model"], setup["x"], setup["y"]
    grad = jax.grad(independent_risk)
    g_start = float(jnp.linalg.norm(grad(m.theta0, m, x, y, np.ones(N), LAM)))
    g_gd = float(jnp.linalg.norm(grad(setup["theta_gd"], m, x, y, np.ones(N), LAM)))
    g_end = float(jnp.linalg.norm(grad(setup["theta"], m, x, y, np.ones(N), LAM)))
    # gradient descent alone (lr 0.1, 400 epochs) already gets far; Newton-CG finishes it
    assert g_gd < 1e-6 * g_start
    assert g_end < 1e-12
    assert setup["polish"].converged
    assert setup["polish"].grad_norms[-1] == pytest.approx(g_end, rel=1e-6, abs=1e-15)
    # the trace's first gradient is the one at θ_0
    assert setup["trace"].grad_nl[0] == pytest.approx(g_start, rel=1e-10)


def test_linearised_twin_is_kernel_ridge_regression(setup):
    """f_lin(X; θ_lin) = f_0 + K α, α = (K + λN I)⁻¹(y − f_0) (docs/maths.md, Eq. (O))."""
    m, x, y = setup["model"], setup["x"], setup["y"]
    k, _ = m.train_kernel(x, "full", progress=False)
    f0 = np.asarray(m.f(m.theta0, x))
    alpha = np.linalg.solve(np.asarray(k) + LAM * N * np.eye(N), y - f0)
    f_lin = np.asarray(m.f_lin(setup["theta_lin"], x))
    np.testing.assert_allclose(f_lin, f0 + np.asarray(k) @ alpha, atol=1e-10)
    assert setup["trace"].grad_lin[-1] < 1e-10


def test_larger_lambda_keeps_the_network_near_its_linearisation(setup):
    m, x, y, xt, yt = (setup[k] for k in ("model", "x", "y", "xt", "yt"))
    _, _, small = nl.train_pair(m, x, y, xt, yt, 1e-2, EPOCHS, record_every=10)
    large = setup["trace"]
    assert large.test_rmse.max() < small.test_rmse.max()
    assert large.param_distance.max() < small.param_distance.max()
    assert large.param_distance[0] == 0.0  # both start at θ_0
    assert len(large.grad_nl) == EPOCHS and len(large.test_rmse) == EPOCHS // 10


@pytest.fixture(scope="module")
def forgetting(setup):
    m, x, y = setup["model"], setup["x"], setup["y"]
    forget = np.zeros(N, bool)
    forget[::5] = True
    theta_r, _ = nl.train(m, x, y, LAM, EPOCHS, mask=~forget)
    theta_r, report = nl.newton_cg(m, theta_r, x, y, LAM, mask=~forget, tol=1e-12, relative=False)
    assert report.converged
    return forget, theta_r


def test_influence_steps_land_within_the_linearisation_gap(setup, forgetting):
    m, x, y, theta = setup["model"], setup["x"], setup["y"], setup["theta"]
    forget, theta_r = forgetting
    k, _ = m.train_kernel(x, "full", progress=False)
    gap = float(np.linalg.norm(theta - setup["theta_lin"]))  # measured at training
    change = float(np.linalg.norm(theta_r - theta))
    d_alpha, info_a = nl.alpha_step(m, theta, x, y, forget, LAM, k)
    d_theta, info_t = nl.theta_step(m, theta, x, y, forget, LAM)
    assert info_a.converged and info_t.converged
    for delta in (d_alpha, d_theta):
        err = float(np.linalg.norm(theta + delta - theta_r))
        assert err <= gap
        assert err <= 0.2 * change  # and far better than not forgetting at all


def test_refinement_certificate_is_the_nonlinear_retain_gradient(setup, forgetting):
    m, x, y, theta = setup["model"], setup["x"], setup["y"], setup["theta"]
    forget, theta_r = forgetting
    d_theta, _ = nl.theta_step(m, theta, x, y, forget, LAM)
    refined, report, cert = nl.refine(m, theta + d_theta, theta, x, y, forget, LAM, tol=1e-10)
    grad = jax.grad(independent_risk)
    w = (~forget).astype(float)
    g_new = float(jnp.linalg.norm(grad(refined, m, x, y, w, LAM)))
    g_prev = float(jnp.linalg.norm(grad(theta, m, x, y, w, LAM)))
    assert cert.met and cert.relative <= 1e-10
    assert cert.relative == pytest.approx(g_new / g_prev, rel=1e-6, abs=1e-16)
    assert cert.grad_norm == pytest.approx(g_new, rel=1e-6, abs=1e-16)
    change = float(np.linalg.norm(theta_r - theta))
    assert float(np.linalg.norm(refined - theta_r)) < 1e-8 * change  # the retrained network
    # the step alone does not meet that tolerance, and its certificate says so
    alone = nl.certificate(m, theta + d_theta, theta, x, y, ~forget, LAM, tol=1e-10)
    assert not alone.met and alone.relative > 1e-10


def test_random_perturbation_has_the_norm_of_the_true_change(setup, forgetting):
    theta = np.asarray(setup["theta"])
    _, theta_r = forgetting
    rnd = nl.random_perturbation(theta, theta_r, seed=3)
    assert np.linalg.norm(rnd - theta) == pytest.approx(np.linalg.norm(theta_r - theta))


def test_unknown_activation_and_bad_record_interval(setup):
    with pytest.raises(ValueError, match="unknown activation"):
        nl.build_mlp(ModelConfig(kind="mlp", width=4), D, 1, "tanhh")
    with pytest.raises(ValueError, match="must divide"):
        nl.train_pair(
            setup["model"], setup["x"], setup["y"], setup["xt"], setup["yt"], 1.0, 7, record_every=2
        )


def test_steps_are_exact_for_a_network_linear_in_theta():
    """depth 0: f(x; θ) is linear in θ, so (NL) is quadratic and both influence steps equal exact
    retraining (docs/maths.md: the α-space step for squared error; the θ-space step is one Newton
    step on a quadratic)."""
    x, y = _data(2)
    model = nl.build_mlp(ModelConfig(kind="mlp", width=1, depth=0, seed=1), D, 1, "gelu")
    lam = 1e-2
    theta, report = nl.newton_cg(model, model.theta0, x, y, lam, tol=1e-13, relative=False)
    assert report.converged
    forget = np.zeros(N, bool)
    forget[:7] = True
    theta_r, report = nl.newton_cg(model, theta, x, y, lam, mask=~forget, tol=1e-13, relative=False)
    assert report.converged
    k, _ = model.train_kernel(x, "full", progress=False)
    change = float(np.linalg.norm(theta_r - theta))
    d_alpha, _ = nl.alpha_step(model, theta, x, y, forget, lam, k)
    d_theta, _ = nl.theta_step(model, theta, x, y, forget, lam)
    assert float(np.linalg.norm(theta + d_alpha - theta_r)) < 1e-8 * change
    assert float(np.linalg.norm(theta + d_theta - theta_r)) < 1e-8 * change
