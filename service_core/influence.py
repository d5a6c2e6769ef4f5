"""Influence of removing a forget set F in α-space: system (A), its solve, refinement, estimates.

docs/maths.md, Influence of removing F (Eqs. 5, 10–12): Δα_F = −α*_F and Δα_R solves

    (W_R K_RR + λ N_R I) Δα_R = λ N_F α*_R + W_R K_RF α*_F                (A)

through its SPD form (B). ``deletion_step`` is the one implementation of a deletion's computation
in α: the influence step, then (optionally) Newton refinement on the retain risk. The engine runs
it on the compacted retain layout (``deletion.plan``), estimates on the current one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .dual import DualProblem, NewtonInfo, newton, stationarity
from .errors import SolverError
from .layout import pad_rows, spread
from .linalg import SolveInfo, SolveOptions, SPDSystem, solve_paper_form, solve_system_a


class RetainSystem(NamedTuple):
    """System (A) for removing F, assembled on the layout of the current state.

    Attributes:
      b: right-hand side λ N_F α*_R + W_R K_RF α*_F ``(C, d)``, zero off R.
      w: W_i at the trained outputs ``(C, d, d)``, ``None`` for squared error (W = I).
      s: S = W^{1/2} ``(C, d, d)`` or ``None``.
      c: the shift λ N_R.
      n_total: N, the size of the current training set (the paper form divides by it).
    """

    b: jax.Array
    w: jax.Array | None
    s: jax.Array | None
    c: float
    n_total: int

    def take(self, rows: np.ndarray, capacity: int) -> RetainSystem:
        """The same system on a compacted layout: row ``i`` is row ``rows[i]`` of this one, zero rows
        pad it to ``capacity`` (gathered on the host: N·d² values at most, and a sharded take fails
        XLA's verifier on jax 0.5.3)."""

        def gather(a):
            return None if a is None else jnp.asarray(pad_rows(np.asarray(a)[rows], capacity))

        return self._replace(b=gather(self.b), w=gather(self.w), s=gather(self.s))


def retain_system(
    problem: DualProblem,
    alpha_star: jax.Array,
    forget: jax.Array,
    f_star: jax.Array,
    k_rf_alpha_f: jax.Array | None = None,
) -> RetainSystem:
    """Assemble system (A) for removing ``forget`` from the model trained on ``problem``.

    Arguments:
      problem: the dual risk of the current training set D (its mask: the active points).
      alpha_star: α* ``(C, d)``, optimal on D.
      forget: bool ``(C,)``, F ⊂ D.
      f_star: the trained outputs f* = f_0 + K α* ``(C, d)``.
      k_rf_alpha_f: K_RF α*_F ``(C, d)`` on R if the caller has it; else read from the N_F·d
        columns of K that belong to F (``KernelLayout.columns_matvec``).

    Returns:
      ``RetainSystem`` (docs/maths.md, Eq. (A)).
    """
    retain = problem.mask & ~forget
    m_r = retain[:, None].astype(alpha_star.dtype)
    n_forget, n_retain = int(jnp.sum(forget)), int(jnp.sum(retain))
    w = losses.hessian(problem.loss, f_star, problem.y)
    s = losses.hessian_sqrt(problem.loss, f_star, problem.y)
    if k_rf_alpha_f is None:
        points = np.flatnonzero(np.asarray(forget))
        k_rf_alpha_f = problem.layout.columns_matvec(problem.k, points, alpha_star)
    k_rf_alpha_f = m_r * k_rf_alpha_f
    b = problem.lam * n_forget * alpha_star * m_r + losses.apply_blocks(w, k_rf_alpha_f) * m_r
    return RetainSystem(b, w, s, problem.lam * n_retain, problem.n)


def solve_retain(
    retained: DualProblem, system: RetainSystem, options: SolveOptions
) -> tuple[jax.Array, SolveInfo]:
    """Δα_R from system (A) on the retain problem's layout: through its SPD form (B)
    (``linalg.solve_system_a``), or the paper's premultiplied form for ``alpha-paper``.

    Returns:
      ``(Δα_R (C, d), SolveInfo)``, zero off R.
    """
    spd = SPDSystem.make(retained.k, retained.layout, system.s, retained.mask, system.c)
    if options.method == "alpha-paper":
        delta_r, info = solve_paper_form(spd, system.w, system.b, system.n_total, options)
    else:
        delta_r, info = solve_system_a(spd, system.b, options)
    return delta_r * retained.m, info


class Retained(NamedTuple):
    """The retain set R on the layout its solves run on (compacted by ``deletion.plan``, or the
    current layout with F masked).

    Attributes:
      problem: the dual risk on R (K_RR, f_0, y, mask of R) in that layout.
      rows: row ``i`` of that layout is row ``rows[i]`` of the current one.
      alpha: α*_R in that layout.
    """

    problem: DualProblem
    rows: np.ndarray
    alpha: jax.Array


class Deletion(NamedTuple):
    """A deletion computed in α.

    Attributes:
      alpha: α after the deletion, on the retain layout (``Retained``).
      alpha_step: α after the influence step alone, on the retain layout.
      delta_alpha: Δα of the influence step on the current layout ``(C, d)``, Δα_F = −α*_F.
      step: the influence solve of system (A).
      refine: Newton refinement on the retain risk, or ``None`` if not run.
      residual: relative stationarity residual of ``alpha`` on the retain risk (the certificate).
      f: f_0 + K α on the retain layout (the certificate's outputs), ``None`` if not certified.
    """

    alpha: jax.Array
    alpha_step: jax.Array
    delta_alpha: jax.Array
    step: SolveInfo
    refine: NewtonInfo | None
    residual: float
    f: jax.Array | None


class Refinement(NamedTuple):
    """Newton refinement after the influence step: relative stationarity ``tol``, at most
    ``max_steps`` steps, inner solves by ``options`` (docs/maths.md, Exactness beyond one step)."""

    tol: float
    max_steps: int
    options: SolveOptions


def retained_in_place(problem: DualProblem, alpha_star: jax.Array, forget: jax.Array) -> Retained:
    """R on the current layout: F masked, not removed."""
    retain = problem.mask & ~forget
    rows = np.arange(problem.mask.shape[0])
    return Retained(problem._replace(mask=retain), rows, alpha_star * retain[:, None])


class Step(NamedTuple):
    """The influence step (A) alone.

    Attributes:
      alpha: α*_R + Δα_R on the retain layout.
      delta_alpha: Δα on the current layout ``(C, d)``, with Δα_F = −α*_F.
      change: ‖Δα‖ (F's part included).
      info: the solve of system (A).
    """

    alpha: jax.Array
    delta_alpha: jax.Array
    change: float
    info: SolveInfo


def influence_step(
    problem: DualProblem,
    alpha_star: jax.Array,
    forget: jax.Array,
    options: SolveOptions,
    retained: Retained,
    f_star: jax.Array,
    lap=None,
) -> Step:
    """Δα of removing ``forget`` (system (A)), solved on the retain layout ``retained``.

    Arguments:
      problem: the dual risk of the current training set D; alpha_star: α* ``(C, d)`` optimal on D.
      forget: bool ``(C,)``, F ⊂ D.
      options: the solve (``alpha-paper`` solves the paper's form).
      retained: R on the layout to solve on (``retained_in_place``, or compacted).
      f_star: f* = f_0 + K α* ``(C, d)``.
      lap: ``lap(part, *arrays)`` is called after the right-hand side and after the solve (timings).
    """
    lap = lap or (lambda *_: None)
    rp, rows = retained.problem, retained.rows
    capacity, n, n_retain = problem.mask.shape[0], problem.n, rp.n
    k_rf_alpha_f = None
    if n_retain**2 <= 2 * n * (n - n_retain):
        # K_RF α*_F as (K α*)_R − K_RR α*_R: one pass over the (compacted) K_RR instead of reading
        # the N_F·d rows of F, when that touches fewer bytes
        k_rr_alpha_r = rp.layout.matvec(rp.k, retained.alpha)
        k_rf_alpha_f = (f_star - problem.f0) - spread(k_rr_alpha_r, rows, capacity)
    system = retain_system(problem, alpha_star, forget, f_star, k_rf_alpha_f)
    if rp.mask.shape[0] != capacity or not np.array_equal(rows, np.arange(capacity)):
        system = system.take(rows, rp.mask.shape[0])
    lap("rhs", system.b)
    delta_r, info = solve_retain(rp, system, options)
    alpha_step = retained.alpha + delta_r
    lap("solve", alpha_step)
    m_f = forget[:, None].astype(alpha_star.dtype)
    delta_alpha = spread(delta_r, rows, capacity) - alpha_star * m_f
    step_change = jnp.sum((alpha_step - retained.alpha) ** 2)
    change = float(jnp.sqrt(step_change + jnp.sum((alpha_star * m_f) ** 2)))
    return Step(alpha_step, delta_alpha, change, info)


def refine_and_certify(
    retained: DualProblem,
    alpha_step: jax.Array,
    refine: Refinement | None,
    change: float | None,
    lap=None,
) -> tuple[jax.Array, NewtonInfo | None, jax.Array, float]:
    """Newton on the retain risk from the influence step (with ``refine``; for cross-entropy also
    until α's error is below ``refine.tol`` relative to ``change`` = ‖Δα‖, ``dual.newton``), then
    the certificate: the relative stationarity residual of the α returned, f recomputed from it.

    ``lap(part, *arrays)`` is called after the refinement and after the certificate (timings).

    Returns:
      ``(alpha, NewtonInfo or None, f = f_0 + K α, residual)``.
    """
    lap = lap or (lambda *_: None)
    alpha, refined = alpha_step, None
    if refine is not None:
        change = None if retained.loss == "mse" else change
        alpha, refined = newton(
            retained, alpha_step, refine.tol, refine.max_steps, refine.options, change
        )
        lap("refine", alpha)
    f = retained.outputs(alpha)
    _, residual = stationarity(retained, alpha, f)
    lap("residual", f)
    return alpha, refined, f, residual


def deletion_step(
    problem: DualProblem,
    alpha_star: jax.Array,
    forget: jax.Array,
    options: SolveOptions,
    refine: Refinement | None = None,
    *,
    f_star: jax.Array | None = None,
    retained: Retained | None = None,
    certify: bool = True,
) -> Deletion:
    """Remove ``forget`` from the model trained on ``problem``: the influence step (A)
    (``influence_step``), then, with ``refine``, Newton refinement and the certificate
    (``refine_and_certify``). For squared error the step alone equals exact retraining; refinement
    then only certifies it. This is the computation of every deletion: ``deletion.plan`` runs it on
    the compacted retain layout, estimates on the current one.

    Arguments:
      problem: the dual risk of the current training set D; alpha_star: α* ``(C, d)`` optimal on D.
      forget: bool ``(C,)``, F ⊂ D.
      options: the influence solve.
      refine: refinement settings, or ``None`` for the single step.
      f_star: f* = f_0 + K α* if known (saves a pass over K).
      retained: R on the layout to solve on (default ``retained_in_place``).
      certify: compute the certificate (``Deletion.residual`` and ``f``; NaN and ``None`` without).

    Returns:
      ``Deletion``; when the step missed its tolerance (``step.converged`` false) no refinement runs.
    """
    f_star = problem.outputs(alpha_star) if f_star is None else f_star
    retained = retained_in_place(problem, alpha_star, forget) if retained is None else retained
    step = influence_step(problem, alpha_star, forget, options, retained, f_star)
    alpha, refined, f, residual = step.alpha, None, None, float("nan")
    if certify and step.info.converged:
        alpha, refined, f, residual = refine_and_certify(
            retained.problem, step.alpha, refine, step.change
        )
    return Deletion(alpha, step.alpha, step.delta_alpha, step.info, refined, residual, f)


class InfluenceResult(NamedTuple):
    """Estimated changes at test points if a forget set were removed (docs/maths.md, Eqs. (8)–(9)).

    Attributes:
      version: model version the estimate is for.
      delta_outputs: Δf ``(n, d)``.
      delta_loss: Δℓ ``(n,)``: exact for squared error (Eq. (9-mse)), second order for
        cross-entropy (Eq. (9-ce)), given Δf.
      solve: the influence solve.
      delta_loss_first_order: g_tᵀΔf ``(n,)``, the paper's Eq. 9 (Eq. (9)).
    """

    version: int
    delta_outputs: jax.Array
    delta_loss: jax.Array
    solve: SolveInfo
    delta_loss_first_order: jax.Array | None = None


def estimate(
    state, model, forget_ids, x: jax.Array, y: jax.Array, refine: bool = False
) -> InfluenceResult:
    """Δf and Δℓ at test points ``x`` ``(n, ...)``, targets ``y`` ``(n, d)``, if ``forget_ids``
    were removed from ``state`` (Eqs. (8)–(9)), by the influence step on the current layout (and,
    with ``refine``, Newton to the retain optimum); the state does not change.

    Returns:
      ``InfluenceResult`` (jax arrays).

    Raises:
      SolverError: the step missed its tolerance.
    """
    from .deletion import choose_solver, not_converged, problem_of
    from .lifecycle import solve_options

    method, _ = choose_solver(state, model, state.n - len(forget_ids))
    method = "alpha-cg" if method == "theta-cg" else method  # estimates need Δα: same Δθ
    train, cfg = state.train_config, state.solver_config
    options = solve_options(cfg, train.dtype, method).replace(nystrom=state.nystrom)
    refinement = Refinement(train.resolved_tol(), cfg.max_refine, options) if refine else None
    mask = jnp.asarray(state.mask(forget_ids))
    step = deletion_step(
        problem_of(state),
        state.alpha,
        mask,
        options,
        refinement,
        f_star=state.f_star,
        certify=refine,
    )
    if not step.step.converged:
        raise SolverError(not_converged(step.step, cfg.max_iter, state.alpha.dtype))
    # Δα on the current layout; refined: α_R − α*_R on R and −α*_F on F (α_new is 0 there)
    delta = step.alpha - state.alpha * state.active[:, None] if refine else step.delta_alpha
    df = model.delta_outputs(state, delta, x)
    second, first = loss_changes(train.loss, model.outputs(state, x), y, df)
    return InfluenceResult(state.version, df, second, step.step, first)


def loss_changes(
    loss: str, f: jax.Array, y: jax.Array, df: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The change of each test point's loss when its outputs move from ``f`` by ``df``, all
    ``(n, d)`` → ``(n,)``:

    * first order, the paper's Eq. 9 (docs/maths.md, Eq. (9)): g_tᵀΔf_t, g_t at the current outputs;
    * with the second-order term ½ Δf_tᵀ W_t Δf_t: exact for squared error (W = I, Eq. (9-mse)),
      second order for cross-entropy (Eq. (9-ce)).

    Returns:
      ``(second order (exact for squared error), first order)``.
    """
    first = jnp.sum(losses.grad(loss, f, y) * df, axis=-1)
    w = losses.hessian(loss, f, y)
    curvature = jnp.sum(df * losses.apply_blocks(w, df), axis=-1)
    return first + 0.5 * curvature, first
