"""Solving system (B), system (A) through it, and the paper's premultiplied form (docs/maths.md)."""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from ..losses import apply_blocks
from .cg import cg, restarted
from .nystrom import preconditioner, usable
from .result import SolveInfo, SolveOptions, floor_accepts, relative_residual
from .system import SPDSystem


@partial(jax.jit, static_argnames=("max_iter", "zero_start"))
def _cg_run(system: SPDSystem, rhs, x0, tol, ny, max_iter, zero_start):
    precond = None if ny is None else preconditioner(ny, system)
    x, it = cg(system.matvec, rhs, None if zero_start else x0, tol, max_iter, precond)
    return x, it, relative_residual(system.matvec, x, rhs)


@jax.jit
def _cholesky(system: SPDSystem, rhs):
    flat = rhs if (system.layout.form == "trace" and system.s is None) else rhs.reshape(-1)
    factor = jsl.cho_factor(system.dense(), lower=True)
    x = jsl.cho_solve(factor, flat).reshape(rhs.shape)
    return x, relative_residual(system.matvec, x, rhs)


def solve_spd(
    system: SPDSystem, rhs: jax.Array, options: SolveOptions, x0: jax.Array | None = None
) -> tuple[jax.Array, SolveInfo]:
    """Solve B x = rhs, system (B) of docs/maths.md restricted to the system's mask.

    Arguments:
      system: B (``SPDSystem``).
      rhs: ``(C, d)``, zero outside the mask.
      options: method (``alpha-cg``, ``alpha-cholesky`` or ``auto``: Cholesky up to
        ``cholesky_max_dim`` unknowns), tolerance, iteration limits, Nyström preconditioner.
      x0: CG initial guess (warm start), default zeros.

    Returns:
      ``(x, SolveInfo)``, x ``(C, d)``. The system is solved for rhs / max|rhs| and scaled back, so
      that no squared norm (CG's stopping test, the true residual, the floor) underflows in float32
      for a tiny rhs (at 1e-15 the residual read 0 while the float64 one was 3e-5). A solve that
      stagnates above ``tol`` (CG short of its iteration limit, or Cholesky) reports
      ``SolveInfo.floor`` (``SPDSystem.rounding_floor``) and counts as converged when
      ``floor_accepts``.

    Raises:
      ValueError: an unknown method.
    """
    t0 = time.perf_counter()
    scale = float(jnp.max(jnp.abs(rhs))) if rhs.size else 0.0
    if not 0.0 < scale < float("inf"):
        scale = 1.0
    x, info = _solve_unit(system, rhs / scale, options, None if x0 is None else x0 / scale)
    return x * scale, info._replace(seconds=time.perf_counter() - t0)


def _solve_unit(system, rhs, options, x0):
    method = options.method
    if method == "auto":
        method = "alpha-cholesky" if system.dim <= options.cholesky_max_dim else "alpha-cg"
    tol = options.tol
    if method == "alpha-cholesky":
        x, res = _cholesky(system, rhs)
        res, stalled, total, pre = float(res), True, 0, ""
    elif method == "alpha-cg":
        ny = options.nystrom if usable(options.nystrom, system) else None

        def run(x, zero_start):
            return _cg_run(
                system, rhs, x, jnp.asarray(tol, system.k.dtype), ny, options.max_iter, zero_start
            )

        start = jnp.zeros_like(rhs) if x0 is None else x0
        x, total, res, out = restarted(
            run, start, tol, options.max_iter, options.max_restarts, x0 is None
        )
        stalled = not out
        pre = "" if ny is None else f"nystrom-{ny.rank}"
    else:
        raise ValueError(f"solve_spd takes 'alpha-cg', 'alpha-cholesky' or 'auto', not {method!r}")
    # stagnated, not out of iterations: is the tolerance below what this dtype can certify?
    floor = system.rounding_floor(x, rhs) if res > tol and stalled else 0.0
    converged = res <= tol or floor_accepts(res, tol, floor, options.accept_floor)
    return x, SolveInfo(method, total, res, bool(converged), 0.0, pre, floor)


def solve_system_a(
    system: SPDSystem,
    b: jax.Array,
    options: SolveOptions,
    a_tol: float | None = None,
    min_tol: float = 0.0,
) -> tuple[jax.Array, SolveInfo]:
    """Solve system (A) of docs/maths.md, (W K + c·I) δ = b on the masked points, through (B).

    Squared error (``system.s is None``): (K + c I) δ = b directly. Otherwise, with S = W^{1/2},
    (c I + S K S) z = S K b and δ = (b − S z)/c (Rasmussen & Williams, GPML Alg. 3.1).

    Arguments:
      system: B for these points, with S and c.
      b: ``(C, d)``, zero outside the mask.
      options: as ``solve_spd``.
      a_tol: relative residual wanted for (A) itself (inexact Newton). Through (B), (W K + c I) δ − b
        = −S ρ_B / c for (B)'s residual ρ_B, so (B)'s tolerance is divided by the amplification
        max‖S_i‖ ‖S K b‖ / (c ‖b‖) when that exceeds 1 (a small c = λN: at λ = 1e-5 on digits CG
        inner solves met 1e-2 on (B) while δ was useless, and Newton stalled at 0.83), but not
        below ``min_tol``.

    Returns:
      ``(δ, SolveInfo)``, δ ``(C, d)``, zero outside the mask. The residual is that of (B).
    """
    m = system.m
    b = b * m
    if system.s is None:
        return solve_spd(system, b, options)
    rhs = m * apply_blocks(system.s, system.layout.matvec(system.k, b))
    if a_tol is not None:
        b_norm = float(jnp.linalg.norm(b))
        s_rows = jnp.sqrt(jnp.sum(system.s**2, axis=(1, 2))) * system.mask  # ≥ ‖S_i‖₂
        amplification = (
            float(jnp.max(s_rows)) * float(jnp.linalg.norm(rhs)) / (float(system.c) * b_norm)
            if b_norm > 0
            else 0.0
        )
        tol = min(options.tol, a_tol)
        if amplification > 1.0:
            tol = max(min_tol, tol / amplification)
        options = options.replace(tol=tol)
    z, info = solve_spd(system, rhs, options)
    return (b - apply_blocks(system.s, z) * m) / system.c, info


@partial(jax.jit, static_argnames=("max_iter",))
def _paper_cg(system: SPDSystem, w, rhs, n_total, tol, max_iter):
    k, layout, m = system.k, system.layout, system.m

    def matvec(v):
        kv = m * layout.matvec(k, v * m)
        outer = m * layout.matvec(k, m * apply_blocks(w, kv))
        return outer / n_total + (system.c / n_total) * kv + (1 - m) * v

    x, it = cg(matvec, rhs, None, tol, max_iter)
    return x, it, relative_residual(matvec, x, rhs)


def solve_paper_form(
    system: SPDSystem, w: jax.Array | None, b: jax.Array, n_total: int, options: SolveOptions
) -> tuple[jax.Array, SolveInfo]:
    """The paper's premultiplied system (docs/maths.md, Eq. (P); the paper's Eq. 12), by CG:

        H_RR = (1/N)(K_RR W_R K_RR) + (N_R/N) λ K_RR,   rhs = K_RR b / N,

    with b the right-hand side of (A) and c = λ N_R. Same solution as (A) when K_RR is positive
    definite; its condition number carries an extra factor of about κ(K_RR), so CG needs far more
    iterations. Kept for comparison (``alpha-paper``), never the default.

    Arguments:
      system: supplies K, the mask R and c; w: W per point ``(C, d, d)`` or ``None`` (W = I);
      b ``(C, d)``; n_total: N (the current training set size).

    Returns:
      ``(Δα_R, SolveInfo)``; the residual is that of the premultiplied system.
    """
    t0 = time.perf_counter()
    m = system.m
    rhs = m * system.layout.matvec(system.k, b * m) / n_total
    tol = jnp.asarray(options.tol, system.k.dtype)
    x, it, res = _paper_cg(system, w, rhs, float(n_total), tol, options.max_iter)
    res = float(res)
    info = SolveInfo("alpha-paper", int(it), res, res <= options.tol, time.perf_counter() - t0)
    return x * m, info
