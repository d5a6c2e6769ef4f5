"""A deletion, computed: ``plan(state, model, ids, ...) -> (next state, ForgetResult)``.

The order (docs/design.md, The order of a deletion): validate the forget set; remove F from every
array (compacted into the retain set's capacity bucket, or erased in place); assemble and solve
system (A) on K_RR (``influence.influence_step``), or the θ-space baseline; map Δα to θ (one VJP);
refine on the retain risk and recompute the certificate (``influence.refine_and_certify``). Nothing
here publishes, checkpoints or touches the engine: ``Unlearner.forget`` does that with the result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import losses, validation
from .dual import DualProblem, certified_floor
from .errors import InvalidInputError, NotCertifiedError
from .influence import Refinement, Retained, influence_step, refine_and_certify
from .layout import KernelLayout, pad_rows
from .lifecycle import finite, floor_hint, non_finite, solve_options
from .linalg import SolveInfo, canonical_method, choose_method
from .models import Network
from .state import ModelState, VersionRecord, bucket
from .theta_space import theta_space_delta

# Erase F in place (into the spare buffer) rather than compact into a smaller bucket while that
# bucket would keep at least this share of K's entries. Measured on MNIST (K 1.7 GB, C = 2,048): erasing
# into mapped memory 0.30 s against compacting into fresh memory 0.6-0.7 s, but each of the ~8 passes
# of the solve and the certificate then reads C² instead of bucket(N_R)² entries: at 1 % removal the
# whole deletion took 1.40 s against 1.90 s, at 10 % (bucket 1,856, 82 % of the entries) 1.74 s both ways.
ERASE_MIN_FILL = 0.85


class ForgetResult(NamedTuple):
    """Outcome of a deletion.

    Attributes:
      version: the new model version.
      solve: the influence solve of system (A) (or of θ-space for ``theta-cg``).
      refine: Newton refinement on the retain risk (``None`` if not run).
      residual: relative stationarity residual of the new version (its certificate).
      seconds: wall time (``plan``: the computation; ``Unlearner.forget``: computation,
        checkpoint and publication).
      reason: why this solver method was used (the ``auto`` cost model, or "configured").
      refine_cg_iterations: CG iterations of the refinement's inner solves, summed (0 if none).
      timings: seconds per part: ``validate``, ``compact`` (K_RR and the preconditioner gathered,
        or F erased in place), ``rhs`` (system (A)'s right-hand side), ``solve``, ``delta``
        (Δθ = J(X)ᵀΔα, or α of the θ-space answer), ``refine``, ``residual`` (the certificate);
        ``Unlearner.forget`` adds ``checkpoint`` and ``publish``.
      refine_inner: the inner solves of the refinement's Newton steps.
      certificate: the new version's certificate (``ModelState.certificate``).
    """

    version: int
    solve: SolveInfo
    refine: SolveInfo | None
    residual: float
    seconds: float
    reason: str = ""
    refine_cg_iterations: int = 0
    timings: dict | None = None
    refine_inner: tuple[SolveInfo, ...] = ()
    certificate: dict | None = None


def problem_of(state: ModelState) -> DualProblem:
    """The dual risk of ``state``'s active points."""
    train = state.train_config
    mask = jnp.asarray(state.active)
    return DualProblem(state.k, state.layout, state.f0, state.y, mask, train.lam, train.loss)


def choose_solver(
    state: ModelState, model: Network, n_retain: int, method: str | None = None
) -> tuple[str, str]:
    """The solver method for a forget set leaving ``n_retain`` points, and why.

    ``auto`` asks ``linalg.choose_method`` (flop-count cost model with κ bounded by λ_max of K,
    computed at build time, or by the first eigenvalue the Nyström preconditioner leaves out);
    any other method is used as is.
    """
    cfg, train = state.solver_config, state.train_config
    method = canonical_method(method or cfg.method)
    if method != "auto":
        return method, f"{method}: configured"
    w_max = losses.hessian_bound(train.loss, state.y)
    top = state.meta.get("lambda_max", float("inf"))
    kappa_theta = 1.0 + top * w_max / (train.lam * n_retain)  # θ-space CG is not preconditioned
    if state.nystrom is not None:
        top = float(state.nystrom.lam[-1])
    kappa = 1.0 + top * w_max / (train.lam * n_retain)
    est = choose_method(
        n_retain, state.layout.d, state.form, train.loss != "mse", model.n_params, kappa,
        cfg.resolved_tol(train.dtype), cfg.cholesky_max_dim, kappa_theta,
        preconditioned=state.nystrom is not None,
    )  # fmt: skip
    return est.method, est.reason


def without(
    state: ModelState, keep: np.ndarray, spare: jax.Array | None, spare_holds_k: bool = False
) -> tuple[ModelState, np.ndarray]:
    """``state`` with the points outside ``keep`` removed, and where each row came from.

    While the capacity bucket still fits (or, with a spare K buffer, the smaller bucket would keep
    ``ERASE_MIN_FILL`` of K's entries), rows are zeroed in place (``rows`` is the identity; K is
    written into the spare when there is one, which is consumed); else every array is compacted into
    the smaller bucket and row i of the result is row ``rows[i]`` of ``state`` (the spare is freed
    first, so K, the new K and the solver's working set stay within the memory plan's two copies).
    α keeps α* on the retained rows; θ, f* and the certificate are left for the caller.
    ``spare_holds_k``: the spare holds K's values (``SpareBuffer.holds``): the erasure zeroes the
    removed points' rows and columns in it, no pass over K.
    """
    layout = state.layout
    cap = bucket(int(keep.sum()), layout.devices)
    fits = spare is not None and spare.shape == state.k.shape and spare.dtype == state.k.dtype
    spare = spare if fits else None
    keep_j = jnp.asarray(keep)
    ny = state.nystrom
    if cap == state.capacity or (
        spare is not None and cap * cap >= ERASE_MIN_FILL * state.capacity**2
    ):
        m = keep_j.astype(state.x.dtype)
        shell = state.replace(
            ids=np.where(keep, state.ids, ""),
            x=state.x * m.reshape((-1,) + (1,) * (state.x.ndim - 1)),
            y=state.y * m[:, None],
            k=layout.erase(
                state.k,
                keep_j,
                into=spare,
                gone=np.flatnonzero(state.active & ~keep) if spare_holds_k else None,
            ),
            f0=state.f0 * m[:, None],
            alpha=state.alpha * m[:, None],
            f_star=None,
            nystrom=None if ny is None else ny.mask_rows(layout.row_mask(keep_j)),
        )
        return shell, np.arange(state.capacity)
    del spare
    rows = np.flatnonzero(keep)
    shell = state.replace(
        ids=pad_rows(state.ids[rows], cap),
        **{name: pad_rows(getattr(state, name)[rows], cap) for name in ("x", "y", "f0", "alpha")},
        k=layout.compact(state.k, rows, cap),
        f_star=None,
        nystrom=None if ny is None else ny._replace(u=layout.take_factor_rows(ny.u, rows, cap)),
    )
    return shell, rows


def plan(
    state: ModelState,
    model: Network,
    ids: Sequence[str],
    method: str | None = None,
    refine: bool | None = None,
    spare: jax.Array | None = None,
    strict: bool = True,
    spare_holds_k: bool = False,
) -> tuple[ModelState, ForgetResult]:
    """The next version of ``state`` without ``ids``, computed (not published).

    Arguments:
      state: the current version; model: its network.
      ids: active ids to forget.
      method: solver method overriding the configured one (``config.SOLVER_METHODS``).
      refine: overrides the configured refinement.
      spare: a K-sized buffer the erased K may be written into (consumed; ``Unlearner`` keeps one).
      strict: raise when a solve misses its tolerance (``False``: report it, for benchmarks that
        run the paper's form for a fixed number of iterations).
      spare_holds_k: ``spare`` holds K's values (``SpareBuffer.holds``): erasing F zeroes its
        rows and columns there, with no pass over K (``without``).

    Returns:
      ``(new_state, ForgetResult)``; ``seconds`` is the compute time.

    Raises:
      InvalidForgetSetError, UnknownIdsError, AlreadyForgottenError: a bad forget set.
      InvalidInputError: ``theta-cg`` for a network without θ.
      NotCertifiedError: a solve missed its tolerance, or the new version's certificate is above
        ``tol × accept_floor`` (with ``strict``), or produced non-finite values.
    """
    clock = _Clock()
    validation.forget_set(state, ids)
    train, cfg = state.train_config, state.solver_config
    refine = cfg.refine if refine is None else refine
    mask = state.mask(ids)
    n_retain = state.n - len(ids)
    method, reason = choose_solver(state, model, n_retain, method)
    if method == "theta-cg" and model.n_params is None:
        raise InvalidInputError(
            f"{model.config.kind} has no parameters: theta-cg is not available, use alpha-cg"
        )
    clock.lap("validate")
    shell, rows = without(state, state.active & ~mask, spare, spare_holds_k)
    retained = Retained(problem_of(shell), rows, shell.alpha)
    clock.lap("compact", shell.k)
    if method == "theta-cg":
        alpha_step, theta_step, step, change = _theta_step(state, shell, model, mask, clock)
    else:
        alpha_step, step_theta, step, change = _alpha_step(
            state, model, mask, method, retained, shell.nystrom, clock
        )
        # θ* + J(X)ᵀΔα (Eq. (T)) is the answer only when no refinement moves α: else skipped
        theta_step = None if refine else step_theta()
        clock.lap("delta", theta_step)
    dtype = state.alpha.dtype
    if not finite(alpha_step, theta_step, step.residual):
        raise NotCertifiedError(non_finite("the influence solve", train, dtype))
    if not step.converged and strict and not refine:  # with refinement, the certificate decides
        raise NotCertifiedError(not_converged(step, cfg.max_iter, dtype))
    refinement = None
    if refine:
        options = solve_options(cfg, train.dtype, "auto", train.accept_floor)
        refinement = Refinement(
            train.resolved_tol(), cfg.max_refine, options.replace(nystrom=shell.nystrom)
        )
    alpha, refined, f, residual = refine_and_certify(
        retained.problem, alpha_step, refinement, change, clock.lap
    )
    if strict and not finite(alpha, residual):
        raise NotCertifiedError(non_finite("the refinement", train, dtype))
    if strict and not (train.certified(residual) and (refined is None or refined.converged)):
        raise NotCertifiedError(_not_certified(residual, refined, cfg.max_refine, train, dtype))
    theta = theta_step
    if refined is not None:
        if state.theta is not None and (refined.steps or method == "theta-cg"):
            # θ = θ_p + J(X)ᵀα (Eq. (T)) for the refined α; the θ-space step's own θ need not lie on
            # that map when it is not optimal (cross-entropy)
            theta = model.theta(shell.x, alpha)
        elif theta is None:
            theta = step_theta()
        clock.lap("delta", theta)  # Δθ = J(X)ᵀΔα: minutes for a promoted CNN, not the refinement's
    if not finite(alpha, theta, f, residual):
        raise NotCertifiedError(non_finite("the refinement", train, dtype))
    floor = certified_floor(retained.problem, alpha, refined.floor if refined else 0.0, f)
    clock.lap("residual")  # the certificate's part: its floor estimate (one |K| pass) counts there
    return _next_version(
        state, shell, ids, alpha, theta, f, (residual, floor), (step, reason), refined, clock
    )


def _next_version(state, shell, ids, alpha, theta, f, certificate, step_parts, refined, clock):
    """The new state (with its ``VersionRecord``) and the ``ForgetResult`` of a computed deletion;
    ``certificate`` is ``(residual, rounding floor)``."""
    step, reason = step_parts
    residual, floor = certificate
    refine_info = None if refined is None else refined.as_solve_info()
    record = VersionRecord(
        state.version + 1, len(ids), step.to_dict(), residual,
        refine=None if refine_info is None else refine_info.to_dict(), reason=reason,
        rounding_floor=floor,
        newton_steps=refined.steps if refined else 0,
        refine_cg_iterations=refined.cg_iterations if refined else 0,
        tolerance=state.train_config.resolved_tol(), accept_floor=state.train_config.accept_floor,
        dtype=np.dtype(alpha.dtype).name,
    )  # fmt: skip
    new_state = shell.replace(
        alpha=alpha, theta=theta, f_star=f, version=state.version + 1, residual=residual,
        forgotten=state.forgotten + tuple(map(state.digest, ids)),
        history=state.history + (record.to_dict(),),
    )  # fmt: skip
    result = ForgetResult(
        new_state.version, step, refine_info, residual, clock.total(), reason,
        record.refine_cg_iterations, clock.timings, refined.inner if refined else (),
        new_state.certificate(),
    )  # fmt: skip
    return new_state, result


def _alpha_step(state, model, mask, method, retained, nystrom, clock):
    """The α-space influence step (system (A) on the retain layout), and a function giving θ after
    it (Eq. (T); ``None`` without θ): one VJP, spent only where the step's θ is the answer."""
    train, cfg = state.train_config, state.solver_config
    options = solve_options(cfg, train.dtype, method).replace(nystrom=nystrom)
    st = influence_step(
        problem_of(state),
        state.alpha,
        jnp.asarray(mask),
        options,
        retained,
        _f_star(state),
        clock.lap,
    )

    def step_theta():
        if state.theta is None:
            return None
        return state.theta + model.theta(state.x, st.delta_alpha, delta=True)

    return st.alpha, step_theta, st.info, st.change


def _theta_step(state: ModelState, shell: ModelState, model: Network, mask: np.ndarray, clock):
    """The θ-space baseline's step, and α of its answer: α_R = −g_R / (λ N_R) at its outputs
    (docs/maths.md, Eq. (O))."""
    train, cfg = state.train_config, state.solver_config
    retain = jnp.asarray(state.active & ~mask)
    dtheta, step = theta_space_delta(
        model, state.theta, state.x, state.y, jnp.asarray(mask), train.lam, train.loss,
        cfg.resolved_tol(train.dtype), cfg.max_iter, retain_mask=retain,
    )  # fmt: skip
    theta_step = state.theta + dtheta
    clock.lap("solve", theta_step)
    out = model.outputs_at(theta_step, shell.x)
    new_mask = jnp.asarray(shell.active)[:, None]
    alpha_step = -losses.grad(train.loss, out, shell.y) * new_mask / (train.lam * shell.n)
    clock.lap("delta", alpha_step)
    change = float(
        jnp.sqrt(
            jnp.sum((alpha_step - shell.alpha) ** 2) + jnp.sum((state.alpha * mask[:, None]) ** 2)
        )
    )
    return alpha_step, theta_step, step, change


def _f_star(state: ModelState) -> jax.Array:
    """f* = f_0 + K α* of ``state`` (kept in every state; computed for one built by hand)."""
    if state.f_star is not None:
        return state.f_star
    m = jnp.asarray(state.active, state.k.dtype)[:, None]
    return state.f0 + state.layout.matvec(state.k, state.alpha * m)


class _Clock:
    """Seconds per part of a deletion, each part's arrays computed (not just dispatched)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str, *arrays) -> None:
        jax.block_until_ready(arrays)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def not_converged(info: SolveInfo, max_iter: int, dtype) -> str:
    """What to change when a solve missed its tolerance in ``dtype`` (the precision it ran in)."""
    name = np.dtype(dtype).name
    head = f"influence solve ({info.method}) stopped at relative residual {info.residual:.2e} after {info.iterations} iterations"
    if info.iterations >= max_iter:
        return f"{head}, its limit: raise max_iter, or use the solver alpha-cholesky for a small retain set"
    floor = f" (rounding in {name} alone leaves about {info.floor:.1e})" if info.floor else ""
    fix = "dtype auto or float64, " if name != "float64" else ""
    return (
        f"{head}: CG stagnated at {name} precision{floor}; use a looser cg_tol, {fix}a larger lam, "
        "or the solver alpha-cholesky for a small retain set"
    )


def _not_certified(residual: float, refined, max_refine: int, train, dtype) -> str:
    """What to change when the new version's certificate missed ``tol × accept_floor``."""
    bound = train.resolved_tol() * train.accept_floor
    head = (
        f"the new version's certificate (relative stationarity residual {residual:.2e}) is above "
        f"its tolerance {train.resolved_tol():.0e}"
        + (
            f" × accept_floor {train.accept_floor:g} = {bound:.1e}"
            if train.accept_floor != 1
            else ""
        )
    )
    if refined is None:
        return (
            head
            + ": turn refinement on (refine)"
            + (
                ", which cross-entropy needs: the influence step alone is first order"
                if train.loss != "mse"
                else ""
            )
        )
    how = (
        ": raise max_refine"
        if refined.steps >= max_refine
        else f" after {refined.steps} Newton step(s) of refinement"
    )
    return head + how + floor_hint(refined.floor, dtype)


def follows_by_removal(state: ModelState, newer: ModelState) -> bool:
    """Whether ``newer``'s K is ``state``'s with points removed, so that ``follow`` can make it by
    erasing or compacting: every record ``newer`` holds is one ``state`` holds (the same id with
    the same x: an id forgotten and added again between the two is another record), and either
    every kept record stays in its row (erased in place) or the kept records fill ``newer``'s
    first rows in order (compacted into a smaller bucket). Otherwise (records added, or versions
    skipped across a compaction followed by erasures, which leaves gaps) ``addition.follow``
    places each kept record's rows at its row in ``newer``."""
    active = np.flatnonzero(newer.active)
    ids = newer.ids[active]
    if newer.version <= state.version or not all(i in state.index for i in ids):
        return False
    old = np.array([state.index[i] for i in ids], int)
    if not np.array_equal(np.asarray(newer.x)[active], np.asarray(state.x)[old]):
        return False
    in_place = newer.capacity == state.capacity and np.array_equal(old, active)
    return in_place or np.array_equal(active, np.arange(len(active)))


def follow(
    state: ModelState,
    newer: ModelState,
    spare: jax.Array | None = None,
    spare_holds_k: bool = False,
) -> ModelState:
    """``newer`` (a later version of ``state``'s model, read from its checkpoint without K) with K:
    ``state``'s K with the forgotten rows erased, or compacted into ``newer``'s rows (the layout
    operations the deletion used), never recomputed; no preconditioner (the caller makes one from
    that K: ``Unlearner.after_follow``).

    Arguments:
      spare: a K-sized buffer the erased K may be written into (consumed).
      spare_holds_k: ``spare`` holds ``state``'s K values (``SpareBuffer.holds``): only the
        forgotten rows and columns are zeroed in it, no pass over K.

    Raises:
      ValueError: ``newer`` is not ``state`` with points removed (``follows_by_removal``).
    """
    layout = state.layout
    ids = newer.ids[newer.active]
    if not follows_by_removal(state, newer):
        raise ValueError(
            f"version {newer.version} is not version {state.version} with points removed"
        )
    keep = np.isin(state.ids, ids) & state.active
    if newer.capacity == state.capacity and np.array_equal(
        np.where(keep, state.ids, ""), newer.ids
    ):
        gone = np.flatnonzero(state.active & ~keep) if spare_holds_k else None
        fits = spare is not None and spare.shape == state.k.shape and spare.dtype == state.k.dtype
        k = layout.erase(state.k, jnp.asarray(keep), into=spare if fits else None, gone=gone)
    else:
        del spare
        k = layout.compact(state.k, np.array([state.index[i] for i in ids]), newer.capacity)
    k = k.astype(newer.alpha.dtype)  # a dtype auto model promoted by this version: exact
    f_star = followed_f_star(state, newer, k, layout)
    return newer.replace(k=k, layout=layout, nystrom=None, f_star=f_star, k_origin=state.k_origin)


def followed_f_star(
    state: ModelState, newer: ModelState, k: jax.Array, layout: KernelLayout
) -> jax.Array:
    """f* ``(C, d)`` of ``newer`` followed from ``state`` with K ``k`` (``newer``'s rows): the
    worker's, from its checkpoint, when the worker's K is this process's (the same
    ``ModelState.k_origin``: then it is f_0 + K α for this K too, with no pass over K); else f_0 +
    K α computed here (the K of either process recomputed at a restart over fewer points, or rows
    computed for an addition, differs from the other's by rounding; a checkpoint without f*).
    f* = f_0 + K α* is docs/maths.md's trained outputs (section "Influence of removing F"), whose
    rows give K_RF α*_F = (f* − f_0)_R − K_RR α*_R for system (A): it must be of the K served.
    Raises nothing; ``k`` is ``newer``'s K, ``layout.side(C)`` square (C·d in the full form)."""
    saved = newer.f_star
    if (
        saved is not None
        and newer.k_origin is not None
        and newer.k_origin == state.k_origin
        and saved.shape == newer.f0.shape
        and saved.dtype == k.dtype
    ):
        return saved
    m = jnp.asarray(newer.active, k.dtype)[:, None]
    return newer.f0 + layout.matvec(k, newer.alpha * m)
