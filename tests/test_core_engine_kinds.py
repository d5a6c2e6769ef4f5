"""Every model kind through the ``Unlearner`` façade: infinite-width kernel machines (no θ) and the
linearised CNN build, forget, estimate, predict, checkpoint and restore like the MLP."""

from __future__ import annotations

import numpy as np
import pytest

from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_digits
from service_core._nt import stax

LAM = 1e-2


def krr(k: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Kernel ridge regression's dual weights for the risk of docs/maths.md: (K + λ n I) α = y (f_0 = 0)."""
    return np.linalg.solve(k + lam * len(y) * np.eye(len(y)), y)


def test_inf_mlp_forget_equals_kernel_ridge_on_the_rest(tmp_path):
    ds = load_digits(seed=0).subset(slice(0, 150))
    cfg = ModelConfig(kind="inf-mlp", depth=2)
    u = Unlearner.build(
        ds, cfg, TrainConfig(loss="mse", lam=LAM, dtype="float64"), SolverConfig(), progress=False
    )
    info = {"n_params": u.model.n_params, "kernel": u.state.kernel_summary()}
    assert (
        info["n_params"] is None and info["kernel"]["form"] == "trace" and info["kernel"]["exact"]
    )
    # the analytic kernel straight from stax, independent of the engine's blocks and cache
    layers = []
    for _ in range(2):
        layers += [
            stax.Dense(512, W_std=cfg.w_std, b_std=cfg.b_std, parameterization="ntk"),
            stax.Relu(),
        ]
    _, _, kernel_fn = stax.serial(
        *layers, stax.Dense(10, W_std=cfg.w_std, b_std=cfg.b_std, parameterization="ntk")
    )
    xs = np.concatenate([ds.x, ds.x_test[:9]]).astype(np.float64)
    k_all = np.asarray(kernel_fn(xs, None, "ntk"))
    k, k_t = k_all[:150, :150], k_all[150:, :150]
    y = ds.targets().astype(np.float64)
    assert np.allclose(u.predict(ds.x_test[:9]), k_t @ krr(k, y, LAM), atol=1e-8)
    gone = list(ds.ids[::3])
    keep = np.array([i not in set(gone) for i in ds.ids])
    before = u.predict(ds.x_test[:9])
    est = u.influence(gone, ds.x_test[:9], ds.y_test[:9])
    u.forget(gone, checkpoint_dir=tmp_path / "ckpt")
    expect = k_t[:, keep] @ krr(k[np.ix_(keep, keep)], y[keep], LAM)
    after = u.predict(ds.x_test[:9])
    assert np.linalg.norm(after - expect) <= 1e-8 * np.linalg.norm(expect)
    assert np.allclose(est.delta_outputs, after - before, atol=1e-8)  # Eq. 8 is exact for mse
    back = Unlearner.restore(tmp_path / "ckpt", progress=False)
    assert back.version == 1 and back.state.theta is None
    assert np.allclose(back.predict(ds.x_test[:9]), after, atol=1e-10)


def test_inf_mlp_cross_entropy_refined_is_stationary():
    ds = load_digits(seed=0).subset(slice(0, 120))
    u = Unlearner.build(
        ds,
        ModelConfig(kind="inf-mlp"),
        TrainConfig(loss="ce", lam=LAM, dtype="float64"),
        SolverConfig(),
        progress=False,
    )
    res = u.forget(list(ds.ids[:40]))
    assert res.refine is not None and res.refine.converged and res.residual < 1e-10


def test_theta_cg_is_refused_without_parameters():
    ds = load_digits(seed=0).subset(slice(0, 30))
    with pytest.raises(ValueError, match="no parameters"):
        Unlearner.build(
            ds,
            ModelConfig(kind="inf-mlp"),
            TrainConfig(),
            SolverConfig(method="theta-cg"),
            progress=False,
        )
    u = Unlearner.build(
        ds, ModelConfig(kind="inf-mlp"), TrainConfig(), SolverConfig(), progress=False
    )
    assert (
        u.state.nystrom is None
    )  # trace form with cross-entropy: the preconditioner would not be used
    with pytest.raises(ValueError, match="no parameters"):
        u.plan_forget(ds.ids[:3].tolist(), method="theta-cg")
    assert u.version == 0 and u.n_train == 30


def test_cnn_through_the_engine():
    ds = load_digits(seed=0).subset(slice(0, 40))
    # digits as 8×8×1 images
    ds = type(ds)(
        ds.name,
        ds.ids,
        ds.x.reshape(-1, 8, 8, 1),
        ds.y,
        ds.task,
        ds.output_dim,
        ds.x_test.reshape(-1, 8, 8, 1),
        ds.y_test,
    )
    u = Unlearner.build(
        ds,
        ModelConfig(kind="cnn", width=4, depth=2),
        TrainConfig(loss="mse", lam=LAM, dtype="float64"),
        SolverConfig(),
        progress=False,
    )
    assert u.state.kernel_summary()["form"] == "full" and u.model.n_params > 0
    before = u.predict(ds.x_test[:4])
    est = u.influence(list(ds.ids[:10]), ds.x_test[:4], ds.y_test[:4])
    u.forget(list(ds.ids[:10]))
    assert np.allclose(est.delta_outputs, u.predict(ds.x_test[:4]) - before, atol=1e-8)
    assert u.predict(ds.x_test[:2].reshape(2, -1)).shape == (2, 10)  # flattened rows accepted


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kgd_trainer_reaches_the_newton_optimum(loss):
    ds = load_digits(seed=0).subset(slice(0, 80))
    cfg = ModelConfig(kind="inf-mlp")
    a = Unlearner.build(
        ds, cfg, TrainConfig(loss=loss, lam=0.1, dtype="float64"), SolverConfig(), progress=False
    )
    b = Unlearner.build(
        ds,
        cfg,
        TrainConfig(loss=loss, lam=0.1, dtype="float64", trainer="kgd"),
        SolverConfig(),
        progress=False,
    )
    train = b.state.history[0]["solve"]
    assert train["method"] == "kgd" and train["converged"] and train["iterations"] > 10
    assert np.linalg.norm(b.state.alpha - a.state.alpha) <= 1e-8 * np.linalg.norm(a.state.alpha)
