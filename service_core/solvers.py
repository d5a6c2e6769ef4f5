"""Solvers for the SPD systems of α-space influence (math.md, systems (A) and (B)).

Every solver returns the solution and a ``SolveInfo`` whose residual is the *true* relative
residual ‖rhs − A x‖ / ‖rhs‖, recomputed after the solve (never CG's recursive estimate), and
``converged`` says whether it met the tolerance. Systems are restricted to the points where
``mask`` is true: rows outside the mask are c·I with a zero right-hand side, so their solution is 0
and no slicing of K is needed.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .losses import apply_blocks
from .ntk import kernel_abs_matvec, kernel_matvec


class SolveInfo(NamedTuple):
    """What a solve did.

    Attributes:
      method: ``alpha-cg``, ``alpha-cholesky``, ``alpha-paper``, ``theta-cg``, or
        ``newton/<inner>`` for several Newton steps.
      iterations: CG iterations (0 for a direct solve; the sum over steps for Newton).
      residual: true relative residual of the final answer (dimensionless).
      converged: whether ``residual`` met the requested tolerance.
      seconds: wall time.
      preconditioner: ``nystrom-<rank>`` when CG was preconditioned (``nystrom_preconditioner``),
        else ``""``.
      floor: the estimated rounding floor of the residual (``spd_rounding_floor``) when the solve
        stagnated above its tolerance, else 0; ``converged`` is then true if rounding explains the
        small miss (``floor_accepts``: no answer in this dtype can be certified closer).
    """

    method: str
    iterations: int
    residual: float
    converged: bool
    seconds: float
    preconditioner: str = ""
    floor: float = 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "iterations": int(self.iterations),
            "residual": float(self.residual),
            "converged": bool(self.converged),
            "seconds": float(self.seconds),
            "preconditioner": self.preconditioner,
            "rounding_floor": float(self.floor),
        }


# How far above an estimated rounding floor (``spd_rounding_floor``, ``training.rounding_floor``) a
# stagnated solve may stop and still count as converged: float32 Newton stagnated at 0.1-2.5 times
# its estimate on digits (mse and ce, λ = 1e-2 to 1e-4, N = 200 and 1,437).
FLOOR_FACTOR = 4.0
# A linear solve that stagnated on its floor is accepted only this close to its tolerance: a floor far
# above the tolerance means the system is too ill-conditioned for the dtype, and the solve fails.
FLOOR_SLACK = 10.0


def floor_accepts(residual: float, tol: float, floor: float) -> bool:
    """Whether a solve that stagnated at ``residual`` > ``tol`` counts as converged: rounding explains
    the miss (``residual`` ≤ FLOOR_FACTOR · ``floor``, with ``floor`` > 0 estimated) and the miss is
    small (``residual`` ≤ FLOOR_SLACK · ``tol``)."""
    return floor > 0.0 and residual <= FLOOR_FACTOR * floor and residual <= FLOOR_SLACK * tol


def cg(
    matvec, b: jax.Array, x0: jax.Array, tol: float, max_iter: int, precond=None
) -> tuple[jax.Array, jax.Array]:
    """Conjugate gradients for an SPD operator (Hestenes–Stiefel; preconditioned when ``precond``
    is given), traceable under ``jit``.

    Arguments:
      matvec: v ↦ A v on arrays shaped like ``b``.
      b, x0: right-hand side and initial guess (any shape); ``x0=None`` starts from 0 without
        spending an operator product on it.
      tol: stop when the recursive residual ‖r‖ ≤ tol·‖b‖ (unpreconditioned norm, so the
        stopping rule is the same with or without ``precond``).
      max_iter: most iterations.
      precond: r ↦ P⁻¹ r for an SPD P ≈ A, or ``None``.

    Returns:
      ``(x, iterations)``. The caller recomputes the true residual.
    """
    apply_p = (lambda r: r) if precond is None else precond
    bnorm2 = jnp.vdot(b, b).real
    if x0 is None:
        x0, r0 = jnp.zeros_like(b), b
    else:
        r0 = b - matvec(x0)
    z0 = apply_p(r0)
    thresh = (tol**2) * bnorm2

    def cond(state):
        _, r, _, _, _, it = state
        return (jnp.vdot(r, r).real > thresh) & (it < max_iter)

    def body(state):
        x, r, z, p, rz, it = state
        ap = matvec(p)
        step = rz / jnp.vdot(p, ap).real
        x = x + step * p
        r = r - step * ap
        z = apply_p(r)
        rz_new = jnp.vdot(r, z).real
        p = z + (rz_new / rz) * p
        return x, r, z, p, rz_new, it + 1

    init = (x0, r0, z0, z0, jnp.vdot(r0, z0).real, jnp.asarray(0))
    x, _, _, _, _, it = jax.lax.while_loop(cond, body, init)
    return x, it


class Nystrom(NamedTuple):
    """A randomized Nyström approximation K ≈ U diag(lam) Uᵀ of rank ℓ (Frangella, Tropp & Udell,
    "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 44(2), 2023, Alg. 2.1).

    Attributes:
      u: ``(rows, ℓ)`` in K's engine layout (rows = C·d for the full form, C for the trace form).
      lam: ``(ℓ,)`` non-negative, descending.
      seconds: wall time it took.

    K − U diag(lam) Uᵀ is positive semidefinite, and so is every principal submatrix of it: the
    rows of the retained points are a Nyström approximation of K_RR as good as the whole one.
    """

    u: jax.Array
    lam: jax.Array
    seconds: float = 0.0

    def take_rows(self, rows, side: int) -> Nystrom:
        """The approximation of K[rows][:, rows], zero rows padding it to ``side`` rows."""
        u = jnp.take(self.u, jnp.asarray(rows), axis=0)
        return self._replace(u=jnp.pad(u, ((0, side - u.shape[0]), (0, 0))))

    def mask_rows(self, keep: jax.Array) -> Nystrom:
        """Rows outside ``keep`` (bool, K's rows) set to zero."""
        return self._replace(u=self.u * keep[:, None].astype(self.u.dtype))


@partial(jax.jit, static_argnames=("rank",))
def _nystrom(k, key, rank):
    n = k.shape[0]
    omega, _ = jnp.linalg.qr(jax.random.normal(key, (n, rank), k.dtype))
    y = jnp.matmul(k, omega, precision=jax.lax.Precision.HIGHEST)  # one pass over K, ℓ columns
    shift = jnp.sqrt(n) * jnp.finfo(k.dtype).eps * jnp.linalg.norm(y)
    y = y + shift * omega
    chol = jnp.linalg.cholesky(omega.T @ y)
    b = jsl.solve_triangular(chol, y.T, lower=True).T
    u, sigma, _ = jnp.linalg.svd(b, full_matrices=False)
    return u, jnp.maximum(sigma**2 - shift, 0.0)


def nystrom(k: jax.Array, rank: int, seed: int = 0) -> Nystrom | None:
    """Rank-``rank`` randomized Nyström approximation of the PSD matrix ``k`` ``(n, n)``: one pass over
    K with ``rank`` columns (2n²ℓ flops), then a QR and an SVD of ``(n, ℓ)``. ``None`` when the rank
    is 0, not below n, or the float arithmetic failed (the solvers then run unpreconditioned)."""
    t0 = time.perf_counter()
    n = k.shape[0]
    if rank <= 0 or rank >= n:
        return None
    u, lam = _nystrom(k, jax.random.PRNGKey(seed), int(rank))
    if not (bool(jnp.all(jnp.isfinite(u))) and bool(jnp.all(jnp.isfinite(lam)))):
        return None
    return Nystrom(u, lam, time.perf_counter() - t0)


def nystrom_preconditioner(ny: Nystrom, form: str, s: jax.Array | None, mask: jax.Array, c):
    """r ↦ P⁻¹ r for P = c·I + V diag(lam) Vᵀ ≈ B = c·I + M S K S M (system (B) on ``mask``), with
    V = M S U, by the Woodbury identity: P⁻¹ r = (r − V (c·diag(1/lam) + VᵀV)⁻¹ Vᵀ r) / c.

    Exact in arithmetic whatever the quality of U: it only changes how many CG iterations (B) takes.
    Works for the full form, and for the trace form without S (W = I); ``None`` otherwise.
    Components with lam ≤ 1e-3·c are dropped (they cannot help: B is within 0.1 % of c·I there).
    """
    m = mask[:, None].astype(ny.u.dtype)
    keep = ny.lam > 1e-3 * c
    inv_lam = jnp.where(keep, 1.0 / jnp.where(keep, ny.lam, 1.0), 0.0)
    if form == "full":
        n, d = mask.shape[0], ny.u.shape[0] // mask.shape[0]
        v = ny.u.reshape(n, d, -1) * m[:, :, None]
        if s is not None:
            v = jnp.einsum("iab,ibl->ial", s, v)
        v = v * keep[None, None, :]
        core = jnp.einsum("ial,iam->lm", v, v) + jnp.diag(c * inv_lam + (~keep))
        factor = jsl.cho_factor(core, lower=True)

        def apply(r):
            z = jsl.cho_solve(factor, jnp.einsum("ial,ia->l", v, r))
            return (r - jnp.einsum("ial,l->ia", v, z)) / c

        return apply
    if s is not None:
        return None
    v = ny.u * m * keep[None, :]
    core = v.T @ v + jnp.diag(c * inv_lam + (~keep))
    factor = jsl.cho_factor(core, lower=True)

    def apply(r):
        return (r - v @ jsl.cho_solve(factor, v.T @ r)) / c

    return apply


def spd_operator(k: jax.Array, form: str, s: jax.Array | None, mask: jax.Array, c):
    """v ↦ c·v + M S K S M v, with M = diag(mask) and S blockdiag (identity for ``None``).

    This is matrix B of math.md (B) restricted to the masked points; v, result ``(N, d)``.
    """
    m = mask[:, None].astype(k.dtype)

    def matvec(v):
        u = apply_blocks(s, v * m)
        return c * v + m * apply_blocks(s, kernel_matvec(k, u, form))

    return matvec


@partial(jax.jit, static_argnames=("form", "max_iter", "zero_start"))
def _cg_solve(k, s, mask, rhs, x0, c, tol, ny, form, max_iter, zero_start=False):
    matvec = spd_operator(k, form, s, mask, c)
    precond = None if ny is None else nystrom_preconditioner(ny, form, s, mask, c)
    x, it = cg(matvec, rhs, None if zero_start else x0, tol, max_iter, precond)
    res = jnp.linalg.norm(rhs - matvec(x)) / jnp.maximum(
        jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny
    )
    return x, it, res


def dense_operator(k: jax.Array, form: str, s: jax.Array | None, mask: jax.Array, c) -> jax.Array:
    """B = c·I + M S K S M as a dense matrix: ``(N·d, N·d)``, or ``(N, N)`` for the trace form without S."""
    n, d = mask.shape[0], (s.shape[-1] if s is not None else None)
    m = mask.astype(k.dtype)
    if form == "trace" and s is None:
        return c * jnp.eye(n, dtype=k.dtype) + (m[:, None] * k * m[None, :])
    if form == "trace":
        a = jnp.einsum("ij,iac,jcb->iajb", k, s, s)
    else:
        d = k.shape[0] // n
        k4 = k.reshape(n, d, n, d)
        a = k4 if s is None else jnp.einsum("iab,ibjc,jdc->iajd", s, k4, s)
    d = a.shape[1]
    a = a * m[:, None, None, None] * m[None, None, :, None]
    return c * jnp.eye(n * d, dtype=k.dtype) + a.reshape(n * d, n * d)


@partial(jax.jit, static_argnames=("form",))
def _cholesky_solve(k, s, mask, rhs, c, form):
    a = dense_operator(k, form, s, mask, c)
    flat = rhs if (form == "trace" and s is None) else rhs.reshape(-1)
    factor = jsl.cho_factor(a, lower=True)
    x = jsl.cho_solve(factor, flat).reshape(rhs.shape)
    matvec = spd_operator(k, form, s, mask, c)
    res = jnp.linalg.norm(rhs - matvec(x)) / jnp.maximum(
        jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny
    )
    return x, res


def system_dim(k: jax.Array, form: str, s, n: int) -> int:
    """Unknowns of the dense system a direct solve factorises."""
    d_full = k.shape[0] // n if form == "full" else 1
    if form == "trace" and s is not None:
        return n * s.shape[-1]
    return n * d_full


def solve_spd(
    k: jax.Array,
    form: str,
    s: jax.Array | None,
    mask: jax.Array,
    rhs: jax.Array,
    c: float,
    method: str,
    tol: float,
    max_iter: int,
    cholesky_max_dim: int = 4096,
    x0: jax.Array | None = None,
    max_restarts: int = 3,
    nystrom: Nystrom | None = None,
    *,
    _unit: bool = False,
) -> tuple[jax.Array, SolveInfo]:
    """Solve (c·I + M S K S M) x = rhs, system (B) of math.md restricted to ``mask``.

    Arguments:
      k: K in the engine layout of ``form`` (``ntk`` module docstring).
      form: ``full`` or ``trace``.
      s: S = W^{1/2} per point ``(N, d, d)``, or ``None`` for S = I (squared error).
      mask: bool ``(N,)``, the points of the system.
      rhs: ``(N, d)``, zero outside the mask.
      c: the shift c = λ N_R (> 0).
      method: ``alpha-cg``, ``alpha-cholesky`` or ``auto`` (Cholesky up to ``cholesky_max_dim``
        unknowns); ``cg`` and ``cholesky`` are accepted aliases.
      tol: relative residual to reach (CG); a direct solve reports its residual against it too.
      max_iter: CG iterations per (re)start; CG restarts from its answer up to ``max_restarts``
        times while the true residual is above ``tol`` (the recursive one drifts in float32).
      x0: CG initial guess (warm start), default zeros.
      nystrom: a Nyström approximation of K in this layout (``nystrom``): CG is preconditioned by
        it (``nystrom_preconditioner``), same answer in fewer iterations (``SolveInfo.preconditioner`` says so).

    Returns:
      ``(x, SolveInfo)``, x ``(N, d)``. The system is solved for rhs / max|rhs| and scaled back (no
      float32 underflow for a tiny rhs). A solve that stagnates above ``tol`` (CG short of its
      iteration limit, or Cholesky) reports ``SolveInfo.floor`` (``spd_rounding_floor``) and counts
      as converged when ``floor_accepts``.
    """
    t0 = time.perf_counter()
    if not _unit:
        # The system is linear: solve it for rhs / max|rhs| and scale back, so that no squared norm (CG's
        # stopping test, the true residual, the floor) underflows in float32 for a tiny rhs (at 1e-15 the
        # residual read 0 while the float64 one was 3e-5; at 1e-20 CG returned x = 0 as converged).
        scale = float(jnp.max(jnp.abs(rhs))) if rhs.size else 0.0
        if 0.0 < scale < float("inf") and scale != 1.0:
            x, info = solve_spd(
                k,
                form,
                s,
                mask,
                rhs / scale,
                c,
                method,
                tol,
                max_iter,
                cholesky_max_dim,
                None if x0 is None else x0 / scale,
                max_restarts,
                nystrom,
                _unit=True,
            )
            return x * scale, info._replace(seconds=time.perf_counter() - t0)
    n = mask.shape[0]
    method = ALIASES.get(method, method)
    if method == "auto":
        method = "alpha-cholesky" if system_dim(k, form, s, n) <= cholesky_max_dim else "alpha-cg"
    c = jnp.asarray(c, dtype=k.dtype)
    if method == "alpha-cholesky":
        x, res = _cholesky_solve(k, s, mask, rhs, c, form)
        res = float(res)
        floor = spd_rounding_floor(k, form, s, mask, c, x, rhs) if res > tol else 0.0
        converged = res <= tol or floor_accepts(res, tol, floor)
        return x, SolveInfo(
            "alpha-cholesky", 0, res, bool(converged), time.perf_counter() - t0, "", floor
        )
    if method != "alpha-cg":
        raise ValueError(f"solve_spd takes 'alpha-cg', 'alpha-cholesky' or 'auto', not {method!r}")
    zero_start = x0 is None
    x = jnp.zeros_like(rhs) if x0 is None else x0
    ny = nystrom if (nystrom is not None and (form == "full" or s is None)) else None
    ny = None if ny is None else ny._replace(seconds=0.0)  # a traced argument: no Python floats
    total = 0
    for _ in range(max_restarts + 1):
        x, it, res = _cg_solve(
            k, s, mask, rhs, x, c, jnp.asarray(tol, k.dtype), ny, form, max_iter, zero_start
        )
        zero_start = False
        total += int(it)
        res = float(res)
        if res <= tol or int(it) >= max_iter:
            break
    pre = "" if ny is None else f"nystrom-{ny.lam.shape[0]}"
    floor = 0.0
    if res > tol and int(it) < max_iter:
        # stagnated, not out of iterations: is the tolerance below what this dtype can certify?
        floor = spd_rounding_floor(k, form, s, mask, c, x, rhs)
    converged = res <= tol or floor_accepts(res, tol, floor)
    return x, SolveInfo(
        "alpha-cg", total, res, bool(converged), time.perf_counter() - t0, pre, floor
    )


def spd_rounding_floor(
    k: jax.Array, form: str, s: jax.Array | None, mask: jax.Array, c, x: jax.Array, rhs: jax.Array
) -> float:
    """How small the true relative residual of system (B) can be computed in K's dtype (an estimate).

    The residual rhs − (c I + M S K S M) x is evaluated with unit roundoff u (2⁻²⁴ in float32); the
    first-order componentwise model of rounding in a product (Higham, *Accuracy and Stability of
    Numerical Algorithms*, §3.5, without its dimension factor) bounds its error by about
    u (c|x| + M|S||K||S|M|x| + |rhs|), so

        floor = u ‖c|x| + M|S||K||S|M|x| + |rhs|‖ / ‖rhs‖,

    one pass over |K| by row blocks (``ntk.kernel_abs_matvec``, no copy). With a small λ, c x and
    K x nearly cancel, and CG stagnates near this level whatever its iteration count.

    Arguments:
      k, form, s, mask, c: system (B) as in ``solve_spd``; x: the answer ``(N, d)``; rhs ``(N, d)``.

    Returns:
      the estimate (float, on the scale of ``SolveInfo.residual``).
    """
    m = mask[:, None].astype(k.dtype)
    u = float(jnp.finfo(k.dtype).eps) / 2
    abs_s = None if s is None else jnp.abs(s)
    ax = jnp.abs(x) * m
    bound = (
        c * ax
        + m * apply_blocks(abs_s, kernel_abs_matvec(k, apply_blocks(abs_s, ax), form))
        + jnp.abs(rhs)
    )
    return float(
        u * jnp.linalg.norm(bound) / jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(k.dtype).tiny)
    )


def solve_newton_system(
    k: jax.Array,
    form: str,
    w_sqrt: jax.Array | None,
    mask: jax.Array,
    b: jax.Array,
    c: float,
    a_tol: float | None = None,
    min_tol: float = 0.0,
    **solver_kwargs,
) -> tuple[jax.Array, SolveInfo]:
    """Solve system (A) of math.md, (W K_mm + c·I) δ = b on the masked points, through its SPD form.

    Squared error (``w_sqrt is None``): (K_mm + c I) δ = b directly. Otherwise (B): with S = W^{1/2},
    (c I + S K S) z = S K b and δ = (b − S z)/c (Rasmussen & Williams, GPML Alg. 3.1).

    Arguments:
      w_sqrt: S ``(N, d, d)`` or ``None``; b: ``(N, d)`` zero outside ``mask``; other arguments as
      ``solve_spd``.
      a_tol: relative residual wanted for (A) itself (inexact Newton). Through (B), (W K + c I) δ − b
        = −S ρ_B / c for (B)'s residual ρ_B, so (B)'s tolerance is divided by the amplification
        max‖S_i‖ ‖S K b‖ / (c ‖b‖) when that exceeds 1 (a small c = λN: at λ = 1e-5 on digits CG
        inner solves met 1e-2 on (B) while δ was useless, and Newton stalled at 0.83), but not
        below ``min_tol``.

    Returns:
      ``(δ, SolveInfo)``, δ ``(N, d)``, zero outside the mask. The residual is that of the SPD system.
    """
    m = mask[:, None].astype(b.dtype)
    b = b * m
    if w_sqrt is None:
        return solve_spd(k, form, None, mask, b, c, **solver_kwargs)
    rhs = m * apply_blocks(w_sqrt, kernel_matvec(k, b, form))
    if a_tol is not None:
        b_norm = float(jnp.linalg.norm(b))
        s_norm = float(jnp.max(jnp.sqrt(jnp.sum(w_sqrt**2, axis=(1, 2))) * mask))  # ≥ max‖S_i‖₂
        amplification = s_norm * float(jnp.linalg.norm(rhs)) / (c * b_norm) if b_norm > 0 else 0.0
        tol = min(solver_kwargs.get("tol", a_tol), a_tol)
        if amplification > 1.0:
            tol = max(min_tol, tol / amplification)
        solver_kwargs = {**solver_kwargs, "tol": tol}
    z, info = solve_spd(k, form, w_sqrt, mask, rhs, c, **solver_kwargs)
    return (b - apply_blocks(w_sqrt, z) * m) / c, info


@partial(jax.jit, static_argnames=("form", "max_iter"))
def _paper_cg(k, w, mask, rhs, x0, n_total, c, tol, form, max_iter):
    m = mask[:, None].astype(k.dtype)

    def matvec(v):
        kv = m * kernel_matvec(k, v * m, form)
        return (
            (m * kernel_matvec(k, m * apply_blocks(w, kv), form)) / n_total
            + (c / n_total) * kv
            + (1 - m) * v
        )

    x, it = cg(matvec, rhs, x0, tol, max_iter)
    res = jnp.linalg.norm(rhs - matvec(x)) / jnp.maximum(
        jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny
    )
    return x, it, res


def solve_paper_form(
    k: jax.Array,
    form: str,
    w: jax.Array | None,
    mask: jax.Array,
    b: jax.Array,
    c: float,
    n_total: int,
    tol: float,
    max_iter: int,
) -> tuple[jax.Array, SolveInfo]:
    """The paper's premultiplied system (math.md, "paper form", the paper's Eq. 12), by CG:

        H_RR = (1/N)(K_RR W_R K_RR) + (N_R/N) λ K_RR,   rhs = K_RR b / N,

    with b the right-hand side of (A) and c = λ N_R. Same solution as (A) when K_RR is positive
    definite; its condition number carries an extra factor of about κ(K_RR), so CG needs far more
    iterations. Kept for comparison (``alpha-paper``), never the default.

    Arguments:
      w: W per point ``(N, d, d)`` or ``None`` (W = I); b ``(N, d)``; n_total: N (the current
      training set size); others as ``solve_spd``.

    Returns:
      ``(Δα_R, SolveInfo)``; the residual is that of the premultiplied system.
    """
    t0 = time.perf_counter()
    m = mask[:, None].astype(b.dtype)
    rhs = m * kernel_matvec(k, b * m, form) / n_total
    x, it, res = _paper_cg(
        k,
        w,
        mask,
        rhs,
        jnp.zeros_like(rhs),
        float(n_total),
        jnp.asarray(c, k.dtype),
        jnp.asarray(tol, k.dtype),
        form,
        max_iter,
    )
    res = float(res)
    return x * m, SolveInfo("alpha-paper", int(it), res, bool(res <= tol), time.perf_counter() - t0)


METHODS = ("auto", "alpha-cg", "alpha-cholesky", "alpha-paper", "theta-cg")
ALIASES = {"cg": "alpha-cg", "cholesky": "alpha-cholesky", "paper": "alpha-paper"}


def canonical_method(name: str) -> str:
    """Normalise a method name (``cg`` → ``alpha-cg`` …). Raises ``ValueError`` for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"unknown solver method {name!r}: use one of {', '.join(METHODS)}")
    return name


class CostEstimate(NamedTuple):
    """The ``auto`` choice and why: estimated flops per method and the chosen one."""

    method: str
    reason: str
    flops: dict


def choose_method(
    n_retain: int,
    d: int,
    form: str,
    has_w: bool,
    n_params: int | None,
    kappa: float,
    tol: float,
    cholesky_max_dim: int,
    kappa_theta: float | None = None,
) -> CostEstimate:
    """Pick the cheapest exact solver for the influence system by a flop-count cost model.

    * ``alpha-cholesky``: n³/3 for n unknowns (n = N_R·d, or N_R for the trace form with W = I),
      allowed up to ``cholesky_max_dim`` unknowns (memory: n² values).
    * ``alpha-cg``: iterations × one operator product, 2(N_R d)² (full form) or 2 N_R² d (trace);
      iterations ≈ ½ √κ ln(2/tol) for condition number κ (standard CG bound).
    * ``theta-cg``: iterations × one HVP ≈ 8 P N_R (forward-over-reverse on N_R points), with the
      same iteration estimate; only for models with parameters.

    Arguments:
      kappa: an upper bound on κ(B) = 1 + λ_max(S K S)/c (from λ_max of the full K, by interlacing),
        or an estimate of the preconditioned κ when α-space CG is preconditioned.
      kappa_theta: κ for θ-space CG (never preconditioned); default ``kappa``.

    Returns:
      ``CostEstimate(method, reason, flops)``.
    """
    import math

    iters = max(1.0, 0.5 * math.sqrt(max(kappa, 1.0)) * math.log(2.0 / tol))
    dim = n_retain * d if (form == "full" or has_w) else n_retain
    product = 2.0 * (n_retain * d) ** 2 if form == "full" else 2.0 * n_retain**2 * d
    flops = {"alpha-cg": iters * product}
    if dim <= cholesky_max_dim:
        flops["alpha-cholesky"] = dim**3 / 3.0 + (dim**2 * d if form == "trace" else 0.0)
    if n_params is not None:
        k_t = kappa if kappa_theta is None else kappa_theta
        iters_theta = max(1.0, 0.5 * math.sqrt(max(k_t, 1.0)) * math.log(2.0 / tol))
        flops["theta-cg"] = iters_theta * 8.0 * n_params * n_retain
    best = min(flops, key=flops.get)
    ranked = ", ".join(f"{k} {v:.2g}" for k, v in sorted(flops.items(), key=lambda kv: kv[1]))
    reason = (
        f"{best}: fewest estimated flops ({ranked}) for N_R = {n_retain}, d = {d}, {form} form"
        + (f", P = {n_params}" if n_params is not None else "")
        + f", κ ≈ {kappa:.3g} (≈{iters:.0f} CG iterations)"
        + (
            ""
            if dim <= cholesky_max_dim
            else f"; Cholesky excluded above {cholesky_max_dim} unknowns"
        )
    )
    return CostEstimate(best, reason, flops)


def largest_eigenvalue(
    k: jax.Array, form: str, n: int, d: int, iterations: int = 30, seed: int = 0
) -> float:
    """λ_max(K) by power iteration (an estimate from below; 1 % above it is returned as a bound)."""
    v = jax.random.normal(jax.random.PRNGKey(seed), (n, d if form == "full" else 1), k.dtype)
    if form == "trace":
        v = v.reshape(n, 1)
    est = 0.0
    for _ in range(iterations):
        w = kernel_matvec(k, v, form)
        est = float(jnp.linalg.norm(w) / jnp.linalg.norm(v))
        v = w / jnp.linalg.norm(w)
    return 1.01 * est
