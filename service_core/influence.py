"""Influence of removing a forget set F, in α-space (the product) and θ-space (the baseline).

math.md, Influence of removing F in α-space (Eqs. 5, 10–12): Δα_F = −α*_F and Δα_R solves

    (W_R K_RR + λ N_R I) Δα_R = λ N_F α*_R + W_R K_RF α*_F                (A)

through its SPD form (B). Δθ = J(X)ᵀ Δα (one VJP). Test-point changes (Eqs. 8–9) come from kernels
or, for a finite network, from J(X_t) Δθ, which is the same number.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .models import Model
from .ntk import kernel_matvec
from .solvers import SolveInfo, cg, solve_newton_system, solve_paper_form
from .training import DualProblem, NewtonInfo, newton, stationarity


class Deletion(NamedTuple):
    """The result of removing F from a trained dual model.

    Attributes:
      alpha: α after the deletion ``(N, d)`` (rows of F are 0; N counts F still).
      delta_alpha: Δα ``(N, d)``, including Δα_F = −α*_F.
      step: the influence solve of system (A).
      refine: Newton refinement on the retain risk, or ``None`` if not run.
      residual: relative stationarity residual of ``alpha`` on the retain risk.
    """

    alpha: jax.Array
    delta_alpha: jax.Array
    step: SolveInfo
    refine: NewtonInfo | None
    residual: float


class RetainSystem(NamedTuple):
    """System (A) of math.md for removing F, assembled on the layout of the current state.

    Attributes:
      b: right-hand side λ N_F α*_R + W_R K_RF α*_F ``(N, d)``, zero off R.
      w: W_i at the trained outputs ``(N, d, d)``, ``None`` for squared error (W = I).
      s: S = W^{1/2} ``(N, d, d)`` or ``None``.
      c: the shift λ N_R.
      n_total: N, the size of the current training set (the paper form divides by it).
    """

    b: jax.Array
    w: jax.Array | None
    s: jax.Array | None
    c: float
    n_total: int

    def take(self, rows: np.ndarray, capacity: int) -> RetainSystem:
        """The same system on a compacted layout: row ``i`` of the result is row ``rows[i]`` of this
        one, zero rows pad it to ``capacity``."""

        def gather(
            a,
        ):  # on the host: these are N·d² values at most (a sharded take fails XLA's verifier)
            if a is None:
                return None
            out = np.asarray(a)[rows]
            return jnp.asarray(np.pad(out, [(0, capacity - len(rows))] + [(0, 0)] * (a.ndim - 1)))

        return self._replace(b=gather(self.b), w=gather(self.w), s=gather(self.s))


def retain_system(
    problem: DualProblem,
    alpha_star: jax.Array,
    forget: jax.Array,
    f_star: jax.Array | None = None,
    k_rf_alpha_f: jax.Array | None = None,
) -> RetainSystem:
    """Assemble system (A) for removing ``forget`` from the model trained on ``problem``.

    Reads only the N_F·d columns of K that belong to F (K_RF α*_F), plus one pass over K for the
    trained outputs f* = f_0 + K α* unless ``f_star`` is given.

    Arguments:
      problem: the dual risk of the current training set D (its mask: the active points).
      alpha_star: α* ``(N, d)``, optimal on D.
      forget: bool ``(N,)``, F ⊂ D.
      f_star: f* ``(N, d)`` if known.
      k_rf_alpha_f: K_RF α*_F ``(N, d)`` on R if the caller has it (``Unlearner`` computes it as
        (f* − f_0)_R − K_RR α*_R when F is the larger set: a pass over K_RR instead of N_F·d columns).

    Returns:
      ``RetainSystem`` (math.md Eq. (A)).
    """
    dtype = alpha_star.dtype
    retain = problem.mask & ~forget
    m_r = retain[:, None].astype(dtype)
    n_forget, n_retain = int(jnp.sum(forget)), int(jnp.sum(retain))
    if f_star is None:
        f_star = problem.f0 + kernel_matvec(
            problem.k, alpha_star * problem.mask[:, None], problem.form
        )
    w = losses.hessian(problem.loss, f_star, problem.y)
    s = losses.hessian_sqrt(problem.loss, f_star, problem.y)
    if k_rf_alpha_f is None:
        k_rf_alpha_f = _columns_matvec(
            problem.k, problem.form, np.flatnonzero(np.asarray(forget)), alpha_star
        )
    k_rf_alpha_f = m_r * k_rf_alpha_f
    b = problem.lam * n_forget * alpha_star * m_r + losses.apply_blocks(w, k_rf_alpha_f) * m_r
    return RetainSystem(b, w, s, problem.lam * n_retain, problem.n)


def solve_retain(
    k: jax.Array, form: str, system: RetainSystem, retain: jax.Array, solver: dict
) -> tuple[jax.Array, SolveInfo]:
    """Δα_R from system (A): through its SPD form (B) (``solvers.solve_newton_system``), or the
    paper's premultiplied form when ``solver['method']`` is ``alpha-paper``.

    Arguments:
      k: K in the layout of ``system`` (the current one, or K_RR compacted).
      retain: bool ``(rows,)``, R in that layout.
      solver: keyword arguments of ``solvers.solve_spd``.

    Returns:
      ``(Δα_R (rows, d), SolveInfo)``, zero off R.
    """
    m_r = retain[:, None].astype(system.b.dtype)
    if solver.get("method") == "alpha-paper":
        delta_r, info = solve_paper_form(
            k,
            form,
            system.w,
            retain,
            system.b,
            system.c,
            system.n_total,
            solver["tol"],
            solver["max_iter"],
        )
    else:
        delta_r, info = solve_newton_system(k, form, system.s, retain, system.b, system.c, **solver)
    return delta_r * m_r, info


def influence_step(
    problem: DualProblem,
    alpha_star: jax.Array,
    forget: jax.Array,
    solver: dict,
    f_star: jax.Array | None = None,
) -> tuple[jax.Array, SolveInfo]:
    """Δα for removing ``forget`` from the model trained on ``problem`` (α* optimal there), solved
    on the current layout (rows of F masked, not removed).

    Arguments:
      problem: the dual risk of the current training set D (its mask: the active points).
      alpha_star: α* ``(N, d)``.
      forget: bool ``(N,)``, F ⊂ D.
      solver: keyword arguments of ``solvers.solve_spd``; ``method`` ``alpha-paper`` solves the
        paper's premultiplied form instead of (A)/(B) (``solvers.solve_paper_form``).
      f_star: the trained outputs f_0 + K α*, if known (saves one pass over K).

    Returns:
      ``(Δα, SolveInfo)``, Δα ``(N, d)`` with Δα_F = −α*_F (math.md Eq. (A)).
    """
    system = retain_system(problem, alpha_star, forget, f_star)
    delta_r, info = solve_retain(problem.k, problem.form, system, problem.mask & ~forget, solver)
    return delta_r - alpha_star * forget[:, None].astype(alpha_star.dtype), info


def _columns_matvec(k: jax.Array, form: str, rows: np.ndarray, alpha: jax.Array) -> jax.Array:
    """K[:, F] α_F for the points ``rows`` of F: reads N_F·d columns of K, not all of it.

    K is symmetric, so on one device this reads the rows K[F, :] instead (contiguous in memory,
    several times faster than a strided column gather) and computes K[F, :]ᵀ α_F.
    """
    d = alpha.shape[1]
    idx = (rows[:, None] * d + np.arange(d)).ravel() if form == "full" else rows
    a_f = alpha[rows].reshape(-1) if form == "full" else alpha[rows]
    hi = jax.lax.Precision.HIGHEST
    if len(k.sharding.device_set) == 1:
        out = jnp.matmul(a_f.T, jnp.take(k, jnp.asarray(idx), axis=0), precision=hi)
        return out.reshape(alpha.shape) if form == "full" else out.T
    return jnp.matmul(k[:, idx], a_f, precision=hi).reshape(alpha.shape)


def forget(
    problem: DualProblem,
    alpha_star: jax.Array,
    forget_mask: jax.Array,
    solver: dict,
    refine: bool,
    refine_tol: float,
    max_refine: int,
) -> Deletion:
    """The influence step and, if ``refine``, Newton on the retain risk until its relative
    stationarity residual is at most ``refine_tol`` (math.md, Exactness beyond one step), and for
    cross-entropy until α's error is below ``refine_tol`` relative to ‖Δα‖ (``training.newton``).

    For squared error the step alone equals exact retraining; refinement then only certifies it.
    """
    delta, step = influence_step(problem, alpha_star, forget_mask, solver)
    retain_problem = problem._replace(mask=problem.mask & ~forget_mask)
    alpha = alpha_star + delta
    refined = None
    if refine:
        change = None if problem.loss == "mse" else float(jnp.linalg.norm(delta))
        alpha, refined = newton(retain_problem, alpha, refine_tol, max_refine, solver, change)
        residual = refined.residual
    else:
        _, residual = stationarity(retain_problem, alpha)
    return Deletion(alpha, alpha - alpha_star, step, refined, residual)


def delta_theta(model: Model, x: jax.Array, delta_alpha: jax.Array) -> jax.Array:
    """Δθ = J(X)ᵀ Δα by one VJP; x ``(N, ...)``, Δα ``(N, d)`` → ``(P,)``."""
    return model.vjp(x, delta_alpha)


def test_point_changes(
    model: Model,
    theta: jax.Array,
    dtheta: jax.Array,
    x_test: jax.Array,
    y_test: jax.Array,
    loss: str,
) -> tuple[jax.Array, jax.Array]:
    """Eqs. 8–9: Δf(X_t) = J(X_t) Δθ (= K(X_t, X) Δα) and Δℓ_t ≈ g_tᵀ Δf(x_t).

    Arguments:
      theta: current θ ``(P,)``; dtheta: Δθ ``(P,)``; x_test ``(n, ...)``; y_test targets ``(n, d)``.

    Returns:
      ``(Δf (n, d), Δℓ (n,))``; g_t is taken at the current outputs f_lin(x_t; θ).
    """
    base, shift = model.f0_and_jvp(x_test, theta - model.theta0)
    _, df = model.f0_and_jvp(x_test, dtheta)
    g = losses.grad(loss, base + shift, y_test)
    return df, jnp.sum(g * df, axis=-1)


_THETA_SOLVERS: dict = {}


def _theta_solve(
    apply_fn,
    unravel,
    loss,
    theta0,
    theta_p,
    theta_star,
    xf,
    y,
    m_f,
    m_r,
    lam,
    tol,
    x0,
    max_iter,
    zero_start=False,
):
    """One CG (re)start of the θ-space system, traced once per shape: data are arguments, so XLA
    neither recompiles per call nor constant-folds the network over captured inputs."""
    n = jnp.sum(m_f) + jnp.sum(m_r)

    def f_lin(theta):
        base, shift = jax.jvp(lambda t: apply_fn(unravel(t), xf), (theta0,), (theta - theta0,))
        return base + shift

    def point_risk(theta, weights):
        reg = 0.5 * lam * jnp.sum((theta - theta_p) ** 2)
        return jnp.sum(weights * (losses.value(loss, f_lin(theta), y) + reg)) / n

    grad_r = jax.grad(point_risk)
    rhs = grad_r(theta_star, m_f)

    def hvp(v):  # forward-over-reverse: jvp of the retain gradient
        return jax.jvp(lambda t: grad_r(t, m_r), (theta_star,), (v,))[1]

    sol, it = cg(hvp, rhs, None if zero_start else x0, tol, max_iter)
    res = jnp.linalg.norm(rhs - hvp(sol)) / jnp.maximum(
        jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny
    )
    return sol, it, res


def theta_space_delta(
    model: Model,
    theta_star: jax.Array,
    x: jax.Array,
    y: jax.Array,
    forget_mask: jax.Array,
    lam: float,
    loss: str,
    tol: float = 1e-10,
    max_iter: int = 5000,
    retain_mask: jax.Array | None = None,
) -> tuple[jax.Array, SolveInfo]:
    """The parameter-space baseline (math.md Eqs. 1–4): H_R Δθ = (1/N) Σ_{i∈F} ∇θ[ℓ_i + (λ/2)‖θ − θ_p‖²],

    H_R = (1/N) Σ_{i∈R} J_iᵀ W_i J_i + (N_R/N) λ I, applied by Hessian-vector products
    (forward-over-reverse on the linearised retain risk), solved by CG, never materialised.
    Compiled once per (model, loss, shapes); later calls with the same shapes reuse it.

    Arguments:
      theta_star: θ* ``(P,)``; x ``(C, ...)``; y targets ``(C, d)``; forget_mask bool ``(C,)``;
      retain_mask: bool ``(C,)``, default every row not in F (pass it when rows are padding).
      tol: relative residual of CG (true residual recomputed); max_iter: most CG iterations.

    Returns:
      ``(Δθ (P,), SolveInfo)``; θ after the deletion is θ* + Δθ.
    """
    t0 = time.perf_counter()
    key = (id(model), loss, int(max_iter))
    cached = _THETA_SOLVERS.get(key)
    if cached is None or cached[0] is not model:
        fn = jax.jit(
            partial(_theta_solve, model.apply_fn, model.unravel, loss, max_iter=int(max_iter)),
            static_argnames=("zero_start",),
        )
        cached = _THETA_SOLVERS[key] = (model, fn)
    fn = cached[1]
    dtype = theta_star.dtype
    m_f = forget_mask.astype(dtype)
    m_r = (1.0 - m_f) if retain_mask is None else retain_mask.astype(dtype)
    args = (
        model.theta0,
        model.theta_p,
        theta_star,
        model.flatten_inputs(x),
        y,
        m_f,
        m_r,
        jnp.asarray(lam, dtype),
        jnp.asarray(tol, dtype),
    )
    # CG's recursive residual drifts from the true one in float32: restart from the answer while
    # the true residual misses the tolerance (as solvers.solve_spd does for α-space CG).
    sol, total = jnp.zeros_like(theta_star), 0
    for attempt in range(4):
        sol, it, res = fn(*args, sol, zero_start=attempt == 0)
        total += int(it)
        if float(res) <= tol or int(it) >= max_iter:
            break
    res = float(res)
    return sol, SolveInfo("theta-cg", total, res, bool(res <= tol), time.perf_counter() - t0)
