"""Nonlinear networks trained with the proximal regulariser, and forgetting from them (paper §4.3).

The risk of a network f(x; θ) (``Model.f``, not its linearisation) on the points 𝒮 is

    L_𝒮(θ) = (1/|𝒮|) Σ_{i∈𝒮} ℓ(f(x_i; θ), y_i) + (λ/2) ‖θ − θ_p‖²,   θ_p = θ_0        (NL)

(docs/maths.md, Nonlinear networks). ``train_pair`` trains it beside its linearisation
f_lin(x; θ) = f(x; θ_0) + J(x)(θ − θ_0) from the same θ_0 with the same loss and optimiser
(optax; full-batch gradient descent as the paper), recording the paper's Figure 3 quantities.
A larger λ keeps θ near θ_0, where f ≈ f_lin, so the linearised theory applies approximately.

Forgetting F from a trained θ* (Figure 2):

* ``alpha_step``: the α-space influence step with the empirical NTK at θ_0 (system (A),
  ``influence.retain_system`` / ``solve_retain``), α* = −g(f(X; θ*))/(λN) from the nonlinear
  outputs, Δθ = J(X)ᵀΔα at θ_0;
* ``theta_step``: the θ-space influence step with the Hessian of the *nonlinear* retain risk at θ*
  (Hessian-vector products, CG);
* ``newton_cg``: Newton-CG on the nonlinear retain risk (NL), the refinement and the polish of a
  training run; ``certificate`` is ‖∇L_R‖ at the published θ relative to its norm at θ*;
* ground truth: ``train`` on R from θ_0 with the same optimiser, then ``newton_cg`` to stationarity.

Nothing here is linearised unless its name says so: every reported gradient norm is that of (NL).
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import losses
from ._nt import stax
from .config import ModelConfig
from .dual import DualProblem
from .influence import retain_system, solve_retain
from .layout import KernelLayout
from .linalg import SolveInfo, SolveOptions, cg, relative_residual, restarted
from .models import Model

ACTIVATIONS = {"relu": stax.Relu, "gelu": stax.Gelu, "erf": stax.Erf}


def build_mlp(
    config: ModelConfig, input_dim: int, output_dim: int, activation: str = "relu",
    dtype=jnp.float64,
) -> Model:  # fmt: skip
    """An MLP like ``models.mlp_layers`` (``depth`` × [Dense(width) → activation], Dense(d), NTK
    parameterisation, θ_p = θ_0) with a chosen activation: ``relu`` (the paper) or a smooth one.

    Why a smooth one: a ReLU network's risk is only piecewise smooth, and its minimiser can sit on a
    kink, where gradient descent and Newton stall at a gradient norm that never reaches zero (a
    2×32 ReLU MLP on 40 points, λ = 1, float64: ‖∇L‖ oscillates near 1e-2 of its initial 0.46 for
    any learning rate). A stationarity test needs ``gelu`` or ``erf``.

    Raises:
      ValueError: an unknown activation.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
    w, b = config.w_std, config.b_std
    layers = []
    for _ in range(config.depth):
        dense = stax.Dense(config.width, W_std=w, b_std=b, parameterization="ntk")
        layers += [dense, ACTIVATIONS[activation]()]
    layers.append(stax.Dense(output_dim, W_std=w, b_std=b, parameterization="ntk"))
    init_fn, apply_fn, _ = stax.serial(*layers)
    _, params = init_fn(jax.random.PRNGKey(config.seed), (-1, input_dim))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    theta0, unravel = ravel_pytree(params)
    return Model(
        config=config, apply_fn=apply_fn, params0=params, theta0=theta0, theta_p=theta0,
        unravel=unravel, input_dim=input_dim, output_dim=output_dim, input_shape=(input_dim,),
    )  # fmt: skip


def _outputs(model: Model, theta, xf, linear: bool):
    """f(x; θ) or f_lin(x; θ), xf flat rows ``(n, n_in)`` → ``(n, d)``; traceable."""
    if not linear:
        return model.apply_fn(model.unravel(theta), xf)
    base, shift = jax.jvp(
        lambda t: model.apply_fn(model.unravel(t), xf), (model.theta0,), (theta - model.theta0,)
    )
    return base + shift


def _risk(model: Model, loss: str, linear: bool, theta, xf, y, weights, lam):
    """(NL) with per-point weights (1 on 𝒮, 0 elsewhere): Σ w ℓ / Σ w + (λ/2)‖θ − θ_p‖²."""
    f = _outputs(model, theta, xf, linear)
    data = jnp.sum(weights * losses.value(loss, f, y)) / jnp.sum(weights)
    return data + 0.5 * lam * jnp.sum((theta - model.theta_p) ** 2)


def accuracy(f: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of rows classified right, f and y ``(n, d)``: sign agreement for a scalar output
    with ±1 targets (d = 1), argmax agreement otherwise."""
    if f.shape[-1] == 1:
        right = jnp.sign(f[:, 0]) == jnp.sign(y[:, 0])
    else:
        right = jnp.argmax(f, -1) == jnp.argmax(y, -1)
    return jnp.mean(right.astype(f.dtype))


def _weights(mask, n: int, dtype):
    return jnp.ones(n, dtype) if mask is None else jnp.asarray(mask, dtype)


class PairTrace(NamedTuple):
    """Figure 3: the nonlinear network and its linearisation trained side by side.

    Per epoch t = 0 … E−1 (at θ_t, before update t): ``grad_nl``, ``grad_lin`` the norms of the
    gradients of (NL) and of the linearised risk; ``param_distance`` ‖θ_t − θ_lin,t‖ / ‖θ_lin,t‖.
    Every ``record_every`` epochs (after epoch ``record_epochs``): ``test_rmse`` RMSE between the
    two models' test outputs, ``test_acc_nl``, ``test_acc_lin`` their test accuracies. numpy arrays.
    """

    grad_nl: np.ndarray
    grad_lin: np.ndarray
    param_distance: np.ndarray
    record_epochs: np.ndarray
    test_rmse: np.ndarray
    test_acc_nl: np.ndarray
    test_acc_lin: np.ndarray


def _train_pair_fn(model: Model, loss: str, opt, chunk: int, n_records: int):
    risk_nl = partial(_risk, model, loss, False)
    risk_lin = partial(_risk, model, loss, True)
    g_nl, g_lin = jax.grad(risk_nl), jax.grad(risk_lin)

    def run(xf, y, w, xt, yt, lam):
        def epoch(carry, _):
            th, thl, s, sl = carry
            gn, gl = g_nl(th, xf, y, w, lam), g_lin(thl, xf, y, w, lam)
            u, s = opt.update(gn, s, th)
            ul, sl = opt.update(gl, sl, thl)
            dist = jnp.linalg.norm(th - thl) / jnp.linalg.norm(thl)
            out = (jnp.linalg.norm(gn), jnp.linalg.norm(gl), dist)
            return (optax.apply_updates(th, u), optax.apply_updates(thl, ul), s, sl), out

        def record(carry, _):
            carry, per_epoch = jax.lax.scan(epoch, carry, None, length=chunk)
            ft, flt = _outputs(model, carry[0], xt, False), _outputs(model, carry[1], xt, True)
            rmse = jnp.sqrt(jnp.mean((ft - flt) ** 2))
            return carry, (per_epoch, (rmse, accuracy(ft, yt), accuracy(flt, yt)))

        th0 = model.theta0
        init = (th0, th0, opt.init(th0), opt.init(th0))
        (th, thl, _, _), (per_epoch, rec) = jax.lax.scan(record, init, None, length=n_records)
        return th, thl, per_epoch, rec

    return jax.jit(run)


def train_pair(
    model: Model,
    x,
    y,
    x_test,
    y_test,
    lam: float,
    epochs: int,
    lr: float = 0.1,
    loss: str = "mse",
    record_every: int = 1,
    momentum: float | None = None,
) -> tuple[jax.Array, jax.Array, PairTrace]:
    """Train f(·; θ) and f_lin(·; θ) from θ_0 on (NL) and its linearised twin, full-batch
    ``optax.sgd(lr, momentum)`` for ``epochs`` epochs (paper §4.3: lr 0.1, no momentum).

    Arguments:
      model: a finite network (``models.build_model``) with θ_p = θ_0 (``mlp``, ``cnn``).
      x ``(N, ...)``, y ``(N, d)``: training set; x_test ``(n_t, ...)``, y_test ``(n_t, d)``.
      lam: λ; loss: ``mse`` (the paper) or ``ce``.
      record_every: test metrics every this many epochs (must divide ``epochs``).

    Returns:
      ``(θ, θ_lin, PairTrace)``, θ and θ_lin ``(P,)`` after the last epoch.

    Raises:
      ValueError: ``record_every`` does not divide ``epochs``.
    """
    if epochs % record_every:
        raise ValueError(f"record_every={record_every} must divide epochs={epochs}")
    n_records = epochs // record_every
    key = ("nl-pair", loss, float(lr), momentum, record_every, n_records)
    if key not in model.compiled:
        model.compiled[key] = _train_pair_fn(
            model, loss, optax.sgd(lr, momentum), record_every, n_records
        )
    dtype = model.theta0.dtype
    xf, xt = model.flatten_inputs(x).astype(dtype), model.flatten_inputs(x_test).astype(dtype)
    y, yt = jnp.asarray(y, dtype), jnp.asarray(y_test, dtype)
    w = jnp.ones(xf.shape[0], dtype)
    th, thl, per_epoch, rec = model.compiled[key](xf, y, w, xt, yt, jnp.asarray(lam, dtype))
    flat = [np.asarray(a).reshape(-1) for a in per_epoch]
    trace = PairTrace(
        grad_nl=flat[0],
        grad_lin=flat[1],
        param_distance=flat[2],
        record_epochs=np.arange(1, n_records + 1) * record_every,
        test_rmse=np.asarray(rec[0]),
        test_acc_nl=np.asarray(rec[1]),
        test_acc_lin=np.asarray(rec[2]),
    )
    return th, thl, trace


def _train_fn(model: Model, loss: str, opt, epochs: int):
    grad = jax.grad(partial(_risk, model, loss, False))

    def run(theta, xf, y, w, lam):
        def epoch(carry, _):
            th, s = carry
            g = grad(th, xf, y, w, lam)
            u, s = opt.update(g, s, th)
            return (optax.apply_updates(th, u), s), jnp.linalg.norm(g)

        (th, _), norms = jax.lax.scan(epoch, (theta, opt.init(theta)), None, length=epochs)
        return th, norms

    return jax.jit(run)


def train(
    model: Model,
    x,
    y,
    lam: float,
    epochs: int,
    lr: float = 0.1,
    loss: str = "mse",
    mask=None,
    momentum: float | None = None,
    theta_start: jax.Array | None = None,
) -> tuple[jax.Array, np.ndarray]:
    """Full-batch ``optax.sgd(lr, momentum)`` on (NL) over the rows in ``mask`` (all rows by
    default) from ``theta_start`` (default θ_0), ``epochs`` epochs.

    Returns:
      ``(θ (P,), gradient norms of (NL) per epoch (epochs,), at θ_t before update t)``.
    """
    key = ("nl-train", loss, float(lr), momentum, int(epochs))
    if key not in model.compiled:
        model.compiled[key] = _train_fn(model, loss, optax.sgd(lr, momentum), int(epochs))
    dtype = model.theta0.dtype
    xf = model.flatten_inputs(x).astype(dtype)
    w = _weights(mask, xf.shape[0], dtype)
    theta = model.theta0 if theta_start is None else theta_start
    th, norms = model.compiled[key](theta, xf, jnp.asarray(y, dtype), w, jnp.asarray(lam, dtype))
    return th, np.asarray(norms)


def risk(model: Model, theta, x, y, lam: float, loss: str = "mse", mask=None) -> float:
    """L_𝒮(θ) of (NL) over the rows in ``mask`` (all by default); a float."""
    dtype = model.theta0.dtype
    xf = model.flatten_inputs(x).astype(dtype)
    w = _weights(mask, xf.shape[0], dtype)
    return float(_risk(model, loss, False, theta, xf, jnp.asarray(y, dtype), w, lam))


def risk_grad(model: Model, theta, x, y, lam: float, loss: str = "mse", mask=None) -> jax.Array:
    """∇_θ L_𝒮(θ) of (NL) over the rows in ``mask`` (all by default), ``(P,)``."""
    key = ("nl-grad", loss)
    if key not in model.compiled:
        model.compiled[key] = jax.jit(jax.grad(partial(_risk, model, loss, False)))
    dtype = model.theta0.dtype
    xf = model.flatten_inputs(x).astype(dtype)
    w = _weights(mask, xf.shape[0], dtype)
    return model.compiled[key](theta, xf, jnp.asarray(y, dtype), w, jnp.asarray(lam, dtype))


def _hvp_solve_fn(model: Model, loss: str, max_iter: int):
    """Solve H v = rhs, H the Hessian of (NL) with weights w at θ (forward-over-reverse HVPs)."""
    grad = jax.grad(partial(_risk, model, loss, False))

    def run(theta, xf, y, w, lam, rhs, tol, x0, zero_start=False):
        def hvp(v):
            return jax.jvp(lambda t: grad(t, xf, y, w, lam), (theta,), (v,))[1]

        sol, it = cg(hvp, rhs, None if zero_start else x0, tol, max_iter)
        return sol, it, relative_residual(hvp, sol, rhs)

    return jax.jit(run, static_argnames=("zero_start",))


def _hessian_solve(model, loss, theta, xf, y, w, lam, rhs, tol, max_iter) -> tuple[jax.Array, SolveInfo]:  # fmt: skip
    t0 = time.perf_counter()
    key = ("nl-hvp-cg", loss, int(max_iter))
    if key not in model.compiled:
        model.compiled[key] = _hvp_solve_fn(model, loss, int(max_iter))
    fn = model.compiled[key]
    dtype = theta.dtype
    args = (theta, xf, y, w, jnp.asarray(lam, dtype), rhs, jnp.asarray(tol, dtype))
    sol, total, res, _ = restarted(
        lambda x0, zs: fn(*args, x0, zero_start=zs), jnp.zeros_like(rhs), tol, max_iter, 3, True
    )
    ok = bool(np.isfinite(res) and res <= tol)
    return sol, SolveInfo("theta-cg", total, res, ok, time.perf_counter() - t0)


def theta_step(
    model: Model,
    theta_star: jax.Array,
    x,
    y,
    forget,
    lam: float,
    loss: str = "mse",
    tol: float = 1e-10,
    max_iter: int = 2000,
) -> tuple[jax.Array, SolveInfo]:
    """Δθ of removing F by the θ-space influence step on the nonlinear network (docs/maths.md,
    Eqs. 1–4 with f in place of f_lin): H_R Δθ = (1/N) Σ_{i∈F} ∇[ℓ_i + (λ/2)‖θ − θ_p‖²] at θ*, with
    H_R = ∇²[(1/N) Σ_{i∈R} ℓ_i + (N_R/N)(λ/2)‖θ − θ_p‖²] at θ*, by HVPs and CG.

    H_R includes the residual term Σ (f_i − y_i) ∇²f_i, which can make it indefinite at a small λ;
    CG then fails to meet ``tol`` and ``SolveInfo.converged`` says so (NaN is not converged).

    Arguments:
      forget: bool ``(N,)``; tol: CG's relative residual (true residual recomputed).

    Returns:
      ``(Δθ (P,), SolveInfo)``; θ after the deletion is θ* + Δθ.
    """
    dtype = theta_star.dtype
    xf = model.flatten_inputs(x).astype(dtype)
    y = jnp.asarray(y, dtype)
    m_f = jnp.asarray(forget, dtype)
    n, n_f = xf.shape[0], float(jnp.sum(m_f))
    # (NL) over F with weight 1/N is (N_F/N) × the risk over F normalised by N_F; likewise for R
    rhs = (n_f / n) * risk_grad(model, theta_star, x, y, lam, loss, m_f)
    retain_scale = (n - n_f) / n
    # H_R = (N_R/N) ∇²(NL over R), so H_R Δθ = rhs ⇔ ∇²(NL over R) Δθ = rhs / (N_R/N)
    return _hessian_solve(
        model, loss, theta_star, xf, y, 1.0 - m_f, lam, rhs / retain_scale, tol, max_iter
    )


def alpha_step(
    model: Model,
    theta_star: jax.Array,
    x,
    y,
    forget,
    lam: float,
    k: jax.Array,
    loss: str = "mse",
    options: SolveOptions | None = None,
) -> tuple[jax.Array, SolveInfo]:
    """Δθ of removing F by the α-space influence step with the empirical NTK at θ_0 (the paper's
    §4.3): α* = −g(f(X; θ*)) / (λN) from the nonlinear outputs (docs/maths.md, Eq. (O)), Δα_R
    from system (A) (``influence.retain_system``, ``solve_retain``), Δα_F = −α*_F, and
    Δθ = J(X)ᵀΔα with J at θ_0.

    Arguments:
      k: K(X, X) at θ_0 in the full form ``(N·d, N·d)`` (``Model.train_kernel(x, "full")``).
      forget: bool ``(N,)``; options: the solve of (A) (default: Cholesky, tol 1e-10).

    Returns:
      ``(Δθ (P,), SolveInfo)``.
    """
    dtype = theta_star.dtype
    options = options or SolveOptions(method="alpha-cholesky", tol=1e-10)
    xf = model.flatten_inputs(x).astype(dtype)
    y = jnp.asarray(y, dtype)
    n = xf.shape[0]
    f_star = _outputs(model, theta_star, xf, False)
    alpha_star = -losses.grad(loss, f_star, y) / (lam * n)
    forget = jnp.asarray(forget, bool)
    layout = KernelLayout("full", model.output_dim)
    k = jnp.asarray(k, dtype)
    problem = DualProblem(k, layout, model.offset(xf), y, jnp.ones(n, bool), float(lam), loss)
    system = retain_system(problem, alpha_star, forget, f_star)
    retained = problem._replace(mask=~forget)
    delta_r, info = solve_retain(retained, system, options)
    delta_alpha = delta_r - alpha_star * forget[:, None].astype(dtype)
    return model.vjp(xf, delta_alpha), info


class NewtonReport(NamedTuple):
    """Newton-CG on (NL): gradient norms ‖∇L‖ at the start and after each step, the inner solves,
    the step lengths of the line search, and whether ``tol`` was met."""

    grad_norms: list[float]
    solves: list[SolveInfo]
    step_lengths: list[float]
    converged: bool


def newton_cg(
    model: Model,
    theta: jax.Array,
    x,
    y,
    lam: float,
    loss: str = "mse",
    mask=None,
    tol: float = 1e-8,
    max_steps: int = 10,
    cg_tol: float = 1e-10,
    cg_max_iter: int = 2000,
    relative: bool = True,
) -> tuple[jax.Array, NewtonReport]:
    """Newton's method on (NL) over the rows in ``mask``: solve ∇²L δ = −∇L by HVPs and CG, then
    a backtracking (Armijo) line search on L; a direction that does not descend (an indefinite
    Hessian) is replaced by −∇L. Stops when ‖∇L‖ ≤ tol·‖∇L(θ_start)‖ (``relative``) or ≤ tol.

    Returns:
      ``(θ, NewtonReport)``; ``converged`` is false after ``max_steps`` steps above tolerance or a
      line search that found no decrease.
    """
    dtype = theta.dtype
    xf = model.flatten_inputs(x).astype(dtype)
    y = jnp.asarray(y, dtype)
    w = _weights(mask, xf.shape[0], dtype)
    g = risk_grad(model, theta, x, y, lam, loss, w)
    norms = [float(jnp.linalg.norm(g))]
    target = tol * norms[0] if relative else tol
    solves, lengths = [], []
    value = risk(model, theta, x, y, lam, loss, w)
    for _ in range(max_steps):
        if norms[-1] <= target:
            break
        direction, info = _hessian_solve(model, loss, theta, xf, y, w, lam, -g, cg_tol, cg_max_iter)
        solves.append(info)
        slope = float(jnp.vdot(g, direction))
        if not (np.isfinite(slope) and slope < 0):
            direction, slope = -g, -(norms[-1] ** 2)
        t = 1.0
        for _ in range(40):
            trial = theta + t * direction
            new_value = risk(model, trial, x, y, lam, loss, w)
            if new_value <= value + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            return theta, NewtonReport(norms, solves, lengths, False)
        theta, value = trial, new_value
        lengths.append(t)
        g = risk_grad(model, theta, x, y, lam, loss, w)
        norms.append(float(jnp.linalg.norm(g)))
    return theta, NewtonReport(norms, solves, lengths, norms[-1] <= target)


class Certificate(NamedTuple):
    """The honest certificate of a deletion from a nonlinear network: ``grad_norm`` = ‖∇L_R‖ of
    (NL) over the retain set at the published θ, ``reference`` = its norm at the previous θ (θ*),
    ``relative`` their ratio, ``tol`` and whether it was met."""

    grad_norm: float
    reference: float
    relative: float
    tol: float
    met: bool


def certificate(
    model: Model, theta_new, theta_prev, x, y, retain, lam: float, loss: str = "mse",
    tol: float = 1e-6,
) -> Certificate:  # fmt: skip
    """‖∇L_R(θ_new)‖ / ‖∇L_R(θ_prev)‖ of (NL) over ``retain`` (bool ``(N,)``), against ``tol``."""
    gn = float(jnp.linalg.norm(risk_grad(model, theta_new, x, y, lam, loss, retain)))
    g0 = float(jnp.linalg.norm(risk_grad(model, theta_prev, x, y, lam, loss, retain)))
    rel = gn / g0 if g0 > 0 else (0.0 if gn == 0 else float("inf"))
    return Certificate(gn, g0, rel, tol, bool(np.isfinite(rel) and rel <= tol))


def refine(
    model: Model, theta_step_result, theta_prev, x, y, forget, lam: float, loss: str = "mse",
    tol: float = 1e-6, max_steps: int = 10,
) -> tuple[jax.Array, NewtonReport, Certificate]:  # fmt: skip
    """Newton-CG on the nonlinear retain risk from an influence step's θ until the certificate
    (``certificate``, relative to θ_prev = θ*) meets ``tol``.

    Returns:
      ``(θ, NewtonReport, Certificate of θ)``.
    """
    retain = ~np.asarray(forget, bool)
    g0 = float(jnp.linalg.norm(risk_grad(model, theta_prev, x, y, lam, loss, retain)))
    theta, report = newton_cg(
        model, theta_step_result, x, y, lam, loss, retain, tol=tol * g0, max_steps=max_steps,
        relative=False,
    )  # fmt: skip
    return theta, report, certificate(model, theta, theta_prev, x, y, retain, lam, loss, tol)


def relative_distance(a, b) -> float:
    """‖a − b‖ / ‖b‖ (the paper's relative distance of θ_unlearned to θ_retrained)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_perturbation(theta_star, theta_retrain, seed: int = 0) -> np.ndarray:
    """The paper's random baseline: θ* + ρ, ρ a uniformly random direction with
    ‖ρ‖ = ‖θ_retrain − θ*‖ (bench/figure1.py)."""
    theta_star = np.asarray(theta_star)
    rho = np.random.default_rng(seed).standard_normal(theta_star.shape)
    scale = np.linalg.norm(np.asarray(theta_retrain, np.float64) - theta_star) / np.linalg.norm(rho)
    return theta_star + (rho * scale).astype(theta_star.dtype)
