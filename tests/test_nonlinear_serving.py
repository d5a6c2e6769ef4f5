"""``NonlinearUnlearner`` (service_core.nonlinear_serving) on the built-in ``mlp`` (ReLU): it serves
f(x; θ), forgets by the θ-space step, reports the nonlinear certificate, refuses linearised
answers, saves and restores θ, is followed from its checkpoints, and its mode is part of its
identity.

Oracles: the ReLU MLP's forward pass and risk written out here in plain jnp, ``jax.grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_dataset
from service_core.lifecycle import CheckpointMismatchError, Identity
from service_core.nonlinear_serving import (
    NonlinearOptions,
    NonlinearUnlearner,
    NotAvailableError,
    linearisation_gap,
)

# one build (~40 s of compiles on 2 cores): slow
pytestmark = pytest.mark.slow

LAM = 1.0
MODEL = ModelConfig(kind="mlp", width=16, depth=1, seed=0)
TRAIN = TrainConfig(loss="mse", lam=LAM, dtype="float64")


@pytest.fixture(scope="module")
def built(dataset_file, tmp_path_factory):
    data = load_dataset(f"npz:{dataset_file}", 0)
    options = NonlinearOptions(step="theta", refine=0, epochs=50)
    u = NonlinearUnlearner.build(
        data, MODEL, TRAIN, SolverConfig(), progress=False, source="small", options=options
    )
    directory = tmp_path_factory.mktemp("nl-mlp") / "checkpoints"
    u.save(directory)
    return data, u, directory


def forward(model, theta, x):
    """The ReLU MLP by hand: NTK Dense out = σ_w/√fan_in · h W + σ_b b, ReLU between."""
    h = jnp.asarray(x, jnp.float64)
    layers = [p for p in model.unravel(jnp.asarray(theta)) if p]
    for i, (w, b) in enumerate(layers):
        h = MODEL.w_std / jnp.sqrt(h.shape[1]) * h @ w + MODEL.b_std * b
        if i < len(layers) - 1:
            h = jnp.maximum(h, 0.0)
    return h


def grad_norm(model, theta, x, y, keep) -> float:
    def risk(t):
        f = forward(model, t, x[keep])
        data = jnp.mean(0.5 * jnp.sum((f - y[keep]) ** 2, axis=1))
        return data + 0.5 * LAM * jnp.sum((t - model.theta0) ** 2)

    return float(jnp.linalg.norm(jax.grad(risk)(jnp.asarray(theta))))


def test_serves_the_network_and_forgets_with_the_honest_certificate(built, tmp_path):
    data, base, directory = built
    u = NonlinearUnlearner.restore(directory)
    model = u.model.model
    x, y = data.x.astype(np.float64), data.targets().astype(np.float64)
    theta_prev = u.state.theta
    np.testing.assert_allclose(
        u.predict(x[:5]), forward(model, theta_prev, x[:5]), rtol=1e-10, atol=1e-12
    )
    # restore gave back the θ that was saved, not a re-solved one
    np.testing.assert_array_equal(np.asarray(theta_prev), np.asarray(base.state.theta))
    ids = ["r02", "r30"]
    result = u.forget(ids, tmp_path / "ck")
    keep = np.array([i not in ids for i in data.ids])
    cert = result.certificate["nonlinear"]
    assert cert["step"] == "theta" and not cert["enforced"] and cert["refine_steps"] == 0
    g_new = grad_norm(model, u.state.theta, x, y, keep)
    g_prev = grad_norm(model, theta_prev, x, y, keep)
    assert cert["grad_norm"] == pytest.approx(g_new, rel=1e-8)
    assert cert["reference"] == pytest.approx(g_prev, rel=1e-8)
    assert cert["relative"] == pytest.approx(g_new / g_prev, rel=1e-8)
    assert cert["met"] == (g_new / g_prev <= cert["tol"])
    assert result.solve.method == "theta-cg" and result.solve.converged
    # (for this ReLU network, whose training stopped on a kink, the step can raise the retain
    # gradient: measured 0.129 against 0.087; the certificate says so, it is not hidden)
    assert u.version == 1 and u.n_train == data.n - 2 and u.is_forgotten(ids)
    np.testing.assert_allclose(
        u.predict(x[:5]), forward(model, u.state.theta, x[:5]), rtol=1e-10, atol=1e-12
    )
    # the forgotten rows are gone from what is held
    rows = [base.state.index[i] for i in ids]
    assert not np.any(np.asarray(u.state.x)[rows]) and not np.any(np.asarray(u.state.alpha)[rows])

    # a follower of those checkpoints serves the same θ
    follower = NonlinearUnlearner.restore(directory)
    assert follower.version == 0 and follower.follow_checkpoint(tmp_path / "ck")
    assert follower.version == 1
    np.testing.assert_array_equal(np.asarray(follower.state.theta), np.asarray(u.state.theta))
    np.testing.assert_array_equal(follower.predict(x[:5]), u.predict(x[:5]))


def test_linearised_answers_and_additions_are_refused(built):
    data, u, _ = built
    x, y = data.x[:3], data.y[:3]
    for call in (
        lambda: u.influence(["r01"], x, y),
        lambda: u.attribute(x, y),
        lambda: u.self_influence(),
        lambda: u.add(["new"], x[:1], y[:1]),
    ):
        with pytest.raises(NotAvailableError, match="not available for a nonlinear model"):
            call()


def test_training_report_and_gap(built):
    data, u, _ = built
    nl = u.state.meta["nonlinear"]
    assert nl["mode"] == "nonlinear" and nl["options"]["step"] == "theta"
    model = u.model.model
    x, y = data.x.astype(np.float64), data.targets().astype(np.float64)
    everyone = np.ones(data.n, bool)
    g_end = grad_norm(model, u.state.theta, x, y, everyone)
    g_start = grad_norm(model, model.theta0, x, y, everyone)
    assert nl["training"]["grad_norm_end"] == pytest.approx(g_end, rel=1e-6)
    assert nl["training"]["grad_norm_start"] == pytest.approx(g_start, rel=1e-8)
    assert u.state.residual == pytest.approx(g_end / g_start, rel=1e-6)
    assert nl["training"]["met"] == (g_end / g_start <= nl["options"]["tol"])
    gap = nl["linearisation_gap"]
    assert gap["rmse"] > 0 and (gap["warning"] is None) == (gap["relative"] <= gap["threshold"])


def test_gap_threshold():
    f0 = np.zeros((4, 1))
    f_lin = np.ones((4, 1))
    near = linearisation_gap(f_lin + 0.05, f_lin, f0, 0.1)
    far = linearisation_gap(f_lin + 0.5, f_lin, f0, 0.1)
    assert near["rmse"] == pytest.approx(0.05) and near["relative"] == pytest.approx(0.05)
    assert near["warning"] is None
    assert far["relative"] == pytest.approx(0.5) and "does not hold at lam 0.1" in far["warning"]


def test_mode_is_part_of_the_identity(built):
    _, _, directory = built
    linear = Identity.of(MODEL, TRAIN, "small")
    with pytest.raises(
        CheckpointMismatchError, match="mode 'nonlinear' .checkpoint. ≠ 'linearised'"
    ):
        Unlearner.restore(directory, expect=linear)
    nonlinear = Identity.of(MODEL, TRAIN, "small", "nonlinear")
    assert NonlinearUnlearner.restore(directory, expect=nonlinear).version == 0
