"""The exact optimum of the regularised risk, found by Newton's method in α-space.

math.md, Dual representation: with f = f_0 + K α the dual risk on the points S is

    L_S(α) = (1/|S|) Σ_{i∈S} ℓ(f_i, y_i) + (λ/2) αᵀ K α,

whose stationarity condition is r = g + λ|S| α = 0 (so α* = −g/(λN)). Each Newton step solves
system (A), (W K + λ|S| I) δ = −r, through its SPD form; a backtracking line search on L_S keeps
cross-entropy steps safe. The same routine trains version 0 (from α = 0) and refines a deletion
(from α after the influence step, on the retain set).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import losses
from .ntk import kernel_matvec
from .solvers import SolveInfo, solve_newton_system


class DualProblem(NamedTuple):
    """The arrays of a dual risk restricted to ``mask``.

    Attributes:
      k: K in the engine layout of ``form``.
      form: ``full`` or ``trace``.
      f0: f_0 ``(N, d)``, the linearised output at θ = θ_p.
      y: targets ``(N, d)``.
      mask: bool ``(N,)``, the points S of the risk.
      lam: λ.
      loss: ``mse`` or ``ce``.
    """

    k: jax.Array
    form: str
    f0: jax.Array
    y: jax.Array
    mask: jax.Array
    lam: float
    loss: str

    @property
    def n(self) -> int:
        return int(jnp.sum(self.mask))


def stationarity(problem: DualProblem, alpha: jax.Array, f: jax.Array | None = None) -> tuple[jax.Array, float]:
    """The residual r = M(g + λ|S| α) ``(N, d)`` and its relative size ‖r‖ / (‖M g‖ + ‖λ|S| M α‖).

    The relative residual is 0 exactly at the optimum and 1 at α = 0; it is the certificate a
    model version is reported with (math.md, Exactness beyond one step).
    """
    m = problem.mask[:, None].astype(alpha.dtype)
    if f is None:
        f = problem.f0 + kernel_matvec(problem.k, alpha * m, problem.form)
    g = losses.grad(problem.loss, f, problem.y) * m
    reg = problem.lam * problem.n * alpha * m
    r = g + reg
    scale = jnp.linalg.norm(g) + jnp.linalg.norm(reg)
    rel = float(jnp.linalg.norm(r) / jnp.maximum(scale, jnp.finfo(alpha.dtype).tiny))
    return r, rel


def dual_risk(problem: DualProblem, alpha: jax.Array, f: jax.Array) -> float:
    """L_S(α) given f = f_0 + K α (only α on the mask counts)."""
    m = problem.mask.astype(alpha.dtype)
    data = jnp.sum(losses.value(problem.loss, f, problem.y) * m) / problem.n
    reg = 0.5 * problem.lam * jnp.sum(alpha * m[:, None] * (f - problem.f0))
    return float(data + reg)


class NewtonInfo(NamedTuple):
    """What a Newton solve did: steps, CG iterations summed over steps, final relative stationarity
    residual, whether it met the tolerance, wall seconds, and each inner solve."""

    steps: int
    cg_iterations: int
    residual: float
    converged: bool
    seconds: float
    inner: tuple[SolveInfo, ...]

    def as_solve_info(self) -> SolveInfo:
        """As a ``SolveInfo``: method ``newton/<inner>``, iterations = Newton steps, residual = the
        relative stationarity residual (CG iterations of the inner solves are in ``cg_iterations``)."""
        inner = self.inner[-1].method if self.inner else "none"
        return SolveInfo(f"newton/{inner}", self.steps, self.residual, self.converged, self.seconds)


def newton(
    problem: DualProblem,
    alpha0: jax.Array,
    tol: float,
    max_steps: int,
    solver: dict,
) -> tuple[jax.Array, NewtonInfo]:
    """Minimise L_S over α (zero outside the mask) by damped Newton, to relative stationarity ``tol``.

    Arguments:
      problem: the dual risk.
      alpha0: start ``(N, d)``.
      tol: relative stationarity residual to reach (see ``stationarity``).
      max_steps: most Newton steps.
      solver: keyword arguments of ``solvers.solve_spd`` (method, tol, max_iter, cholesky_max_dim);
        inner solves are inexact early on (forcing term min(1e-2, 0.1·residual)) and as tight as
        ``solver['tol']`` near the optimum.

    Returns:
      ``(alpha, NewtonInfo)``. ``converged`` is false if ``tol`` was not met in ``max_steps``.
    """
    t0 = time.perf_counter()
    m = problem.mask[:, None].astype(alpha0.dtype)
    alpha = alpha0 * m
    f = problem.f0 + kernel_matvec(problem.k, alpha, problem.form)
    r, rel = stationarity(problem, alpha, f)
    c = problem.lam * problem.n
    inner: list[SolveInfo] = []
    steps = 0
    while rel > tol and steps < max_steps:
        s = losses.hessian_sqrt(problem.loss, f, problem.y)
        inner_tol = max(solver["tol"], min(1e-2, 0.1 * rel))
        delta, info = solve_newton_system(problem.k, problem.form, s, problem.mask, -r, c, **{**solver, "tol": inner_tol})
        inner.append(info)
        kdelta = kernel_matvec(problem.k, delta, problem.form)
        step = 1.0
        # Far from the optimum a full cross-entropy step can overshoot; near it the float32 risk is
        # too flat to compare, and full steps converge quadratically anyway.
        if problem.loss != "mse" and rel > 1e-3:
            base = dual_risk(problem, alpha, f)
            slope = float(jnp.vdot(kdelta, r)) / problem.n  # directional derivative: ∇L_S = K r / n
            while step > 1e-8 and dual_risk(problem, alpha + step * delta, f + step * kdelta) > base + 1e-4 * step * slope:
                step *= 0.5
        alpha = alpha + step * delta
        f = f + step * kdelta
        r, new_rel = stationarity(problem, alpha, f)
        steps += 1
        if new_rel >= rel and step < 1e-6:
            rel = new_rel
            break
        rel = new_rel
    total_cg = sum(i.iterations for i in inner)
    return alpha, NewtonInfo(steps, total_cg, rel, rel <= tol, time.perf_counter() - t0, tuple(inner))
