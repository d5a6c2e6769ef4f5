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
from .ntk import kernel_matvec


class SolveInfo(NamedTuple):
    """What a solve did.

    Attributes:
      method: ``cg``, ``cholesky``, ``newton`` (several steps), or a composite name.
      iterations: CG iterations (0 for a direct solve; the sum over steps for Newton).
      residual: true relative residual of the final answer (dimensionless).
      converged: whether ``residual`` met the requested tolerance.
      seconds: wall time.
    """

    method: str
    iterations: int
    residual: float
    converged: bool
    seconds: float

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "iterations": int(self.iterations),
            "residual": float(self.residual),
            "converged": bool(self.converged),
            "seconds": float(self.seconds),
        }


def cg(matvec, b: jax.Array, x0: jax.Array, tol: float, max_iter: int) -> tuple[jax.Array, jax.Array]:
    """Conjugate gradients for an SPD operator (Hestenes–Stiefel), traceable under ``jit``.

    Arguments:
      matvec: v ↦ A v on arrays shaped like ``b``.
      b, x0: right-hand side and initial guess (any shape).
      tol: stop when the recursive residual ‖r‖ ≤ tol·‖b‖.
      max_iter: most iterations.

    Returns:
      ``(x, iterations)``. The caller recomputes the true residual.
    """
    bnorm2 = jnp.vdot(b, b).real
    r0 = b - matvec(x0)
    rs0 = jnp.vdot(r0, r0).real
    thresh = (tol**2) * bnorm2

    def cond(state):
        _, _, _, rs, it = state
        return (rs > thresh) & (it < max_iter)

    def body(state):
        x, r, p, rs, it = state
        ap = matvec(p)
        step = rs / jnp.vdot(p, ap).real
        x = x + step * p
        r = r - step * ap
        rs_new = jnp.vdot(r, r).real
        p = r + (rs_new / rs) * p
        return x, r, p, rs_new, it + 1

    x, _, _, _, it = jax.lax.while_loop(cond, body, (x0, r0, r0, rs0, jnp.asarray(0)))
    return x, it


def spd_operator(k: jax.Array, form: str, s: jax.Array | None, mask: jax.Array, c):
    """v ↦ c·v + M S K S M v, with M = diag(mask) and S blockdiag (identity for ``None``).

    This is matrix B of math.md (B) restricted to the masked points; v, result ``(N, d)``.
    """
    m = mask[:, None].astype(k.dtype)

    def matvec(v):
        u = apply_blocks(s, v * m)
        return c * v + m * apply_blocks(s, kernel_matvec(k, u, form))

    return matvec


@partial(jax.jit, static_argnames=("form", "max_iter"))
def _cg_solve(k, s, mask, rhs, x0, c, tol, form, max_iter):
    matvec = spd_operator(k, form, s, mask, c)
    x, it = cg(matvec, rhs, x0, tol, max_iter)
    res = jnp.linalg.norm(rhs - matvec(x)) / jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny)
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
    res = jnp.linalg.norm(rhs - matvec(x)) / jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny)
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
) -> tuple[jax.Array, SolveInfo]:
    """Solve (c·I + M S K S M) x = rhs, system (B) of math.md restricted to ``mask``.

    Arguments:
      k: K in the engine layout of ``form`` (``ntk`` module docstring).
      form: ``full`` or ``trace``.
      s: S = W^{1/2} per point ``(N, d, d)``, or ``None`` for S = I (squared error).
      mask: bool ``(N,)``, the points of the system.
      rhs: ``(N, d)``, zero outside the mask.
      c: the shift c = λ N_R (> 0).
      method: ``cg``, ``cholesky`` or ``auto`` (Cholesky up to ``cholesky_max_dim`` unknowns).
      tol: relative residual to reach (CG); a direct solve reports its residual against it too.
      max_iter: CG iterations per (re)start; CG restarts from its answer up to ``max_restarts``
        times while the true residual is above ``tol`` (the recursive one drifts in float32).
      x0: CG initial guess (warm start), default zeros.

    Returns:
      ``(x, SolveInfo)``, x ``(N, d)``.
    """
    t0 = time.perf_counter()
    n = mask.shape[0]
    if method == "auto":
        method = "cholesky" if system_dim(k, form, s, n) <= cholesky_max_dim else "cg"
    c = jnp.asarray(c, dtype=k.dtype)
    if method == "cholesky":
        x, res = _cholesky_solve(k, s, mask, rhs, c, form)
        res = float(res)
        return x, SolveInfo("cholesky", 0, res, bool(res <= tol), time.perf_counter() - t0)
    if method != "cg":
        raise ValueError(f"unknown solver method {method!r}: use 'cg', 'cholesky' or 'auto'")
    x = jnp.zeros_like(rhs) if x0 is None else x0
    total = 0
    for _ in range(max_restarts + 1):
        x, it, res = _cg_solve(k, s, mask, rhs, x, c, jnp.asarray(tol, k.dtype), form, max_iter)
        total += int(it)
        res = float(res)
        if res <= tol or int(it) >= max_iter:
            break
    return x, SolveInfo("cg", total, res, bool(res <= tol), time.perf_counter() - t0)


def solve_newton_system(
    k: jax.Array,
    form: str,
    w_sqrt: jax.Array | None,
    mask: jax.Array,
    b: jax.Array,
    c: float,
    **solver_kwargs,
) -> tuple[jax.Array, SolveInfo]:
    """Solve system (A) of math.md, (W K_mm + c·I) δ = b on the masked points, through its SPD form.

    Squared error (``w_sqrt is None``): (K_mm + c I) δ = b directly. Otherwise (B): with S = W^{1/2},
    (c I + S K S) z = S K b and δ = (b − S z)/c (Rasmussen & Williams, GPML Alg. 3.1).

    Arguments:
      w_sqrt: S ``(N, d, d)`` or ``None``; b: ``(N, d)`` zero outside ``mask``; other arguments as
      ``solve_spd``.

    Returns:
      ``(δ, SolveInfo)``, δ ``(N, d)``, zero outside the mask. The residual is that of the SPD system.
    """
    m = mask[:, None].astype(b.dtype)
    b = b * m
    if w_sqrt is None:
        return solve_spd(k, form, None, mask, b, c, **solver_kwargs)
    rhs = m * apply_blocks(w_sqrt, kernel_matvec(k, b, form))
    z, info = solve_spd(k, form, w_sqrt, mask, rhs, c, **solver_kwargs)
    return (b - apply_blocks(w_sqrt, z) * m) / c, info
