"""The linearised CNN (``--model cnn``) and the ``cifar2`` loader.

As in ``test_core_exactness``: the oracle materialises the Jacobian J(X) (N·d × P) of a stax CNN
built here from the same layers and θ_0, and retrains the linearised model in θ-space by the
normal equations (squared error, float64). Nothing in it uses the engine's kernels, dual variables
or solvers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from service_core import (
    Dataset,
    DatasetError,
    ModelConfig,
    SolverConfig,
    TrainConfig,
    Unlearner,
    build_model,
)
from service_core._nt import nt, stax
from service_core.data import load_cifar2, load_dataset
from service_core.dual import DualProblem, kernel_gradient_descent, newton
from service_core.influence import Refinement, deletion_step
from service_core.layout import KernelLayout
from service_core.linalg import SolveOptions

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
LAM = 1e-2
N_TRAIN, SIDE, CHANNELS = 40, 8, 3
CFG = ModelConfig(kind="cnn", width=6, depth=2, seed=3)
SOLVER = SolveOptions("alpha-cholesky", 1e-12, 2000, 4096)


def empirical_ntk(model, x, form, block_size=128, progress=False):
    return model.train_kernel(x, form, None, progress, block_size)[0]


@pytest.fixture(scope="module")
def images():
    """Smooth random 8×8 RGB images (a blurred noise field, so the convolutions see structure)."""
    rng = np.random.default_rng(0)
    noise = rng.uniform(size=(N_TRAIN + 12, SIDE + 2, SIDE + 2, CHANNELS))
    x = sum(noise[:, i : i + SIDE, j : j + SIDE] for i in range(3) for j in range(3)) / 9.0
    return x[:N_TRAIN], x[N_TRAIN:]


def oracle_network(config: ModelConfig, d: int):
    """The CNN's stax ``apply_fn`` on images (N, H, W, C), built here from the layer list."""
    layers = []
    for _ in range(config.depth):
        layers += [
            stax.Conv(
                config.width,
                (3, 3),
                padding="SAME",
                W_std=math.sqrt(2.0),
                b_std=0.1,
                parameterization="ntk",
            ),
            stax.Relu(),
            stax.AvgPool((2, 2), strides=(2, 2)),
        ]
    layers += [
        stax.Flatten(),
        stax.Dense(d, W_std=math.sqrt(2.0), b_std=0.1, parameterization="ntk"),
    ]
    return stax.serial(*layers)[1]


def jacobian_oracle(model, x: np.ndarray):
    """f(X; θ_0) (N, d) and J(X) (N·d, P) in float64, from the oracle network on image inputs."""
    apply_fn = oracle_network(model.config, model.output_dim)
    xi = jnp.asarray(x, jnp.float64)
    f = lambda t: apply_fn(model.unravel(t), xi)  # noqa: E731
    theta0 = jnp.asarray(model.theta0, jnp.float64)
    out = np.asarray(f(theta0))
    return out, np.asarray(jax.jacfwd(f)(theta0)).reshape(out.size, -1)


def retrain_mse(model, x, y, lam=LAM):
    """θ minimising (1/n) Σ ½‖f_lin(x_i; θ) − y_i‖² + (λ/2)‖θ − θ_p‖² (normal equations)."""
    theta0 = np.asarray(model.theta0, np.float64)
    theta_p = np.asarray(model.theta_p, np.float64)
    fx0, jac = jacobian_oracle(model, x)
    n, p = len(x), jac.shape[1]
    base = fx0.reshape(-1) + jac @ (theta_p - theta0)
    return theta_p + np.linalg.solve(
        jac.T @ jac / n + lam * np.eye(p), jac.T @ (y.reshape(-1) - base) / n
    )


def rel(a, b, ref):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(ref))


# -- the model ------------------------------------------------------------------------------
def test_cnn_shapes_and_layout(images):
    x, _ = images
    model = build_model(CFG, (SIDE, SIDE, CHANNELS), 2, jnp.float64)
    assert model.input_shape == (SIDE, SIDE, CHANNELS) and model.input_dim == SIDE * SIDE * CHANNELS
    # conv 3·3·3·6 + 6, conv 3·3·6·6 + 6, dense (2·2·6)·2 + 2
    assert model.n_params == (81 * 2 + 6) + (54 * 6 + 6) + (24 * 2 + 2)
    assert np.array_equal(model.theta_p, model.theta0)
    flat, img = model.flatten_inputs(x), model.image_inputs(x.reshape(N_TRAIN, -1))
    assert flat.shape == (N_TRAIN, 192) and img.shape == (N_TRAIN, SIDE, SIDE, CHANNELS)
    expect = oracle_network(CFG, 2)(model.params0, jnp.asarray(x))
    assert np.allclose(model.f(model.theta0, x), expect, rtol=0, atol=1e-14)
    assert np.allclose(model.apply_fn(model.params0, flat), expect, rtol=0, atol=1e-14)
    assert np.allclose(model.apply_fn(model.params0, jnp.asarray(x)), expect, rtol=0, atol=1e-14)
    gray = build_model(CFG, (SIDE, SIDE), 1, jnp.float64)  # (H, W) is one channel
    assert gray.input_shape == (SIDE, SIDE, 1)
    with pytest.raises(ValueError, match="image inputs"):
        build_model(CFG, (192,), 2)
    with pytest.raises(ValueError, match="KernelModel"):
        build_model(ModelConfig(kind="inf-cnn"), (SIDE, SIDE, CHANNELS), 2)
    assert CFG.resolved_kernel_form() == "full"
    assert ModelConfig(kind="inf-cnn").resolved_kernel_form() == "trace"


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)])
def test_structured_derivatives_equal_jacobian_contraction(images, dtype, tol, capsys):
    """The engine's full-form NTK (STRUCTURED_DERIVATIVES, blocked and mirrored) against
    neural-tangents' JACOBIAN_CONTRACTION on the whole block, and against J Jᵀ in float64."""
    x, _ = images
    x = x[:20]
    model = build_model(CFG, (SIDE, SIDE, CHANNELS), 2, dtype)
    t0 = time.perf_counter()
    k = empirical_ntk(model, x, "full", block_size=8)  # 3×3 blocks
    t_sd = time.perf_counter() - t0
    jc = nt.empirical_ntk_fn(
        model.apply_fn,
        trace_axes=(),
        vmap_axes=0,
        implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION,
    )
    t0 = time.perf_counter()
    k4 = np.asarray(jc(model.flatten_inputs(x.astype(dtype)), None, model.params0))
    t_jc = time.perf_counter() - t0
    k_jc = k4.transpose(0, 2, 1, 3).reshape(40, 40)
    assert k.shape == (40, 40) and k.dtype == dtype
    assert rel(k, k_jc, k_jc) < tol
    with capsys.disabled():
        print(
            f"\n  CNN NTK 20 points, {np.dtype(dtype).name}: SD (blocks of 8) {t_sd:.2f} s, JC {t_jc:.2f} s (compile included)"
        )
    if dtype == jnp.float64:
        _, jac = jacobian_oracle(model, x)
        assert rel(k, jac @ jac.T, jac @ jac.T) < 1e-12
        assert (
            np.abs(k_jc - np.diag(np.diag(k_jc))).max() > 1e-3
        )  # off-output blocks: the full form matters


# -- forgetting equals retraining ----------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2])
def test_alpha_space_forget_equals_retraining_of_the_linearised_cnn(images, d):
    x, xt = images
    rng = np.random.default_rng(d)
    y = (
        rng.normal(size=(N_TRAIN, d))
        if d > 1
        else np.where(rng.uniform(size=(N_TRAIN, 1)) < 0.5, -1.0, 1.0)
    )
    model = build_model(CFG, (SIDE, SIDE, CHANNELS), d, jnp.float64)
    assert model.n_params > N_TRAIN * d  # J(X) can have full row rank
    k = jnp.asarray(empirical_ntk(model, x, "full", block_size=16))
    xj = jnp.asarray(x)
    problem = DualProblem(
        k,
        KernelLayout("full", d),
        model.offset(xj),
        jnp.asarray(y),
        jnp.ones(N_TRAIN, bool),
        LAM,
        "mse",
    )
    alpha, info = newton(problem, jnp.zeros_like(problem.y), 1e-12, 5, SOLVER)
    assert info.converged
    theta = model.theta_p + model.vjp(xj, alpha)
    theta_full = retrain_mse(model, x, y)
    theta_p = np.asarray(model.theta_p)
    assert rel(theta, theta_full, theta_full - theta_p) < 1e-8

    forget = np.zeros(N_TRAIN, bool)
    forget[::4] = True
    deletion = deletion_step(
        problem, alpha, jnp.asarray(forget), SOLVER, Refinement(1e-12, 5, SOLVER)
    )
    dtheta = model.theta(xj, deletion.delta_alpha, delta=True)
    theta_ret = retrain_mse(model, x[~forget], y[~forget])
    err = rel(theta + dtheta, theta_ret, theta_ret - theta_p)
    assert err < 1e-8, err  # the single α-space step is exact retraining for squared error
    assert rel(theta_full, theta_ret, theta_ret - theta_p) > 1e3 * err
    assert rel(model.theta_p + model.vjp(xj, deletion.alpha), theta_ret, theta_ret - theta_p) < 1e-8
    # Eq. 8 at test points: Δf = J(X_t) Δθ is the actual change of the retrained model
    xtj = jnp.asarray(xt)
    df = model.f0_and_jvp(xtj, dtheta)[1]
    actual = model.f_lin(jnp.asarray(theta_ret), xtj) - model.f_lin(jnp.asarray(theta_full), xtj)
    assert np.allclose(df, actual, rtol=0, atol=1e-9) and np.abs(actual).max() > 1e-3


def test_kernel_gradient_descent_on_the_full_form(images):
    x, _ = images
    model = build_model(CFG, (SIDE, SIDE, CHANNELS), 2, jnp.float64)
    k = jnp.asarray(empirical_ntk(model, x, "full"))
    y = jnp.asarray(np.random.default_rng(5).normal(size=(N_TRAIN, 2)))
    problem = DualProblem(
        k,
        KernelLayout("full", 2),
        model.offset(jnp.asarray(x)),
        y,
        jnp.ones(N_TRAIN, bool),
        1e-1,
        "mse",
    )
    alpha_n, _ = newton(problem, jnp.zeros_like(y), 1e-12, 5, SOLVER)
    alpha_k, info = kernel_gradient_descent(problem, jnp.zeros_like(y), tol=1e-11, max_steps=50_000)
    assert info.converged and rel(alpha_k, alpha_n, alpha_n) < 1e-8


def test_unlearner_serves_a_cnn(images):
    """Through the engine unchanged: build (empirical NTK, full form), forget, predict."""
    x, xt = images
    rng = np.random.default_rng(7)
    y = np.where(rng.uniform(size=(N_TRAIN, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
    ids = np.array([f"img-{i:02d}" for i in range(N_TRAIN)])
    ds = Dataset(
        "images", ids, x.astype(np.float32), y, "regression", 1, xt.astype(np.float32), None
    )
    u = Unlearner.build(
        ds, CFG, TrainConfig(loss="mse", lam=LAM, dtype="float64"), SolverConfig(), progress=False
    )
    forget = list(ids[::4])
    u.forget(forget)
    keep = ~np.isin(ids, forget)
    theta_ret = retrain_mse(u.model, x[keep], y[keep].astype(np.float64))
    out = u.predict(xt)
    expect = np.asarray(u.model.f_lin(jnp.asarray(theta_ret), jnp.asarray(xt)))
    assert np.allclose(out, expect, rtol=0, atol=1e-8)
    assert np.allclose(
        u.predict(xt.reshape(len(xt), -1)), out, rtol=0, atol=0
    )  # flattened rows too


# -- cifar2 loader --------------------------------------------------------------------------
def test_cifar2_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    y = np.repeat(np.array([0, 1], np.uint8), 15)  # one class after the other, as in the real files
    np.savez(tmp_path / "toy_train.npz", x=x, y=y)
    np.savez(tmp_path / "toy.npz", x=x[:10], y=y[:10] * 0 + np.arange(10, dtype=np.uint8) % 2)
    ds = load_dataset(f"cifar2:{tmp_path / 'toy_train.npz'}", seed=3, n_train=10)
    assert ds.task == "classification" and ds.output_dim == 2 and ds.x.shape == (10, 4, 4, 3)
    assert ds.x.dtype == np.float32 and 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert np.bincount(ds.y).tolist() == [5, 5]  # balanced over the classes
    index = np.array([int(i.rsplit("-", 1)[1]) for i in ds.ids])
    assert (
        ds.ids[0].startswith("cifar2-toy_train-")
        and np.allclose(ds.x, x[index] / 255.0)
        and np.array_equal(ds.y, y[index])
    )
    assert not np.array_equal(index, np.sort(index))  # shuffled
    assert ds.x_test.shape == (10, 4, 4, 3)  # the sibling toy.npz is the test set
    assert load_cifar2(tmp_path / "toy_train.npz", test_path=False).x_test is None
    same = load_cifar2(tmp_path / "toy_train.npz", seed=3, n_train=10)
    assert np.array_equal(same.ids, ds.ids)
    assert not np.array_equal(
        load_cifar2(tmp_path / "toy_train.npz", seed=4, n_train=10).ids, ds.ids
    )
    pm = load_cifar2(
        tmp_path / "toy_train.npz",
        seed=3,
        n_train=10,
        binary_pm1=True,
        test_path=tmp_path / "toy.npz",
    )
    assert (
        pm.task == "regression"
        and pm.output_dim == 1
        and pm.y.shape == (10, 1)
        and pm.y.dtype == np.float32
    )
    assert np.array_equal(pm.y[:, 0], 2.0 * ds.y - 1.0) and set(np.unique(pm.y_test)) == {-1.0, 1.0}
    assert np.array_equal(pm.targets(), pm.y)
    np.savez(tmp_path / "three.npz", x=x, y=np.arange(30) % 3)
    with pytest.raises(DatasetError, match="two classes"):
        load_cifar2(tmp_path / "three.npz", binary_pm1=True)
    with pytest.raises(DatasetError, match="15 images"):
        load_cifar2(tmp_path / "toy_train.npz", n_train=40)
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(DatasetError, match="uint8"):
        load_cifar2(tmp_path / "float.npz")
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar2(tmp_path / "absent.npz")


@pytest.mark.skipif(
    not (CIFAR / "airplane_automobile_train.npz").exists(),
    reason="../shared/data/cifar10 is absent",
)
def test_cifar2_real_files():
    ds = load_cifar2(
        CIFAR / "airplane_automobile_train.npz", seed=0, n_train=100, n_test=40, binary_pm1=True
    )
    assert ds.x.shape == (100, 32, 32, 3) and ds.x_test.shape == (40, 32, 32, 3)
    assert ds.name.startswith("cifar2:") and ds.ids[0].startswith(
        "cifar2-airplane_automobile_train-"
    )
    assert (ds.y == 1).sum() == 50 and (ds.y_test == -1).sum() == 20
    full = load_dataset(f"cifar2:{CIFAR / 'airplane_automobile_train.npz'}")
    assert full.n == 2000 and full.x_test.shape == (2000, 32, 32, 3) and len(set(full.ids)) == 2000
