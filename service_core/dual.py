"""The dual (α-space) risk, its stationarity certificate, and how its optimum is found.

docs/maths.md, Dual representation: with f = f_0 + K α the dual risk on the points 𝒮 is

    L_𝒮(α) = (1/|𝒮|) Σ_{i∈𝒮} ℓ(f_i, y_i) + (λ/2) αᵀ K α,

whose stationarity condition is r = g + λ|𝒮| α = 0 (so α* = −g/(λN), Eq. (O)). Each Newton step
solves system (A), (W K + λ|𝒮| I) δ = −r, through its SPD form (B) (Eq. (N)); a backtracking line
search on L_𝒮 keeps cross-entropy steps safe. The same routine trains version 0 (from α = 0) and
refines a deletion (from α after the influence step, on the retain set). Kernel gradient descent
(Eq. (14α)) reaches the same optimum in many cheaper steps.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import losses
from .layout import KernelLayout
from .linalg import (
    SolveInfo,
    SolveOptions,
    SPDSystem,
    floor_accepts,
    power_iteration,
    solve_system_a,
)


class DualProblem(NamedTuple):
    """The arrays of a dual risk restricted to ``mask``.

    Attributes:
      k: K in ``layout``.
      layout: K's layout (form, d, devices).
      f0: f_0 ``(C, d)``, the linearised output at θ = θ_p.
      y: targets ``(C, d)``.
      mask: bool ``(C,)``, the points 𝒮 of the risk.
      lam: λ.
      loss: ``mse`` or ``ce``.
    """

    k: jax.Array
    layout: KernelLayout
    f0: jax.Array
    y: jax.Array
    mask: jax.Array
    lam: float
    loss: str

    @property
    def n(self) -> int:
        return int(jnp.sum(self.mask))

    @property
    def m(self) -> jax.Array:
        """The mask as a ``(C, 1)`` column in K's dtype."""
        return self.mask[:, None].astype(self.k.dtype)

    def outputs(self, alpha: jax.Array) -> jax.Array:
        """f = f_0 + K (M α), ``(C, d)``."""
        return self.f0 + self.layout.matvec(self.k, alpha * self.m)

    def newton_system(self, f: jax.Array) -> SPDSystem:
        """System (B) of a Newton step at outputs ``f``: S = W(f)^{1/2}, c = λ|𝒮|."""
        s = losses.hessian_sqrt(self.loss, f, self.y)
        return SPDSystem.make(self.k, self.layout, s, self.mask, self.lam * self.n)


def residual_terms(loss: str, f, y, alpha, m, c) -> tuple[jax.Array, jax.Array]:
    """r = M(g + c α) ``(C, d)`` and its relative size ‖r‖ / (‖M g‖ + ‖c M α‖) (a traced scalar),
    g = ∂ℓ/∂f at ``f``, c = λ|𝒮| (docs/maths.md, Eq. (C)); traceable under ``jit``."""
    g = losses.grad(loss, f, y) * m
    reg = c * alpha * m
    r = g + reg
    scale = jnp.linalg.norm(g) + jnp.linalg.norm(reg)
    return r, jnp.linalg.norm(r) / jnp.maximum(scale, jnp.finfo(alpha.dtype).tiny)


def stationarity(
    problem: DualProblem, alpha: jax.Array, f: jax.Array | None = None
) -> tuple[jax.Array, float]:
    """The residual r = M(g + λ|𝒮| α) ``(C, d)`` and its relative size (Eq. (C)).

    The relative residual is 0 exactly at the optimum and 1 at α = 0; it is the certificate a
    model version is reported with (docs/maths.md, Exactness beyond one step). ``f`` defaults to
    f_0 + K α, computed from α.
    """
    f = problem.outputs(alpha) if f is None else f
    r, rel = residual_terms(problem.loss, f, problem.y, alpha, problem.m, problem.lam * problem.n)
    return r, float(rel)


def dual_risk(problem: DualProblem, alpha: jax.Array, f: jax.Array) -> float:
    """L_𝒮(α) given f = f_0 + K α (only α on the mask counts)."""
    m = problem.mask.astype(alpha.dtype)
    data = jnp.sum(losses.value(problem.loss, f, problem.y) * m) / problem.n
    reg = 0.5 * problem.lam * jnp.sum(alpha * m[:, None] * (f - problem.f0))
    return float(data + reg)


def rounding_floor(
    problem: DualProblem, alpha: jax.Array, f: jax.Array, unit_roundoff: float | None = None
) -> float:
    """How precisely the relative stationarity residual can be computed in α's dtype (an estimate).

    The residual r = g(f_0 + K α) + λ|𝒮|α is evaluated with unit roundoff u (2⁻²⁴ in float32); the
    first-order componentwise model of rounding in K α (Higham, *Accuracy and Stability of Numerical
    Algorithms*, §3.5, without its dimension factor) bounds the error of f by about u|K||α|, which W
    carries into g. So (docs/maths.md, Eq. (F1))

        floor = u ‖M (|W| |K| |α| + λ|𝒮| |α|)‖ / (‖M g‖ + ‖λ|𝒮| M α‖),

    one pass over |K|. Near an optimum with a small λ the residual is a small difference of large
    terms, and no solver working in this dtype can certify α much closer than this.

    Arguments:
      problem: the dual risk; alpha: α ``(C, d)``; f: f_0 + K α ``(C, d)``.
      unit_roundoff: u (default: that of α's dtype); float32's gives the floor float32 would
        have at this α (``precision.conditioning``).

    Returns:
      the estimate (dimensionless: the scale of ``stationarity``'s relative residual).
    """
    m = problem.m
    c = problem.lam * problem.n
    u = float(jnp.finfo(alpha.dtype).eps) / 2 if unit_roundoff is None else unit_roundoff
    abs_alpha = jnp.abs(alpha) * m
    w = losses.hessian(problem.loss, f, problem.y)
    k_abs = problem.layout.abs_matvec(problem.k, abs_alpha)
    bound = m * (losses.apply_blocks(None if w is None else jnp.abs(w), k_abs) + c * abs_alpha)
    g = losses.grad(problem.loss, f, problem.y) * m
    scale = jnp.linalg.norm(g) + jnp.linalg.norm(c * alpha * m)
    return float(u * jnp.linalg.norm(bound) / jnp.maximum(scale, jnp.finfo(alpha.dtype).tiny))


def certified_floor(
    problem: DualProblem, alpha: jax.Array, floor: float = 0.0, f: jax.Array | None = None
) -> float:
    """The rounding floor a version's certificate states (docs/maths.md, Eq. (F1)): the Newton
    solve's own estimate ``floor`` when it stopped on stagnation, else ``rounding_floor`` at the
    published α, so that every version states one (not 0 when its solve met the tolerance).

    Arguments:
      problem: the dual risk the version solves; alpha: its α ``(C, d)``, the model's dtype;
        floor: the solve's estimate (0: none made); f: f_0 + K α ``(C, d)`` if known (else
        recomputed: one more pass over K).

    Returns:
      the estimate (dimensionless, the scale of the relative stationarity residual); raises
      nothing beyond ``rounding_floor``'s JAX errors.
    """
    if floor:
        return float(floor)
    return rounding_floor(problem, alpha, problem.outputs(alpha) if f is None else f)


class NewtonInfo(NamedTuple):
    """What a Newton solve did: steps, CG iterations summed over steps, final relative stationarity
    residual (of the α returned, f recomputed from it), whether it met the tolerance, wall seconds,
    each inner solve, and ``floor``: the estimated rounding floor (``rounding_floor``) when the
    residual stagnated above the tolerance (0 otherwise); ``converged`` is then true only within the
    operator's slack (``linalg.floor_accepts``)."""

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


class _Iterate(NamedTuple):
    """α, f, r and whether f was computed from α itself (not carried along by updates)."""

    alpha: jax.Array
    f: jax.Array
    r: jax.Array
    rel: float
    direct: bool


def _judged(problem: DualProblem, it: _Iterate) -> _Iterate:
    """``it`` with f recomputed from α (one pass over K) unless it already was."""
    if it.direct:
        return it
    f = problem.outputs(it.alpha)
    r, rel = stationarity(problem, it.alpha, f)
    return _Iterate(it.alpha, f, r, rel, True)


def _damped_step(problem: DualProblem, it: _Iterate, delta: jax.Array) -> tuple[_Iterate, float]:
    """Far from the optimum a full cross-entropy step can overshoot: backtrack on L_𝒮 (Armijo), with
    f carried along (rounding does not matter yet). In float32 the risk can be too flat to compare:
    a full step that halves the residual (the merit of Newton's method for r(α) = 0) is taken
    whatever the risk says. Returns the new iterate and the step length (0: no step helps)."""
    kdelta = problem.layout.matvec(problem.k, delta)
    base = dual_risk(problem, it.alpha, it.f)
    slope = float(jnp.vdot(kdelta, it.r)) / problem.n  # directional derivative: ∇L = K r / n
    step = 1.0
    while step > 1e-8 and (
        dual_risk(problem, it.alpha + step * delta, it.f + step * kdelta)
        > base + 1e-4 * step * slope
    ):
        step *= 0.5
    if step < 1.0:
        _, full_rel = stationarity(problem, it.alpha + delta, it.f + kdelta)
        if full_rel < 0.5 * it.rel:
            step = 1.0
        elif step <= 1e-8:
            step = 1.0 if full_rel < it.rel else 0.0
    alpha, f = it.alpha + step * delta, it.f + step * kdelta
    r, rel = stationarity(problem, alpha, f)
    return _Iterate(alpha, f, r, rel, False), step


def newton(
    problem: DualProblem,
    alpha0: jax.Array,
    tol: float,
    max_steps: int,
    options: SolveOptions,
    change_norm: float | None = None,
) -> tuple[jax.Array, NewtonInfo]:
    """Minimise L_𝒮 over α (zero outside the mask) by damped Newton, to relative stationarity ``tol``.

    Arguments:
      problem: the dual risk.
      alpha0: start ``(C, d)``.
      tol: relative stationarity residual to reach (``stationarity``).
      max_steps: most Newton steps.
      options: inner solves of system (B) (``linalg.solve_system_a``); inexact early on (forcing
        term min(1e-2, 0.1·residual)) and as tight as ``options.tol`` near the optimum. The
        comparison-only methods (``alpha-paper``, ``theta-cg``) solve Newton steps by CG.
      change_norm: ‖Δα‖ of a deletion being refined. Then also ‖r‖ ≤ tol · λ|𝒮| · ‖Δα‖: α's error,
        about ‖r‖/(λ|𝒮|), small against the change itself and not only against α.

    Returns:
      ``(alpha, NewtonInfo)``. The residual is that of the α returned (f recomputed from it near
      the optimum). ``converged`` is false if ``tol`` (and the ``change_norm`` criterion) was not met
      in ``max_steps``, unless the residual stagnated within ``FLOOR_FACTOR`` of α's rounding floor
      (``NewtonInfo.floor``: no α of this dtype does better) and within the operator's slack
      ``options.accept_floor`` × ``tol`` (``linalg.floor_accepts``; none by default).
    """
    t0 = time.perf_counter()
    if options.method in ("alpha-paper", "theta-cg"):
        options = options.replace(method="alpha-cg")
    c = problem.lam * problem.n
    alpha = alpha0 * problem.m
    f = problem.outputs(alpha)
    it = _Iterate(alpha, f, *stationarity(problem, alpha, f), True)
    inner: list[SolveInfo] = []
    steps, floor = 0, 0.0

    def done(it: _Iterate) -> bool:
        if not it.rel <= tol:  # NaN never meets a tolerance
            return False
        return change_norm is None or float(jnp.linalg.norm(it.r)) <= tol * c * change_norm

    while not done(it) and steps < max_steps:
        inner_tol = max(options.tol, min(1e-2, 0.1 * it.rel))
        near_step = not (problem.loss != "mse" and it.rel > 1e-3)
        # Far from the optimum the forcing term is meant for (A) itself; near it the inner
        # tolerance is already the solver's own.
        delta, info = solve_system_a(
            problem.newton_system(it.f),
            -it.r,
            options.replace(tol=inner_tol),
            a_tol=None if near_step else inner_tol,
            min_tol=options.tol,
        )
        inner.append(info)
        before = it
        if near_step:  # full steps converge quadratically here; f recomputed from α
            it, step = _judged(problem, it._replace(alpha=it.alpha + delta, direct=False)), 1.0
        else:
            it, step = _damped_step(problem, it, delta)
        steps += 1
        if not it.direct and done(it):  # about to stop on a carried f: judge α by its own f
            it = _judged(problem, it)
        if step == 0.0 or (near_step and it.rel > 0.5 * before.rel):
            # No step lowers the residual, or a full step near the optimum does not even halve it:
            # it sits on the rounding floor of α's dtype. Keep the better of the two.
            it = _judged(problem, before if it.rel >= before.rel else it)
            floor = rounding_floor(problem, it.alpha, it.f)
            break
    it = _judged(problem, it)
    converged = done(it) or floor_accepts(it.rel, tol, floor, options.accept_floor)
    converged = converged and bool(jnp.all(jnp.isfinite(it.alpha)))
    total_cg = sum(i.iterations for i in inner)
    seconds = time.perf_counter() - t0
    return it.alpha, NewtonInfo(steps, total_cg, it.rel, converged, seconds, tuple(inner), floor)


class KGDInfo(NamedTuple):
    """What kernel gradient descent did.

    Attributes:
      steps: iterations taken.
      residual: final relative stationarity residual (``stationarity``).
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
    """μ_max of K restricted to the masked points, by power iteration (K is PSD)."""
    m = problem.m
    matvec = jax.jit(lambda v: m * problem.layout.matvec(problem.k, v * m))
    v0 = jax.random.normal(jax.random.PRNGKey(seed), problem.y.shape, problem.k.dtype) * m
    return power_iteration(matvec, v0, iters, rtol)


def kernel_gradient_descent(
    problem: DualProblem,
    alpha0: jax.Array,
    lr: float | None = None,
    tol: float = 1e-6,
    max_steps: int = 100_000,
) -> tuple[jax.Array, KGDInfo]:
    """Kernel gradient descent (docs/maths.md, Eq. (14α)): α_{t+1} = α_t − η[(1/|𝒮|) g_t + λ α_t].

    With f_t = f_0 + K α_t this is gradient descent in function space (Eq. (14); parameter-space
    gradient descent on the infinitely wide network, paper App. B). Its fixed point is the optimum
    α* = −g/(λ|𝒮|) that ``newton`` reaches directly.

    Step size: in the metric of K, L_𝒮 has Hessian eigenvalues in [λ, L] with
    L = w_max μ_max/|𝒮| + λ (μ_max the largest eigenvalue of K, w_max ≥ ‖W_i‖,
    ``losses.hessian_bound``). The default η = 2/(L + λ) contracts the distance to α* by at least
    (L − λ)/(L + λ) per step, so about ln(tol)·L/(2λ) steps are needed.

    Arguments:
      problem: the dual risk (trace or full form; α is zero outside ``problem.mask``).
      alpha0: start ``(C, d)`` (the paper starts from 0, i.e. f = f_0).
      lr: η; ``None`` picks 2/(L + λ) from a power iteration on K.
      tol: relative stationarity residual to reach (``stationarity``).
      max_steps: most iterations.

    Returns:
      ``(alpha, KGDInfo)``; ``converged`` is false if ``tol`` was not met in ``max_steps``.
    """
    t0 = time.perf_counter()
    n = problem.n
    mu_max = None
    if lr is None:
        mu_max = top_eigenvalue(problem)
        big = losses.hessian_bound(problem.loss, problem.y) * mu_max / n + problem.lam
        lr = 2.0 / (big + problem.lam)
    alpha, steps, rel = _kgd_loop(
        problem.k, problem.f0, problem.y, problem.mask, alpha0, problem.lam, n, lr, tol, max_steps,
        layout=problem.layout, loss=problem.loss,
    )  # fmt: skip
    rel = float(rel)
    return alpha, KGDInfo(int(steps), rel, rel <= tol, time.perf_counter() - t0, float(lr), mu_max)


@partial(jax.jit, static_argnames=("layout", "loss"))
def _kgd_loop(k, f0, y, mask, alpha0, lam, n, lr, tol, max_steps, layout, loss):
    m = mask[:, None].astype(alpha0.dtype)

    def residual(alpha):
        return residual_terms(loss, f0 + layout.matvec(k, alpha * m), y, alpha, m, lam * n)

    def cond(state):
        _, _, rel, step = state
        return (rel > tol) & (step < max_steps)

    def body(state):
        alpha, r, _, step = state
        alpha = alpha - (lr / n) * r  # η[(1/|𝒮|) g + λ α] = (η/|𝒮|) r
        r, rel = residual(alpha)
        return alpha, r, rel, step + 1

    alpha = alpha0 * m
    r, rel = residual(alpha)
    alpha, _, rel, steps = jax.lax.while_loop(cond, body, (alpha, r, rel, jnp.asarray(0)))
    return alpha, steps, rel
