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
from .ntk import kernel_abs_matvec, kernel_matvec
from .solvers import FLOOR_FACTOR, SolveInfo, solve_newton_system


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


def stationarity(
    problem: DualProblem, alpha: jax.Array, f: jax.Array | None = None
) -> tuple[jax.Array, float]:
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
    residual (of the α returned, f recomputed from it), whether it met the tolerance, wall seconds,
    each inner solve, and ``floor``: the estimated rounding floor (``rounding_floor``) when the
    residual stagnated above the tolerance (0 otherwise); ``converged`` is then true if the residual
    is within ``FLOOR_FACTOR`` of it."""

    steps: int
    cg_iterations: int
    residual: float
    converged: bool
    seconds: float
    inner: tuple[SolveInfo, ...]
    floor: float = 0.0

    def as_solve_info(self) -> SolveInfo:
        """As a ``SolveInfo``: method ``newton/<inner>``, iterations = Newton steps, residual = the
        relative stationarity residual (CG iterations of the inner solves are in ``cg_iterations``)."""
        inner = self.inner[-1].method if self.inner else "none"
        return SolveInfo(
            f"newton/{inner}",
            self.steps,
            self.residual,
            self.converged,
            self.seconds,
            "",
            self.floor,
        )


def newton(
    problem: DualProblem,
    alpha0: jax.Array,
    tol: float,
    max_steps: int,
    solver: dict,
    change_norm: float | None = None,
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
      change_norm: ‖Δα‖ of a deletion being refined. Then also ‖r‖ ≤ tol · λ|S| · ‖Δα‖: α's error,
        about ‖r‖/(λ|S|), small against the change itself and not only against α (a 1 % deletion
        moves α by ~10 %, so the relative residual alone would let its error reach ~1e-4 of Δα).

    Returns:
      ``(alpha, NewtonInfo)``. The residual is that of the α returned (f recomputed from it near
      the optimum). ``converged`` is false if ``tol`` (and the ``change_norm`` criterion) was not met
      in ``max_steps``, unless the residual stagnated within the tolerance or within ``FLOOR_FACTOR``
      of α's rounding floor (``NewtonInfo.floor``): no α of this dtype does better.
    """
    t0 = time.perf_counter()
    m = problem.mask[:, None].astype(alpha0.dtype)
    alpha = alpha0 * m
    f = problem.f0 + kernel_matvec(problem.k, alpha, problem.form)
    r, rel = stationarity(problem, alpha, f)
    c = problem.lam * problem.n
    inner: list[SolveInfo] = []
    steps = 0
    floor = 0.0
    direct = True  # f = f_0 + K α computed from α itself, not carried along by updates
    # Newton steps solve system (A) in its SPD form; the comparison-only methods fall back to CG.
    if solver.get("method") in ("alpha-paper", "theta-cg"):
        solver = {**solver, "method": "alpha-cg"}

    def done(rel: float, r: jax.Array) -> bool:
        if rel > tol:
            return False
        return change_norm is None or float(jnp.linalg.norm(r)) <= tol * c * change_norm

    while not done(rel, r) and steps < max_steps:
        before = (alpha, f, r, direct)
        s = losses.hessian_sqrt(problem.loss, f, problem.y)
        inner_tol = max(solver["tol"], min(1e-2, 0.1 * rel))
        near_step = not (problem.loss != "mse" and rel > 1e-3)
        # Far from the optimum the forcing term is meant for (A) itself; (B)'s tolerance is tightened by
        # how much δ = (b − S z)/c amplifies its residual (``solve_newton_system``). Near it the inner
        # tolerance is already the solver's own.
        a_tol = None if near_step else inner_tol
        delta, info = solve_newton_system(
            problem.k,
            problem.form,
            s,
            problem.mask,
            -r,
            c,
            a_tol=a_tol,
            min_tol=solver["tol"],
            **{**solver, "tol": inner_tol},
        )
        inner.append(info)
        if not near_step:
            # Far from the optimum a full cross-entropy step can overshoot: backtrack on L_S, with
            # f carried along (rounding does not matter yet).
            kdelta = kernel_matvec(problem.k, delta, problem.form)
            base = dual_risk(problem, alpha, f)
            slope = float(jnp.vdot(kdelta, r)) / problem.n  # directional derivative: ∇L_S = K r / n
            step = 1.0
            while (
                step > 1e-8
                and dual_risk(problem, alpha + step * delta, f + step * kdelta)
                > base + 1e-4 * step * slope
            ):
                step *= 0.5
            if step < 1.0:
                # In float32 the risk can be too flat to compare even here: a full step that halves the
                # residual (the merit of Newton's method for r(α) = 0) is taken whatever the risk says.
                _, full_rel = stationarity(problem, alpha + delta, f + kdelta)
                if full_rel < 0.5 * rel:
                    step = 1.0
                elif step <= 1e-8:
                    step = 1.0 if full_rel < rel else 0.0
            alpha = alpha + step * delta
            f = f + step * kdelta
            direct = False
        else:
            # Near it full steps converge quadratically (squared error: at once), and f is recomputed
            # from α (same one pass over K as K δ): the residual that stops the loop is that of the
            # α returned, not of an f that drifted from it by rounding.
            step = 1.0
            alpha = alpha + delta
            f = problem.f0 + kernel_matvec(problem.k, alpha, problem.form)
            direct = True
        r, new_rel = stationarity(problem, alpha, f)
        steps += 1
        if not direct and done(new_rel, r):
            # about to stop on a carried f: judge α by its own f instead (and go on if it falls short)
            f = problem.f0 + kernel_matvec(problem.k, alpha, problem.form)
            r, new_rel = stationarity(problem, alpha, f)
            direct = True
        if step == 0.0 or (near_step and new_rel > 0.5 * rel):
            # No step lowers the residual, or a full step near the optimum does not even halve it:
            # it sits on the rounding floor of α's dtype. Keep the better of the two.
            if new_rel >= rel:
                alpha, f, r, direct = before
            else:
                rel = new_rel
            if not direct:  # the α kept is judged by its own f (one pass over K, only if not yet)
                f = problem.f0 + kernel_matvec(problem.k, alpha, problem.form)
                r, rel = stationarity(problem, alpha, f)
                direct = True
            floor = rounding_floor(problem, alpha, f)
            break
        rel = new_rel
    if not direct:
        f = problem.f0 + kernel_matvec(problem.k, alpha, problem.form)
        r, rel = stationarity(problem, alpha, f)
    converged = done(rel, r) or (floor > 0.0 and rel <= max(tol, FLOOR_FACTOR * floor))
    total_cg = sum(i.iterations for i in inner)
    return alpha, NewtonInfo(
        steps, total_cg, rel, converged, time.perf_counter() - t0, tuple(inner), floor
    )


def rounding_floor(problem: DualProblem, alpha: jax.Array, f: jax.Array) -> float:
    """How precisely the relative stationarity residual can be computed in α's dtype (an estimate).

    The residual r = g(f_0 + K α) + λ|S|α is evaluated in floating point with unit roundoff u
    (2⁻²⁴ in float32); the first-order componentwise model of rounding in K α (Higham, *Accuracy
    and Stability of Numerical Algorithms*, §3.5, without its dimension factor) bounds the error
    of f by about u|K||α|, which W carries into g. So

        floor = u ‖M (|W| |K| |α| + λ|S| |α|)‖ / (‖M g‖ + ‖λ|S| M α‖),

    one pass over K. Near an optimum with a small λ the residual is a small difference of large
    terms, and no solver working in this dtype can certify α much closer than this.

    Arguments:
      problem: the dual risk; alpha: α ``(N, d)``; f: f_0 + K α ``(N, d)``.

    Returns:
      the estimate (float, dimensionless: the scale of ``stationarity``'s relative residual).
    """
    m = problem.mask[:, None].astype(alpha.dtype)
    u = float(jnp.finfo(alpha.dtype).eps) / 2
    abs_alpha = jnp.abs(alpha) * m
    w = losses.hessian(problem.loss, f, problem.y)
    k_abs = kernel_abs_matvec(problem.k, abs_alpha, problem.form)
    bound = m * (
        losses.apply_blocks(None if w is None else jnp.abs(w), k_abs)
        + problem.lam * problem.n * abs_alpha
    )
    g = losses.grad(problem.loss, f, problem.y) * m
    scale = jnp.linalg.norm(g) + jnp.linalg.norm(problem.lam * problem.n * alpha * m)
    return float(u * jnp.linalg.norm(bound) / jnp.maximum(scale, jnp.finfo(alpha.dtype).tiny))


class KGDInfo(NamedTuple):
    """What kernel gradient descent did.

    Attributes:
      steps: iterations taken.
      residual: final relative stationarity residual (see ``stationarity``).
      converged: whether ``residual`` met the tolerance.
      seconds: wall time, the power iteration included.
      lr: the step size η used.
      top_eigenvalue: μ_max, the largest eigenvalue of K on the masked points (power iteration;
        ``None`` when ``lr`` was given).
    """

    steps: int
    residual: float
    converged: bool
    seconds: float
    lr: float
    top_eigenvalue: float | None

    def as_solve_info(self) -> SolveInfo:
        """As a ``SolveInfo``: method ``kgd``, iterations = KGD steps."""
        return SolveInfo("kgd", self.steps, self.residual, self.converged, self.seconds)


def top_eigenvalue(
    problem: DualProblem, iters: int = 200, rtol: float = 1e-6, seed: int = 0
) -> float:
    """μ_max of K restricted to the masked points, by power iteration (K is PSD).

    Arguments:
      problem: supplies K, its form, the mask and the shape of α ``(N, d)``.
      iters: most iterations; rtol: stop when successive Rayleigh quotients agree to this.
    """
    m = problem.mask[:, None].astype(problem.k.dtype)
    matvec = jax.jit(lambda v: m * kernel_matvec(problem.k, v * m, problem.form))
    v = jax.random.normal(jax.random.PRNGKey(seed), problem.y.shape, problem.k.dtype) * m
    v = v / jnp.linalg.norm(v)
    mu = 0.0
    for _ in range(iters):
        w = matvec(v)
        new_mu = float(jnp.vdot(v, w))
        v = w / jnp.linalg.norm(w)
        if abs(new_mu - mu) <= rtol * abs(new_mu):
            return new_mu
        mu = new_mu
    return mu


def kernel_gradient_descent(
    problem: DualProblem,
    alpha0: jax.Array,
    lr: float | None = None,
    tol: float = 1e-6,
    max_steps: int = 100_000,
) -> tuple[jax.Array, KGDInfo]:
    """Kernel gradient descent (math.md Eq. 14) on L_S, in α: α_{t+1} = α_t − η[(1/|S|) g_t + λ α_t].

    With f_t = f_0 + K α_t this is f_{t+1} = f_t − η[(1/|S|) K g_t + λ (f_t − f_0)], gradient descent
    in function space (parameter-space gradient descent on the infinitely wide network, paper
    App. B). Its fixed point is the optimum α* = −g/(λ|S|) that ``newton`` reaches directly.

    Step size: in the metric of K, L_S has Hessian eigenvalues in [λ, L] with
    L = w_max μ_max/|S| + λ (μ_max the largest eigenvalue of K, w_max ≥ ‖W_i‖: 1 for squared
    error, ½ for softmax cross-entropy with targets summing to one). The default η = 2/(L + λ)
    contracts the distance to α* by at least (L − λ)/(L + λ) per step, so about
    ln(tol)·L/(2λ) steps are needed: KGD is slow exactly when λ is small against μ_max/|S|.

    Arguments:
      problem: the dual risk (trace or full form; α is zero outside ``problem.mask``).
      alpha0: start ``(N, d)`` (the paper starts from 0, i.e. f = f_0).
      lr: η; ``None`` picks 2/(L + λ) from a power iteration on K.
      tol: relative stationarity residual to reach (see ``stationarity``).
      max_steps: most iterations.

    Returns:
      ``(alpha, KGDInfo)``; ``converged`` is false if ``tol`` was not met in ``max_steps``.
    """
    t0 = time.perf_counter()
    n = problem.n
    mu_max = None
    if lr is None:
        mu_max = top_eigenvalue(problem)
        w_max = 1.0 if problem.loss == "mse" else 0.5 * float(jnp.max(jnp.sum(problem.y, axis=-1)))
        big = w_max * mu_max / n + problem.lam
        lr = 2.0 / (big + problem.lam)
    alpha, steps, rel = _kgd_loop(
        problem.k,
        problem.f0,
        problem.y,
        problem.mask,
        alpha0,
        problem.lam,
        n,
        lr,
        tol,
        max_steps,
        form=problem.form,
        loss=problem.loss,
    )
    rel = float(rel)
    return alpha, KGDInfo(int(steps), rel, rel <= tol, time.perf_counter() - t0, float(lr), mu_max)


def _kgd_loop(k, f0, y, mask, alpha0, lam, n, lr, tol, max_steps, form, loss):
    m = mask[:, None].astype(alpha0.dtype)
    tiny = jnp.finfo(alpha0.dtype).tiny

    def residual(alpha):
        # r = M(g + λ|S|α) and its relative size, exactly as ``stationarity`` computes them.
        f = f0 + kernel_matvec(k, alpha * m, form)
        g = losses.grad(loss, f, y) * m
        reg = lam * n * alpha * m
        r = g + reg
        return r, jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(g) + jnp.linalg.norm(reg), tiny)

    def cond(state):
        _, _, rel, step = state
        return (rel > tol) & (step < max_steps)

    def body(state):
        alpha, r, _, step = state
        alpha = alpha - (lr / n) * r  # η[(1/|S|) g + λ α] = (η/|S|) r
        r, rel = residual(alpha)
        return alpha, r, rel, step + 1

    alpha = alpha0 * m
    r, rel = residual(alpha)
    alpha, _, rel, steps = jax.lax.while_loop(cond, body, (alpha, r, rel, jnp.asarray(0)))
    return alpha, steps, rel


_kgd_loop = jax.jit(_kgd_loop, static_argnames=("form", "loss"))
